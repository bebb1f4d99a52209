"""The write fence: a write in flight at a report stop never reaches the disk after the
destination resubmitted it (issue 9).

Real storage with real latency: two nbdkit servers over one image file, the source's with
a write delay (a slow path to the storage), the destination's without (a fast one). Each
cycle the guest has writes outstanding at the source's NBD server when the VMM stops the
device with the ``report`` policy; the state, with those writes in flight, goes through
the snapshot encoding into a fresh device on the destination, which resubmits them; once
they complete the guest overwrites the same blocks with newer data. After the source's
delay has surely passed, the disk must hold the newer data.

The negative control takes the fence away (a report stop cancels the source's completions
without waiting for its writes) and shows the same cycles then lose newer data: the test
can fail. The source device is closed only at the end of a cycle (its host may linger), so
nothing but the stop itself can fence its writes.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from emu.devices.base import RunState
from emu.devices.blk import SECTOR, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.queue import Gate, Virtqueue
from emu.state.format import decode, encode
from emu.testing.blk import BlkDriver, status_of
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

BLOCK = 4096
BLOCKS = 16
IMAGE = BLOCKS * BLOCK
RAM = 4 << 20
#: the source's write delay: the window a stale write has to overwrite newer data
SLOW_S = 0.004
CYCLES = int(os.environ.get("EMU_FENCE_CYCLES", "1000"))


class Storage:
    """One image, reached slowly by the source and quickly by the destination."""

    def __init__(self, nbd_server, tmp: Path) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(IMAGE))
        plugin = ["file", f"file={self.image}"]
        ms = f"{SLOW_S * 1000:g}ms"
        self.slow = nbd_server(plugin, filters=["delay"], params=[f"wdelay={ms}"]).uri
        self.fast = nbd_server(plugin).uri
        self.fd = os.open(self.image, os.O_RDONLY)

    def block(self, b: int) -> bytes:
        return os.pread(self.fd, BLOCK, b * BLOCK)


def unfenced(q: Virtqueue) -> None:
    """The negative control's source queue: a stop cancels its completions and waits for
    nothing (starting the queue still drops as before)."""
    q.held = lambda: 0
    q.drop_due = lambda: q.cancel_due() if q.gate is Gate.CLOSED else Virtqueue.drop_due(q)


def one_cycle(
    storage: Storage,
    mem: GuestMemory,
    packed: bool,
    rng: random.Random,
    cycle: int,
    fence: bool = True,
) -> tuple[int, list[int]]:
    """One stop / restore / resubmit / overwrite: the writes in flight at the stop, and the
    blocks whose newer data was lost."""
    src = BlkDevice(storage.slow, plane="native")
    if not fence:
        unfenced(src.queues[0])
    tr = MmioTransport(src, mem)
    blk = BlkDriver.open(VirtioMmioDriver(tr, mem), packed=packed)
    blocks = rng.sample(range(BLOCKS), rng.randint(1, 8))
    old = {b: bytes([cycle % 251 + 1, b]) * (BLOCK // 2) for b in blocks}
    new = {b: bytes([cycle % 251 + 1, 0x80 | b]) * (BLOCK // 2) for b in blocks}
    q = src.queues[0]
    start = q.state().next_used
    tokens = [blk.submit(T_OUT, b * BLOCK // SECTOR, old[b]) for b in blocks]
    submitted = time.monotonic()
    deadline = submitted + 5
    # every write outstanding at the server, or (this thread was descheduled for longer
    # than the delay) already answered and published: that cycle has less in flight
    while ((q.state().next_used - start) & 0xFFFF) + q.deferred.count() < len(blocks):
        assert time.monotonic() < deadline, "writes never reached the engine"
        time.sleep(0.0002)
    tr.vmm_stop("report")
    in_flight = len(src.queues[0].inflight())
    state = decode(encode(tr.save()))
    saved = blk.drv.save()

    dst = BlkDevice(storage.fast, plane="native")
    tr2 = MmioTransport(dst, mem)
    drv2 = VirtioMmioDriver.load(tr2, mem, saved)
    tr2.restore(state)
    try:
        done = drv2.wait(0, len(tokens))  # the resubmitted writes complete on the destination
        assert sorted(c.token for c in done) == sorted(tokens)
        assert {status_of(c) for c in done} == {0}
        blk2 = BlkDriver(drv2)
        for b in blocks:  # the guest overwrites the same blocks with newer data
            assert blk2.write(b * BLOCK // SECTOR, new[b]) == 0
        # the source's writes, had they not been fenced, land by now
        time.sleep(max(0.0, submitted + 3 * SLOW_S - time.monotonic()))
        return in_flight, [b for b in blocks if storage.block(b) != new[b]]
    finally:
        dst.close()
        src.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_report_stop_fences_writes(nbd_server, tmp_path, packed):
    storage = Storage(nbd_server, tmp_path)
    mem = GuestMemory.create(RAM)
    rng = random.Random(9 + packed)
    lost, in_flight = {}, 0
    try:
        for c in range(CYCLES):
            n, bad = one_cycle(storage, mem, packed, rng, c)
            in_flight += n > 0
            if bad:
                lost[c] = bad
    finally:
        mem.close()
    assert lost == {}, f"newer data lost in {len(lost)} of {CYCLES} cycles: {lost}"
    assert in_flight >= CYCLES * 0.9, f"writes in flight at only {in_flight} of {CYCLES} stops"


def test_without_the_fence_newer_data_is_lost(nbd_server, tmp_path):
    """The negative control: the same cycles lose data when a report stop cancels the
    queue's completions and nothing waits for the writes the server still holds."""
    storage = Storage(nbd_server, tmp_path)
    mem = GuestMemory.create(RAM)
    rng = random.Random(1)
    try:  # until the first loss: how soon depends on scheduling, that it comes does not
        lost = next(
            (c for c in range(300) if one_cycle(storage, mem, False, rng, c, fence=False)[1]),
            None,
        )
    finally:
        mem.close()
    assert lost is not None, "no cycle lost data without the fence: the test could not fail"


