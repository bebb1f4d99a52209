"""The blk device thread's native loop (BlkPlane's ``serve_parked``): it serves kicks and
completions without the Python device loop, and hands back to it whatever it must not
handle itself (commands, a stopped or failed device, a queue out of its pass budget).

The differential test in test_blk_native.py runs the same hostile rounds through the
native plane with and without this loop; these tests look at the loop itself.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from modes import blk_native, wait_until

from emu.devices import blk
from emu.devices.base import RunState
from emu.devices.blk import SECTOR, BlkDevice
from emu.memory import GuestMemory
from emu.testing.blk import BlkDriver, header, status_of
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport.mmio import MmioTransport

pytestmark = pytest.mark.skipif(blk_native is None, reason="emu.devices._blkplane is not built")

IMAGE = 1 << 20


class Rig:
    """A native-plane blk device behind the in-process transport and reference driver;
    counts how often the device thread went into the native loop."""

    def __init__(self, path: Path, **kw) -> None:
        self.mem = GuestMemory.create(8 << 20)
        self.dev = BlkDevice(path, plane="native", **kw)
        self.tr = MmioTransport(self.dev, self.mem)
        self.drv = VirtioMmioDriver(self.tr, self.mem)
        self.entries = 0
        native = self.dev.serve_parked

        def counted(ep):
            self.entries += 1
            return native(ep)

        self.dev.serve_parked = counted

    def close(self) -> None:
        self.drv.reset()
        self.dev.close()
        self.mem.close()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(IMAGE)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def rig(image):
    r = Rig(image[0])
    yield r
    r.close()


def test_requests_one_at_a_time_are_served_inside_the_native_loop(rig, image):
    """200 reads, each waited for before the next: the device thread's Python loop runs
    a handful of times, not once or twice per request as it does without the loop."""
    _, data = image
    b = BlkDriver.open(rig.drv)
    wait_until(lambda: rig.entries >= 1)
    before = rig.entries
    for i in range(200):
        sector = (i * 7919) % (IMAGE // SECTOR - 8)
        assert b.read(sector, 8) == data[sector * SECTOR : sector * SECTOR + 4096]
    assert rig.entries - before <= 5


def test_without_the_loop_the_same_requests_give_the_same_answers(image):
    """The Python device loop is still whole (a device whose queues are not all on the
    native plane uses it): same reads, same writes, with the loop turned off."""
    path, data = image
    r = Rig(path)
    r.dev.serve_parked = lambda ep: False
    try:
        b = BlkDriver.open(r.drv)
        assert b.write(8, b"\xab" * 4096) == 0
        assert b.read(8, 8) == b"\xab" * 4096
        assert b.read(0, 8) == data[:4096]
    finally:
        r.close()


def test_a_kick_while_stopped_is_left_for_after_the_resume(rig, image):
    """A VMM stop reaches the parked thread (borrowed or as a command); the kick that
    follows is not served, nothing is fetched, until the resume; then exactly once."""
    _, data = image
    BlkDriver.open(rig.drv)
    q = rig.dev.queues[0]
    for policy in ("report", "drain"):
        rig.tr.vmm_stop(policy)
        assert rig.dev.run_state is RunState.STOPPED
        avail = q.state().next_avail
        token = rig.drv.queues[0].add([header(blk.T_IN, 16)], [4096, 1])
        rig.drv.kick(0)
        time.sleep(0.2)
        assert q.state().next_avail == avail
        with pytest.raises(TimeoutError):
            rig.drv.wait(0, 1, timeout=0.1)
        rig.tr.vmm_resume()
        (c,) = rig.drv.wait(0, 1)
        assert c.token == token and status_of(c) == 0
        assert c.data[:-1] == data[16 * SECTOR : 16 * SECTOR + 4096]
        assert rig.drv.queues[0].poll() == []


def test_a_bad_chain_in_the_loop_needs_a_reset_and_the_device_serves_again(rig, image):
    """A chain with no device-writable byte, met in the native loop: DEVICE_NEEDS_RESET
    (not a dead thread); after the driver's reset the device serves in the loop again."""
    _, data = image
    BlkDriver.open(rig.drv)
    wait_until(lambda: rig.entries >= 1)
    rig.drv.queues[0].add([header(blk.T_IN, 0)], [])
    rig.drv.kick(0)
    with pytest.raises(DeviceNeedsReset):
        rig.drv.wait(0, 1)
    assert rig.dev.run_state is RunState.BROKEN and rig.dev._thread.is_alive()
    b = BlkDriver.open(rig.drv)
    assert b.read(0, 8) == data[:4096]


