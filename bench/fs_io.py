"""Real-guest virtio-fs: emu's fs device against Debian's C virtiofsd, same guest workloads.

The `fs` workload's bench passes (emu/guest/init_fs.py) on a share in /dev/shm (tmpfs, so
the host's disk is out of the measurement):

- seq: 1 MiB dd write of a `--mib` file (fsync'd), then a 1 MiB dd read of it with the
  guest's caches dropped (MiB/s);
- rand: 4 KiB random reads of that file, fio psync QD1 with O_DIRECT, time based (IOPS);
- meta: create, stat (dentries dropped first, so each is a LOOKUP) and unlink of `--files`
  files (ops/s each);
- tree: tar x of a tree of `--tree` dirs x files, find over it (cold), rm -r (entries/s).

    QEMU microvm (TCG)  emu serve fs:DIR  vs  virtiofsd -o sandbox=chroot -o xattr
    UML                 emu serve fs:DIR  (virtiofsd absent: UML reads the tag through
                        VHOST_USER_GET_CONFIG, which virtiofsd does not implement)

virtiofsd runs with `-o xattr` so that both serve the same FUSE requests: emu serves
extended attributes (the issue asks for them), and a Linux guest asks a file system that
does for `security.capability` on every write and chown (two GETXATTR round trips per
file of a `tar x`); virtiofsd without `xattr` answers the first with ENOSYS and the guest
stops asking. With `xattr` the request counts of the two backends match opcode for opcode
(checked with virtiofsd's `-d` log against emu's).

Each configuration boots once per round, rounds alternate between backends, and the best
round of each figure is kept (this is a shared machine). The ratios are emu over
virtiofsd under microvm: `fs_seq_read_emu_over_virtiofsd`, `fs_seq_write_...`,
`fs_rand_read_4k_...`, and `fs_metadata_ops_emu_over_virtiofsd`, the geometric mean of
the ratios of the five metadata figures (create, stat, unlink, tar x, find).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emu import progress
from emu.devices import registry
from emu.guest import build_image, run_guest, virtiofsd
from emu.guest.backends import emu_backends
from emu.guest.devices import Device

PASSES = "seq,rand,meta,tree"
SEQ = ["fs_seq_write", "fs_seq_read"]
META = ["fs_meta_create", "fs_meta_stat", "fs_meta_unlink", "fs_tar_x", "fs_find"]
FIGURES = [*SEQ, "fs_rand_read_4k", *META, "fs_rm_r", "fs_meta_ops"]
CONFIGS = [("microvm", "emu"), ("microvm", "virtiofsd"), ("uml", "emu"), ("uml", "virtiofsd")]
#: virtiofsd's options beside source and sandbox: serve what emu serves (see above)
VIRTIOFSD_OPTIONS = ("xattr",)
ABSENT = {
    ("uml", "virtiofsd"): "UML needs VHOST_USER_GET_CONFIG (the tag), virtiofsd lacks it",
}


@contextmanager
def _backend(kind: str, backend: str, share: Path, tmp: Path) -> Iterator[list[Device]]:
    if backend == "emu":
        with emu_backends(kind, [f"fs:{share}"], tmp) as devices:
            yield devices
    else:
        sock = tmp / "virtiofsd.sock"
        with virtiofsd.serve(share, sock, options=VIRTIOFSD_OPTIONS):
            yield [Device("fs", str(sock))]


def measure(kind: str, backend: str, params: dict[str, str], tmp: Path) -> dict[str, tuple]:
    """{figure: (value, unit)} of one boot running every bench pass on a fresh share."""
    share = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{kind}-{backend}-"))
    try:
        with _backend(kind, backend, share, tmp) as devices:
            res = run_guest(kind, devices, ["fs"], params=params, mem_mib=512, timeout=1200)
    finally:
        shutil.rmtree(share, ignore_errors=True)
    if not res.ok:
        warnings = "\n".join(res.log.warnings[-10:])
        raise RuntimeError(f"{kind}/{backend}: rc={res.rc}\n{warnings}\n{res.console[-2000:]}")
    return dict(res.log.bench)


def absent(kind: str, backend: str) -> str | None:
    """Why a configuration cannot run here, or None."""
    if (kind, backend) in ABSENT:
        return ABSENT[(kind, backend)]
    if backend == "virtiofsd" and not virtiofsd.available():
        return f"{virtiofsd.VIRTIOFSD} missing (scripts/install-guest-deps.sh)"
    if backend == "emu":
        try:
            registry.get("fs")
        except registry.SpecError:
            return "emu has no fs device type"
    if kind == "microvm" and shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing"
    return None


def _ratio(table: dict, name: str) -> float:
    emu, ref = table.get(("microvm", "emu"), {}), table.get(("microvm", "virtiofsd"), {})
    if name not in emu or name not in ref or not ref[name][0]:
        return math.nan
    return emu[name][0] / ref[name][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mib", type=int, default=256, help="seq/rand file size")
    ap.add_argument("--files", type=int, default=10000, help="meta pass file count")
    ap.add_argument("--tree", default="50x20", help="tree pass DIRSxFILES")
    ap.add_argument("--rand-s", type=int, default=5, help="seconds of random reads")
    ap.add_argument("--no-uml", action="store_true")
    progress.add_argument(ap)
    args = ap.parse_args()
    progress.ask(args.progress)
    if args.quick:
        args.rounds, args.mib, args.files, args.tree, args.rand_s = 1, 32, 1000, "10x10", 1
    dirs, files = args.tree.split("x")
    params = {
        "fs.do": PASSES,
        "fs.mib": str(args.mib),
        "fs.files": str(args.files),
        "fs.tree_dirs": dirs,
        "fs.tree_files": files,
        "fs.rand_s": str(args.rand_s),
    }
    configs = [c for c in CONFIGS if not (args.no_uml and c[0] == "uml")]
    why = {c: absent(*c) for c in configs}
    for kind in {k for (k, _), w in why.items() if w is None}:
        build_image(kind, fio=True)  # fetched and cached once, outside the timings

    table: dict[tuple[str, str], dict[str, tuple]] = {}
    runnable = [c for c in configs if why[c] is None]
    bar = progress.progress("guest runs", args.rounds * len(runnable))
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="emu-fsio-") as tmpdir, bar:
        for r in range(args.rounds):
            for config in runnable:
                bar.update(0, f"{'/'.join(config)} round {r + 1}")
                got = measure(*config, params, Path(tmpdir))
                bar.update(1, f"{'/'.join(config)} round {r + 1}")
                best = table.setdefault(config, {})
                for name, (value, unit) in got.items():
                    if name not in best or value > best[name][0]:
                        best[name] = (value, unit)

    print(
        f"virtio-fs, guest workloads on a tmpfs share: {args.mib} MiB file, "
        f"{args.files} files, tree {args.tree}, {args.rand_s} s random reads; "
        f"best of {args.rounds} round(s), shared machine"
    )
    print(f"{'guest':<9}{'backend':<11}" + "".join(f"{f.removeprefix('fs_'):>13}" for f in FIGURES))
    for config in configs:
        kind, backend = config
        if why[config] is not None:
            print(f"{kind:<9}{backend:<11}  absent: {why[config]}")
            continue
        row = table[config]
        cells = "".join(f"{row[f][0]:>13.1f}" if f in row else f"{'-':>13}" for f in FIGURES)
        print(f"{kind:<9}{backend:<11}{cells}")
    print("units: seq MiB/s, rand IOPS, the rest operations (entries) per second")
    for (kind, backend), row in table.items():
        for name, (value, unit) in row.items():
            print(f"{name}_{kind}_{backend} {value:.1f} {unit}")
    for name in [*SEQ, "fs_rand_read_4k"]:
        print(f"{name}_emu_over_virtiofsd {_ratio(table, name):.2f} ratio")
    ratios = [_ratio(table, name) for name in META]
    for name, r in zip(META, ratios, strict=True):
        print(f"{name}_emu_over_virtiofsd {r:.2f} ratio")
    mean = math.nan
    if all(r > 0 for r in ratios):  # nan compares False: any missing figure leaves nan
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"fs_metadata_ops_emu_over_virtiofsd {mean:.2f} ratio")


if __name__ == "__main__":
    sys.exit(main())