@pytest.mark.parametrize("op", ["read", "write"])
def test_report_stop_waits_only_for_writes(nbd_server, op):
    """Reads cancelled at a report stop need nothing more from the backend, so the stop is
    final within the stop call itself; writes keep the device STOPPING (the fence) until
    the server has answered them. Each request then completes exactly once after resume."""
    uri = nbd_server(filters=["delay"], params=["rdelay=200ms", "wdelay=200ms"]).uri
    mem = GuestMemory.create(RAM)
    dev = BlkDevice(uri, plane="native")
    try:
        tr = MmioTransport(dev, mem)
        blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
        n = 8
        if op == "read":
            tokens = [blk.submit(T_IN, 8 * i, in_size=BLOCK) for i in range(n)]
        else:
            tokens = [blk.submit(T_OUT, 8 * i, bytes([i]) * BLOCK) for i in range(n)]
        deadline = time.monotonic() + 5
        while dev.queues[0].deferred.count() < n:
            assert time.monotonic() < deadline, "requests never reached the engine"
            time.sleep(0.0002)

        def stop_inline():  # on the device thread: the stop runs there and then
            dev.request_stop("report")
            return dev.run_state

        state = dev.call(stop_inline)
        assert state is (RunState.STOPPED if op == "read" else RunState.STOPPING)
        assert dev.wait_stopped(5)
        dev.resume()
        done = blk.wait(0, n)
        assert sorted(c.token for c in done) == sorted(tokens)
        assert {status_of(c) for c in done} == {0}
    finally:
        dev.close()
        mem.close()


@pytest.mark.parametrize("policy", ["report", "drain"])
def test_a_stop_gives_a_silent_server_up_and_needs_a_reset(nbd_server, tmp_path, policy):
    """A write outstanding at a server that stops answering (SIGSTOP): the stop does not
    stay STOPPING for ever; after ``stop_timeout`` the device needs a reset (the write's
    fate is unknown), and a VMM stop returns with that outcome."""
    srv = nbd_server(["memory", "16M"])
    mem = GuestMemory.create(RAM)
    dev = BlkDevice(srv.uri, plane="native", stop_timeout=0.5)
    tr = MmioTransport(dev, mem)
    blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
    try:
        assert blk.write(0, b"a" * BLOCK) == 0
        srv.freeze()
        blk.submit(T_OUT, 8, b"b" * BLOCK)
        deadline = time.monotonic() + 5
        while dev.queues[0].held() < 1:
            assert time.monotonic() < deadline, "the write never reached the engine"
            time.sleep(0.001)
        started = time.monotonic()
        tr.vmm_stop(policy, timeout=10)
        assert dev.run_state is RunState.BROKEN
        assert "unanswered" in (dev.broken or "")
        assert time.monotonic() - started < 5
    finally:
        srv.thaw()
        dev.close()
        mem.close()
