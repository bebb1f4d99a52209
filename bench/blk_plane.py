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
"""

from __future__ import annotations

import argparse
import os
import random
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
        figures = {}
        for plane in ("python", "native"):
            figures[plane] = min(
                device_us_per_read(path, plane, args.requests, args.depth) for _ in range(3)
            )
    print(f"{'plane':<8} {'device us per 4 KiB read':>26}")
    for plane, us in figures.items():
        print(f"{plane:<8} {us:>26.2f}")
    for plane, us in figures.items():
        print(f"blk_device_us_per_4k_read_{plane} {us:.2f} us")


if __name__ == "__main__":
    main()