def test_a_full_engine_backlog_is_served_in_the_loop(image):
    """An engine two requests deep and 48 reads in one kick: the loop stops popping when
    the engine is full and the backlog's end kicks it again, until every read is done."""
    path, data = image
    r = Rig(path, iodepth=2)
    try:
        BlkDriver.open(r.drv)
        tokens = {}
        for i in range(48):
            tokens[r.drv.queues[0].add([header(blk.T_IN, 8 * i)], [4096, 1])] = i
        r.drv.kick(0)
        done = r.drv.wait(0, 48)
        assert sorted(tokens[c.token] for c in done) == list(range(48))
        for c in done:
            i = tokens[c.token]
            assert status_of(c) == 0 and c.data[:-1] == data[i * 4096 : (i + 1) * 4096]
    finally:
        r.close()


def test_two_queues_are_both_served_by_the_loop(image):
    path, data = image
    r = Rig(path, num_queues=2)
    try:
        b = BlkDriver.open(r.drv)
        wait_until(lambda: r.entries >= 1)
        before = r.entries
        for i in range(50):
            assert b.read(8 * i, 8, qidx=i % 2) == data[i * 4096 : (i + 1) * 4096]
        assert r.entries - before <= 5
    finally:
        r.close()


def test_the_cache_mode_the_guest_writes_reaches_the_plane(rig):
    """The planes' mode follows the features and the WCE field when they change (it is
    no longer worked out once per pass)."""
    plane = rig.dev._planes[0]
    BlkDriver.open(rig.drv)
    assert not plane.mode & blk_native.MODE_WRITETHROUGH  # FLUSH negotiated, writeback 1
    assert plane.mode & blk_native.MODE_DISCARD and plane.mode & blk_native.MODE_WRITE_ZEROES
    rig.drv.config_write(blk.CONFIG_WRITEBACK, 1, 0)
    assert plane.mode & blk_native.MODE_WRITETHROUGH
    rig.drv.reset()
    assert plane.mode & blk_native.MODE_WRITETHROUGH  # reset: no features, so no FLUSH
    no_flush = rig.dev.features & ~(1 << blk.F_FLUSH | 1 << blk.F_DISCARD)
    BlkDriver.open(rig.drv, no_flush)
    assert plane.mode & blk_native.MODE_WRITETHROUGH and not plane.mode & blk_native.MODE_DISCARD


def test_a_stop_asked_from_the_interrupt_keeps_its_deadline(nbd_server, tmp_path):
    """A VMM that asks for a report stop from its interrupt callback (so on the device
    thread, inline, while the C wait publishes a read) with a write still at storage that
    answers in 3 s: the stop's deadline (stop_timeout 0.3 s) fails the device in time,
    rather than the wait sleeping until the write comes back."""
    uri = nbd_server(filters=["delay"], params=["wdelay=3000ms"]).uri
    dev = BlkDevice(uri, plane="native", stop_timeout=0.3)
    armed = threading.Event()

    def irq(level: int) -> None:
        if level and armed.is_set():
            armed.clear()
            dev.request_stop("report")

    mem = GuestMemory.create(8 << 20)
    try:
        drv = VirtioMmioDriver(MmioTransport(dev, mem, irq=irq), mem)
        b = BlkDriver.open(drv)
        b.submit(blk.T_OUT, 0, b"w" * 4096)
        wait_until(lambda: dev.queues[0].held() == 1)
        armed.set()
        b.submit(blk.T_IN, 8, in_size=4096)
        wait_until(lambda: dev.run_state is not RunState.RUNNING)
        wait_until(lambda: dev.run_state is RunState.BROKEN, timeout=2.0)
        assert "unanswered" in dev.broken
    finally:
        dev.close()
        mem.close()
