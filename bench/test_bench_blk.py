"""virtio-blk requests per second through the reference driver, on a tmpfs image.

4 KiB reads at queue depth 1 and with 32 requests in flight (kicked as the driver's
event suppression asks, or made available together and kicked once), for the Cython and
the pure-Python ring core side by side (one benchmark group per case). The driver runs in the
same process, so the figures include its cost, like a guest's CPU time would.

The ``dirty log`` groups run the Cython core over 512 MiB of guest RAM (QEMU microvm's) with
the vhost-user migration log off and on (``PageLog`` on the queue, as LOG_ALL installs it):
what logging costs a request while a live migration runs, and that it costs nothing when off.

    .venv/bin/python -m pytest bench/test_bench_blk.py --benchmark-enable
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from emu.devices.blk import S_OK, SECTOR, T_IN, BlkDevice
from emu.memory import GuestMemory
from emu.queue import _cring
from emu.testing.blk import BlkDriver, header, status_of
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user.dirty_log import PageLog

IMAGE_SIZE = 64 << 20
READ = 4096
DEPTH = 32
SHM = Path("/dev/shm")

RING_CORES = [
    "python",
    pytest.param(
        "cython", marks=pytest.mark.skipif(_cring is None, reason="emu._ring is not built")
    ),
]


@pytest.fixture(scope="module")
def image():
    base = SHM if SHM.is_dir() else Path("/tmp")
    path = base / f"emu-bench-blk-{os.getpid()}.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    yield path
    path.unlink()


@pytest.fixture(params=RING_CORES)
def blk(request, image):
    mem = GuestMemory.create(64 << 20)
    dev = BlkDevice(image, queue_max_size=256)
    for q in dev.queues:
        q.impl = request.param
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    b = BlkDriver.open(drv, queue_size=256)
    yield b
    drv.reset()
    dev.close()
    mem.close()


@pytest.fixture(params=["log-off", "log-on"])
def blk_logged(request, image):
    if _cring is None:
        pytest.skip("emu._ring is not built")
    mem = GuestMemory.create(512 << 20)
    dev = BlkDevice(image, queue_max_size=256)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    b = BlkDriver.open(drv, queue_size=256)
    log = mmap.mmap(-1, (512 << 20) >> 15)  # a bit per page
    if request.param == "log-on":
        q = dev.queues[0]
        page_log = PageLog(log, mem, {0: q.device})
        dev.call(lambda: setattr(q, "log", page_log))
    yield b
    drv.reset()
    dev.close()
    mem.close()


def sectors():
    """4 KiB-aligned sectors spread over the image, repeating."""
    blocks = IMAGE_SIZE // READ
    i = 0
    while True:
        yield (i * 7919 % blocks) * (READ // SECTOR)
        i += 1


def test_read_4k_qd1(benchmark, blk):
    benchmark.group = "blk 4 KiB read, queue depth 1"
    it = sectors()

    def one() -> None:
        blk.submit(T_IN, next(it), in_size=READ)
        (c,) = blk.wait()
        assert status_of(c) == S_OK

    benchmark.pedantic(one, rounds=3000, warmup_rounds=100)
    benchmark.extra_info["requests_per_round"] = 1


def test_read_4k_qd32(benchmark, blk):
    benchmark.group = f"blk 4 KiB read, {DEPTH} in flight (one round = {DEPTH} requests)"
    it = sectors()

    def burst() -> None:
        for _ in range(DEPTH):
            blk.submit(T_IN, next(it), in_size=READ)
        done = blk.wait(count=DEPTH)
        assert all(status_of(c) == S_OK for c in done)

    benchmark.pedantic(burst, rounds=200, warmup_rounds=10)
    benchmark.extra_info["requests_per_round"] = DEPTH
    if benchmark.stats is not None:  # None under --benchmark-disable: run once, not timed
        benchmark.extra_info["requests_per_second"] = DEPTH / benchmark.stats.stats.mean


def test_read_4k_qd32_one_kick(benchmark, blk):
    """32 requests made available, then one kick: how Linux blk-mq submits a plugged batch."""
    benchmark.group = f"blk 4 KiB read, {DEPTH} in flight, one kick (one round = {DEPTH} requests)"
    it = sectors()
    dq = blk.drv.queues[0]

    def burst() -> None:
        for _ in range(DEPTH):
            dq.add([header(T_IN, next(it))], [READ, 1])
        if dq.kick_needed():
            blk.drv.kick(0)
        done = blk.wait(count=DEPTH)
        assert all(status_of(c) == S_OK for c in done)

    benchmark.pedantic(burst, rounds=200, warmup_rounds=10)
    if benchmark.stats is not None:  # None under --benchmark-disable: run once, not timed
        benchmark.extra_info["requests_per_second"] = DEPTH / benchmark.stats.stats.mean


def test_read_4k_qd1_dirty_log(benchmark, blk_logged):
    benchmark.group = "blk 4 KiB read, queue depth 1, 512 MiB RAM, dirty log off/on"
    it = sectors()

    def one() -> None:
        blk_logged.submit(T_IN, next(it), in_size=READ)
        (c,) = blk_logged.wait()
        assert status_of(c) == S_OK

    benchmark.pedantic(one, rounds=3000, warmup_rounds=100)


def test_read_4k_qd32_dirty_log(benchmark, blk_logged):
    benchmark.group = f"blk 4 KiB read, {DEPTH} in flight, 512 MiB RAM, dirty log off/on"
    it = sectors()

    def burst() -> None:
        for _ in range(DEPTH):
            blk_logged.submit(T_IN, next(it), in_size=READ)
        done = blk_logged.wait(count=DEPTH)
        assert all(status_of(c) == S_OK for c in done)

    benchmark.pedantic(burst, rounds=200, warmup_rounds=10)
    if benchmark.stats is not None:  # None under --benchmark-disable: run once, not timed
        benchmark.extra_info["requests_per_second"] = DEPTH / benchmark.stats.stats.mean
