"""Real-guest virtio-blk throughput and backend CPU cost, emu against its peers, in one run.

Guests run /init's `blkbench` workload: O_DIRECT dd, 1 MiB sequential write and read, then
4 KiB (queue depth 1) write and read, on /dev/vda backed by a disk image on tmpfs.

    UML (virtio_uml)    emu's vhost-user backend  vs  qemu-storage-daemon (C, libvhost-user)
    QEMU microvm (TCG)  emu's vhost-user backend  vs  qemu-storage-daemon  vs  QEMU's built-in
                        virtio-blk

Backend CPU time is the backend process's utime + stime (from /proc) over a separate UML run
whose blkbench does only a 1 MiB of sequential I/O and ``--ops`` 4 KiB writes and reads, so
almost every request is a 4 KiB one; it is divided by the number of 4 KiB requests
(2 x ops). Each figure is the median of ``--runs`` guest boots.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from emu.guest import qsd
from emu.guest.images import build_image
from emu.guest.proc import start, stop
from emu.guest.run import run_guest

DISK_MIB = 256
PHASES = ("blk_write_1m", "blk_read_1m", "blk_write_4k", "blk_read_4k")
UNITS = {
    "blk_write_1m": "MiB/s",
    "blk_read_1m": "MiB/s",
    "blk_write_4k": "IOPS",
    "blk_read_4k": "IOPS",
}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and everything below it (backends run under a reaper)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return total
    return total + sum(_cpu_seconds(c) for c in children)


def _wait_socket(sock: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not qsd.listening(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited ({proc.returncode}) before listening on {sock}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no backend listening on {sock}")
        time.sleep(0.02)


@contextmanager
def emu_backend(image: Path, sock: Path) -> Iterator[subprocess.Popen]:
    """`emu serve` for the image, as its own process (so its CPU time is its own)."""
    sock.unlink(missing_ok=True)
    proc = start([sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), f"blk:{image}"])
    try:
        _wait_socket(sock, proc)
        yield proc
    finally:
        stop(proc)
        sock.unlink(missing_ok=True)


BACKENDS: dict[str, Callable[[Path, Path], object]] = {
    "emu": emu_backend,
    "qsd": qsd.blk_export,
}


def boot(kind: str, backend: str, tmp: Path, params: dict) -> tuple[dict, float]:
    """One guest run; returns (bench results, backend CPU seconds)."""
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_MIB << 20)
    if backend == "qemu":
        res = run_guest(kind, [f"qemu-blk:{image}"], ["blkbench"], params=params, timeout=600)
        cpu = 0.0
    else:
        sock = tmp / f"{backend}.sock"
        with BACKENDS[backend](image, sock) as proc:
            before = _cpu_seconds(proc.pid)
            res = run_guest(kind, [f"blk:{sock}"], ["blkbench"], params=params, timeout=600)
            cpu = _cpu_seconds(proc.pid) - before
    if not res.ok:
        raise RuntimeError(
            f"{kind} on {backend}: guest failed (rc {res.rc}):\n" + res.console[-2000:]
        )
    return {k: float(v) for k, (v, _) in res.log.bench.items()}, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="guest boots per configuration")
    ap.add_argument("--mib", type=int, default=128, help="MiB per 1 MiB-block phase")
    ap.add_argument("--ops", type=int, default=4096, help="requests per 4 KiB phase")
    ap.add_argument("--no-microvm", action="store_true", help="UML only (microvm is slow)")
    args = ap.parse_args()
    for kind in ("uml", "microvm"):
        build_image(kind)  # fetched and cached once, outside the timings
    configs = [("uml", "emu"), ("uml", "qsd")]
    if not args.no_microvm:
        configs += [("microvm", "emu"), ("microvm", "qsd"), ("microvm", "qemu")]
    params = {"blkbench.mib": args.mib, "blkbench.ops": args.ops}
    cpu_params = {"blkbench.mib": 1, "blkbench.ops": args.ops}

    table: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmpdir:
        tmp = Path(tmpdir)
        for kind, backend in configs:
            runs = [boot(kind, backend, tmp, params)[0] for _ in range(args.runs)]
            table[(kind, backend)] = {p: statistics.median(r[p] for r in runs) for p in PHASES}
        cpu = {}
        for backend in ("emu", "qsd"):
            secs = [boot("uml", backend, tmp, cpu_params)[1] for _ in range(args.runs)]
            cpu[backend] = statistics.median(secs) / (2 * args.ops) * 1e6

    print(f"{'guest':<9}{'backend':<9}" + "".join(f"{p:>15}" for p in PHASES))
    for (kind, backend), row in table.items():
        print(f"{kind:<9}{backend:<9}" + "".join(f"{row[p]:>15.1f}" for p in PHASES))
    print(f"{'backend CPU per 4 KiB request':<40} emu {cpu['emu']:.1f} us, qsd {cpu['qsd']:.1f} us")
    print()
    for (kind, backend), row in table.items():
        for p in PHASES:
            print(f"{kind}_{backend}_{p} {row[p]:.1f} {UNITS[p]}")
    for backend, us in cpu.items():
        print(f"backend_cpu_per_4k_req_{backend} {us:.1f} us")
    uml_emu, uml_qsd = table[("uml", "emu")], table[("uml", "qsd")]
    print(f"uml_blk_seq_read_emu_over_qsd {uml_emu['blk_read_1m'] / uml_qsd['blk_read_1m']:.2f} x")
    print(f"uml_blk_4k_read_emu_over_qsd {uml_emu['blk_read_4k'] / uml_qsd['blk_read_4k']:.2f} x")
    print(f"backend_cpu_per_4k_req_emu_over_qsd {cpu['emu'] / cpu['qsd']:.2f} x")


if __name__ == "__main__":
    main()
