"""virtio-balloon in-process: how fast inflated pages go back to the host, and how much.

The reference driver plays a guest over virtio-mmio in this process (no VM), on guest
RAM in a memfd that is written whole first (a guest that used all its memory), so the
memfd's allocated blocks (``st_blocks``) are what the host would get back.

    balloon_inflate_mib_s             inflate rate: 256 PFNs a chain as Linux sends them,
                                      the pages in random order (one punch per page)
    balloon_inflate_runs_mib_s        the same pages in order (one punch per chain)
    madvise_remove_mib_s              baseline, the physical limit: the same pages punched
                                      by a plain loop of MADV_REMOVE, a page a call, no virtio
    balloon_released_mib_over_target  host memory released (memfd blocks) over the target
                                      the host set, the guest following it as Linux does
                                      (goal >= 0.95)

Each figure is the best of ``--rounds`` (this is a shared machine). The real-guest
figures (UML) are another bench's.

    python bench/balloon.py [--ram-mib 256] [--target-mib 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time

from emu.devices.balloon import BalloonDevice
from emu.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from emu.testing.balloon import BalloonDriver
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

MIB = 1 << 20


def _guest(ram: int) -> tuple[GuestMemory, BalloonDevice, BalloonDriver]:
    mem = GuestMemory.create(ram)
    mem.regions[0].mm[:] = b"\x11" * ram
    dev = BalloonDevice()
    bd = BalloonDriver.open(VirtioMmioDriver(MmioTransport(dev, mem), mem))
    return mem, dev, bd


def inflate_rate(ram: int, target: int, scattered: bool) -> float:
    mem, dev, bd = _guest(ram)
    try:
        pfns = bd.take_pages(target // PAGE_SIZE)
        if scattered:
            random.Random(1).shuffle(pfns)
        t0 = time.perf_counter()
        bd.inflate(pfns)
        return target / MIB / (time.perf_counter() - t0)
    finally:
        dev.close()
        mem.close()


def madvise_rate(ram: int, target: int) -> float:
    mem = GuestMemory.create(ram)
    try:
        region = mem.regions[0]
        region.mm[:] = b"\x11" * ram
        offsets = [i * PAGE_SIZE for i in range(target // PAGE_SIZE)]
        random.Random(1).shuffle(offsets)
        t0 = time.perf_counter()
        for off in offsets:
            region.discard(off, PAGE_SIZE)
        return target / MIB / (time.perf_counter() - t0)
    finally:
        mem.close()


def released_over_target(ram: int, target: int) -> tuple[float, float]:
    """(released MiB, released / target) once the guest reports the target reached."""
    mem, dev, bd = _guest(ram)
    stop = threading.Event()
    try:
        used = bd.drv.alloc.next >> PAGE_SHIFT  # rings and buffers: not the guest's to give
        bd.pool = bd.take_pages((ram >> PAGE_SHIFT) - used - 64)
        guest = threading.Thread(target=bd.serve, args=(stop,))
        guest.start()
        before = mem.allocated() or 0
        dev.set_target(target // PAGE_SIZE)
        if not dev.wait_actual(target // PAGE_SIZE, 60):
            raise TimeoutError(f"the guest reached {dev.actual} of {target // PAGE_SIZE} pages")
        released = before - (mem.allocated() or 0)
        return released / MIB, released / target
    finally:
        stop.set()
        dev.close()
        mem.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--target-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ram, target = args.ram_mib * MIB, args.target_mib * MIB
    if not 0 < target <= ram // 2:
        ap.error("--target-mib must be more than 0 and at most half of --ram-mib")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        figures = {
            "balloon_inflate_mib_s": inflate_rate(ram, target, scattered=True),
            "balloon_inflate_runs_mib_s": inflate_rate(ram, target, scattered=False),
            "madvise_remove_mib_s": madvise_rate(ram, target),
        }
        for name, value in figures.items():
            best[name] = max(best.get(name, 0.0), value)
    released, ratio = released_over_target(ram, target)
    print(
        f"# {args.ram_mib} MiB guest RAM (memfd), target {args.target_mib} MiB, "
        f"best of {args.rounds}, ring core {os.environ.get('EMU_RING', 'default')}"
    )
    for name, value in best.items():
        print(f"{name} {value:.0f} MiB/s")
    print(f"balloon_released_mib {released:.1f} MiB")
    print(f"balloon_released_mib_over_target {ratio:.3f} ratio")


if __name__ == "__main__":
    main()
