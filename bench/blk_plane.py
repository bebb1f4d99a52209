"""Device-side cost of a 4 KiB blk read, native data plane vs the Python path, in-process.

    .venv/bin/python bench/blk_plane.py [--requests 20000] [--depth 32]

The reference driver makes ``--depth`` random 4 KiB reads of a 64 MiB image (in the host
page cache) available on one split queue with one kick, waits for all of them, and starts
the next round (the Python driver is slower than either device: refilling one request at
a time would measure passes of one chain, i.e. the driver). The figure is the device
thread's own CPU time (its thread CPU clock, which includes the syscalls it makes: preadv
for the Python path, io_uring_enter for the native one) divided by the requests served:
ring walk, parsing, I/O, status, used ring, interrupts, and the sleep and wake-up of every
round. The driver runs on another thread and is not counted.

Beside the planes, two floors built here with gcc and liburing:
- c_uring (bench/c_uring_reads.c): the same reads, ``--depth`` at a time, through one
  io_uring on one thread with no device at all: the kernel's price for the reads alone.
- c_device (bench/c_uring_device.c): a device in C serving rounds of the same shape: it
  sleeps in epoll on a kick eventfd, makes the reads through io_uring into buffers the
  driver thread just cleared, and wakes the driver through an eventfd. Its driver keeps
  busy between rounds as long as the Python driver's thread did (measured in the native
  run). No ring, no header, no status byte: what a plain C device pays for these rounds
  on this machine, wake-ups included.

Every figure is taken twice: with the process free to use two CPUs (driver and device
each on their own, as a VMM's vCPU and I/O thread are; the figure the goal is about), and
with the whole process pinned to one CPU, where waking the other thread is a local
wake-up: the gap between the two columns is what this machine charges for a wake-up
across CPUs. The configurations run interleaved, best of 3 each.
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


def build(tmp: str, source: str, *libs: str) -> ctypes.CDLL:
    so = os.path.join(tmp, source.replace(".c", ".so"))
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", so, str(HERE / source), *libs]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(so)


def c_floor_us_per_read(lib: ctypes.CDLL, path: str, requests: int, depth: int) -> float:
    """Thread CPU per read of the plain C io_uring loop (bench/c_uring_reads.c)."""
    fn = lib.uring_reads_us
    fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint64, ctypes.c_uint64]
    fn.restype = ctypes.c_double
    us = fn(path.encode(), depth, requests, IMAGE // BS)
    if us < 0:
        raise OSError(f"c_uring_reads failed ({us:.0f})")
    return us


def c_device_us_per_read(
    lib: ctypes.CDLL, path: str, requests: int, depth: int, pause_us: float
) -> float:
    """Device thread CPU per read of the C device (bench/c_uring_device.c)."""
    fn = lib.uring_device_us
    fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint64, ctypes.c_uint64]
    fn.argtypes += [ctypes.c_double]
    fn.restype = ctypes.c_double
    us = fn(path.encode(), depth, max(1, requests // depth), IMAGE // BS, pause_us)
    if us < 0:
        raise OSError("c_uring_device failed")
    return us


def device_us_per_read(path: str, plane: str, requests: int, depth: int) -> tuple[float, float]:
    """The device thread's CPU per read, and the driver thread's CPU per round."""
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
        t0, driver0 = time.clock_gettime(clock), time.thread_time()
        done = rounds = 0
        while done < requests:  # a round: ``depth`` reads, one kick, all completions
            submit(depth)
            done += len(drv.wait(0, depth))
            rounds += 1
        used = time.clock_gettime(clock) - t0
        return used / done * 1e6, (time.thread_time() - driver0) / rounds * 1e6
    finally:
        drv.reset()
        dev.close()
        mem.close()


def measure(path: str, tmp: str, requests: int, depth: int) -> dict[str, float]:
    """One run of every configuration; ``<name>`` on two CPUs, ``<name>_one_cpu`` pinned."""
    reads = build(tmp, "c_uring_reads.c", "-luring")
    device = build(tmp, "c_uring_device.c", "-luring", "-lpthread")
    cpus = os.sched_getaffinity(0)
    figures = {"c_uring": c_floor_us_per_read(reads, path, requests, depth)}
    try:
        for suffix, layout in (("", cpus), ("_one_cpu", {min(cpus)})):
            os.sched_setaffinity(0, layout)  # threads started from here on inherit it
            native, pause_us = device_us_per_read(path, "native", requests, depth)
            figures["native" + suffix] = native
            figures["c_device" + suffix] = c_device_us_per_read(
                device, path, requests, depth, pause_us
            )
            figures["python" + suffix] = device_us_per_read(path, "python", requests, depth)[0]
    finally:
        os.sched_setaffinity(0, cpus)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=32)
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("blk_plane: needs two CPUs (the two-CPU column is the figure)")
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="emu-bench-") as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE))
        for _ in range(3):
            for name, us in measure(path, tmp, args.requests, args.depth).items():
                best[name] = min(us, best.get(name, us))
    print(f"device thread CPU per 4 KiB read, us (depth {args.depth}, best of 3)")
    print(f"{'':<10} {'two CPUs':>9} {'one CPU':>9}")
    for name in ("c_uring", "c_device", "native", "python"):
        one = best.get(name + "_one_cpu")
        print(f"{name:<10} {best[name]:>9.2f} {'-' if one is None else f'{one:.2f}':>9}")
    for plane in ("native", "python"):
        print(f"blk_device_us_per_4k_read_{plane} {best[plane]:.2f} us")
        print(f"blk_device_us_per_4k_read_{plane}_one_cpu {best[plane + '_one_cpu']:.2f} us")
    print(f"blk_read_floor_us_per_4k_c_uring {best['c_uring']:.2f} us")
    print(f"blk_device_floor_us_per_4k_c_device {best['c_device']:.2f} us")
    print(f"blk_device_floor_us_per_4k_c_device_one_cpu {best['c_device_one_cpu']:.2f} us")
    ratio = best["native"] / best["c_device"]
    print(f"blk_device_native_over_c_device {ratio:.2f} x")


if __name__ == "__main__":
    main()
