"""Live migration between hosts over NBD storage, emu against qemu-storage-daemon.

The hosts are network namespaces on one switch (emu/guest/netns.py): a storage host with
nbdkit's file plugin serving the disk image over NBD on TCP, a source and a destination
host each with a vhost-user-blk backend on that NBD export and a QEMU 7.2 microvm (TCG)
on it (emu/testing/hostmig.py). The guest runs the ``livemig`` workload and moves from the
source to the destination over TCP, as tests/test_guest_hosts.py does: the first pass
over RAM at ``--bandwidth``, held while the guest fills its page cache, then QEMU's
default 300 ms downtime limit until it converges. Backends, on both hosts: ``emu serve
--policy drain``, ``emu serve --policy report`` (``--state-dir``/``--restore-dir``) and
qemu-storage-daemon (an nbd blockdev on the same export, its vhost-user-blk export).

Per run, from QEMU's last query-migrate: ``downtime`` (ms the VM was stopped, whole
milliseconds), the final pass (``downtime-bytes`` in 4 KiB pages), the passes and the
total time; and the backend's part of the downtime from QEMU's own vhost-user trace
(``livemig.stop_us``: the first message of the stop to the answer to GET_VRING_BASE,
which under drain waits for the requests still at the storage host). A run passes when
the migration completed, every process ran on its host and the destination guest's and
the image's data checks found nothing. Figures are medians over the passed runs, the
backends in turns (emu drain, emu report, qsd, emu drain, ...). ``--storage-delay MS``
puts nbdkit's delay filter in front of the file: every NBD read and write waits MS on the
storage host, a slower storage network than the switch's (which adds next to nothing).

    .venv/bin/python bench/migrate_hosts.py [--runs 5] [--storage-delay 5] [--backends qsd]

Prints a table and ``name value unit`` lines; the headline ratio takes the worse of
emu's two policies: ``hosts_migration_downtime_emu_over_qsd``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from emu import progress
from emu.guest import build_image, qsd
from emu.guest.netns import Network, netns_missing
from emu.testing import hostmig
from emu.testing.nbdkit import nbdkit_missing

FAILED = {
    "downtime_ms": float("nan"),
    "final_pass_pages": float("nan"),
    "passes": 0,
    "total_s": float("nan"),
    "stop_us": float("nan"),
    "passed": False,
}


def median(runs: list[dict], key: str, pick: Callable = statistics.median) -> float:
    return pick([r[key] for r in runs]) if runs else float("nan")


def ratio(values: list[float], base: float) -> float:
    """The worst of ``values`` over ``base``; nan when any of them is missing."""
    if base == 0 or any(math.isnan(v) for v in [*values, base]):
        return float("nan")
    return max(values) / base


def one(kind: str, image, bandwidth: int, delay_ms: float) -> dict:
    """One run on fresh hosts; a failure is a failed run, with its first line printed."""
    try:
        with (
            Network(hostmig.HOSTS) as net,
            tempfile.TemporaryDirectory(prefix="emu-hosts-") as tmp,
        ):
            r = hostmig.one_run(kind, image, net, Path(tmp), bandwidth, delay_ms)
    except (AssertionError, RuntimeError, TimeoutError, OSError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"# {kind}: {lines[0]}")
        for line in lines[1:][-12:]:  # the guest console's end and its ring, where there are
            print(f"#   {line}")
        return dict(FAILED)
    if r["problems"] and r.get("status") == "completed":
        print(f"# {kind}: {'; '.join(r['problems'])}")
    return {**FAILED, **r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per backend")
    ap.add_argument("--bandwidth", type=int, default=16 << 20, help="bytes/s, first pass")
    ap.add_argument(
        "--storage-delay",
        type=float,
        default=0,
        metavar="MS",
        help="each NBD read and write waits MS first (nbdkit's delay filter)",
    )
    ap.add_argument(
        "--backends",
        default=",".join(hostmig.BACKENDS),
        help=f"comma-separated, of {','.join(hostmig.BACKENDS)}",
    )
    progress.add_argument(ap)  # each migration's RAM sent (emu/guest/livemig.py)
    args = ap.parse_args()
    progress.ask(args.progress)
    if unknown := set(args.backends.split(",")) - set(hostmig.BACKENDS):
        ap.error(f"unknown backends: {', '.join(sorted(unknown))}")
    for why in (netns_missing(), nbdkit_missing()):
        if why is not None:
            sys.exit(f"bench/migrate_hosts.py: {why}")
    image = build_image("microvm")
    kinds = [k for k in args.backends.split(",") if k != "qsd" or qsd.available()]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.runs):
        for kind in kinds:
            r = one(kind, image, args.bandwidth, args.storage_delay)
            runs[kind].append(r)
            print(
                f"# {kind} run {i + 1}/{args.runs}: downtime {r['downtime_ms']:.0f} ms, "
                f"final pass {r['final_pass_pages']:.0f} pages, {r['passes']} passes, "
                f"backend stop {r['stop_us']:.0f} us, {'passed' if r['passed'] else 'FAILED'}",
                flush=True,
            )

    head = f"{'backend':<12} {'downtime ms':>12} {'(mean)':>7} {'final pass pages':>17}"
    print(f"\n{head} {'passes':>7} {'backend stop us':>16} {'total s':>8} {'passed':>7}")
    ok = {k: [r for r in rs if r["passed"]] for k, rs in runs.items()}
    for kind, rs in runs.items():
        good = ok[kind]
        print(
            f"{kind:<12} {median(good, 'downtime_ms'):>12.1f} "
            f"{median(good, 'downtime_ms', statistics.mean):>7.1f} "
            f"{median(good, 'final_pass_pages'):>17.0f} {median(good, 'passes'):>7.0f} "
            f"{median(good, 'stop_us'):>16.0f} {median(good, 'total_s'):>8.1f} "
            f"{len(good):>4}/{len(rs)}"
        )
    print()
    for kind in runs:
        name = kind.replace("-", "_")
        print(f"hosts_migration_downtime_{name} {median(ok[kind], 'downtime_ms'):.1f} ms")
        print(f"hosts_migration_backend_stop_{name} {median(ok[kind], 'stop_us'):.0f} us")
        print(
            f"hosts_migration_final_pass_pages_{name} "
            f"{median(ok[kind], 'final_pass_pages'):.0f} pages"
        )
        print(f"hosts_migration_runs_passed_{name} {len(ok[kind])} runs")
    if "qsd" in runs and len(runs) > 1:
        for key, label in (("downtime_ms", "downtime"), ("stop_us", "backend_stop")):
            emu = [median(ok[k], key) for k in kinds if k != "qsd"]
            base = median(ok["qsd"], key)
            print(f"hosts_migration_{label}_emu_over_qsd {ratio(emu, base):.2f} ratio")
    print(f"hosts_migration_runs {args.runs} runs")
    print(f"hosts_migration_storage_delay {args.storage_delay:g} ms")


if __name__ == "__main__":
    main()
