"""Device-side cost of a 4 KiB blk read, native data plane vs the Python path, in-process.

    .venv/bin/python bench/blk_plane.py [--requests 20000] [--depth 32]

The reference driver makes ``--depth`` random 4 KiB reads of a 64 MiB image (in the host
page cache) available on one split queue with one kick, waits for all of them, and starts
the next round (the Python driver is slower than either device: refilling one request at
a time would measure passes of one chain, i.e. the driver). The figure is the device
thread's own CPU time (its thread CPU clock, which includes the syscalls it makes: preadv
for the Python path, io_uring_enter for the native one) divided by the requests served:
ring walk, parsing, I/O, status, used ring, interrupts. The driver runs on another thread
and is not counted. Both planes run in the same process, one after the other, best of 3.

Beside them, the floor: bench/c_uring_reads.c (built here with gcc and liburing) makes the
same reads, ``--depth`` at a time, through one io_uring with no device at all; its thread
CPU per read is the kernel's price for the read, which both planes' figures include.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from emu.devices.blk import SECTOR, T_IN, BlkDevice  # noqa: E402
from emu.memory import GuestMemory  # noqa: E402
from emu.testing.blk import BlkDriver, header  # noqa: E402
from emu.testing.driver import VirtioMmioDriver  # noqa: E402
from emu.transport.mmio import MmioTransport  # noqa: E402

IMAGE = 64 << 20
BS = 4096
HERE = Path(__file__).resolve().parent


def c_floor_us_per_read(path: str, tmp: str, requests: int, depth: int) -> float:
    """Thread CPU per read of the plain C io_uring loop (bench/c_uring_reads.c)."""
    so = os.path.join(tmp, "c_uring_reads.so")
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", so, str(HERE / "c_uring_reads.c"), "-luring"]
    subprocess.run(cmd, check=True)
    fn = ctypes.CDLL(so).uring_reads_us
    fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint64, ctypes.c_uint64]
    fn.restype = ctypes.c_double
    us = fn(path.encode(), depth, requests, IMAGE // BS)
    if us < 0:
        raise OSError(f"c_uring_reads failed ({us:.0f})")
    return us


def device_us_per_read(path: str, plane: str, requests: int, depth: int) -> float:
    mem = GuestMemory.create(64 << 20)
    dev = BlkDevice(path, plane=plane, queue_max_size=256)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    rng = random.Random(1)
    sectors = IMAGE // SECTOR // 8
    try:
        BlkDriver.open(drv, indirect=False)
        dq = drv.queues[0]

        def submit(n: int) -> None:
            for _ in range(n):
                dq.add([header(T_IN, 8 * rng.randrange(sectors))], [BS, 1])
            drv.kick(0)

        submit(depth)  # warm up, and start the device thread
        drv.wait(0, depth)
        clock = time.pthread_getcpuclockid(dev._thread.ident)
        t0 = time.clock_gettime(clock)
        done = 0
        while done < requests:  # a round: ``depth`` reads, one kick, all completions
            submit(depth)
            done += len(drv.wait(0, depth))
        used = time.clock_gettime(clock) - t0
        return used / done * 1e6
    finally:
        drv.reset()
        dev.close()
        mem.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="emu-bench-") as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE))
        figures = {
            "c_uring": min(
                c_floor_us_per_read(path, tmp, args.requests, args.depth) for _ in range(3)
            )
        }
        for plane in ("python", "native"):
            figures[plane] = min(
                device_us_per_read(path, plane, args.requests, args.depth) for _ in range(3)
            )
    print(f"{'plane':<8} {'device us per 4 KiB read':>26}   (c_uring: the reads alone)")
    for plane, us in figures.items():
        print(f"{plane:<8} {us:>26.2f}")
    floor = figures.pop("c_uring")
    for plane, us in figures.items():
        print(f"blk_device_us_per_4k_read_{plane} {us:.2f} us")
    print(f"blk_read_floor_us_per_4k_c_uring {floor:.2f} us")


if __name__ == "__main__":
    main()
