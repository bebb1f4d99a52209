"""The reference driver against the echo device, end to end through the mmio transport."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import EchoDevice
from modes import RING_MODES

from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_NOTIFICATION_DATA, F_RING_PACKED
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.testing.driver_queue import DriverError, QueueFullError
from emu.testing.guest_alloc import GuestAllocator
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport


@pytest.fixture
def drv(echo, mem):
    d = VirtioMmioDriver(MmioTransport(echo, mem), mem)
    yield d
    d.reset()


def bring_up(d: VirtioMmioDriver, size: int = 16, **mode) -> None:
    d.init(**mode)
    d.setup_queue(0, size)
    d.setup_queue(1, size)
    d.driver_ok()


def payload(i: int) -> bytes:
    return bytes((i + k) & 0xFF for k in range(1 + i % 97))


@pytest.mark.parametrize("mode", RING_MODES)
def test_echo_many_requests_wraps_the_ring(drv, echo, mode):
    bring_up(drv, size=16, **mode)
    negotiated = drv.features
    assert bool(negotiated >> F_RING_PACKED & 1) == mode["packed"]
    assert bool(negotiated >> F_EVENT_IDX & 1) == mode["event_idx"]
    assert bool(negotiated >> F_INDIRECT_DESC & 1) == mode["indirect"]
    for i in range(100):  # 6 laps of a 16-entry ring, one request at a time
        out = payload(i)
        tok = drv.submit(0, [out[:3], out[3:]], [len(out) // 2, len(out)])
        (c,) = drv.wait(0)
        assert c.token == tok and c.length == len(out)
        assert c.data[: len(out)] == out


@pytest.mark.parametrize("mode", RING_MODES)
def test_echo_batches_fill_the_ring(drv, mode):
    bring_up(drv, size=8, **mode)
    q = drv.queues[1]
    expect = {}
    for rnd in range(12):
        batch = []
        while q.free_slots() >= 3:  # direct chains take 3 slots, indirect ones 1
            out = payload(rnd * 50 + len(batch))
            batch.append(drv.submit(1, [out], [5, len(out)]))
            expect[batch[-1]] = out
            if len(batch) == 8:
                break
        done = drv.wait(1, count=len(batch))
        assert [c.token for c in done] == batch  # the echo device completes in order
        for c in done:
            assert c.length == len(expect[c.token])
            assert (c.data[:5] + c.data[5:])[: c.length] == expect[c.token]


def test_legacy_transport_end_to_end(echo, mem):
    t = MmioTransport(echo, mem, version=1)
    d = VirtioMmioDriver(t, mem)
    features = d.init()
    assert not features >> 32 and features >> F_EVENT_IDX & 1
    assert t.guest_page_size == 4096
    bring_up(d, size=32)
    q = echo.queues[0]
    t.write(mmio_regs.QUEUE_SEL, 4, 0)
    assert t.read(mmio_regs.QUEUE_PFN, 4) == d.queues[0].desc // 4096
    assert (q.driver, q.device) == (d.queues[0].driver, d.queues[0].device)
    for i in range(70):
        out = payload(i)
        d.submit(0, [out], [len(out)])
        assert d.wait(0)[0].data == out
    with pytest.raises(DriverError):
        d.init(packed=True)
    d.reset()


def test_completions_beyond_count_are_kept_for_the_next_wait(drv):
    bring_up(drv)
    toks = [drv.submit(0, [bytes([i])], [1]) for i in range(4)]
    first = drv.wait(0, count=1)
    rest = drv.wait(0, count=3)
    assert [c.token for c in first + rest] == toks


def test_wait_times_out_without_losing_completions(drv):
    bring_up(drv)
    with pytest.raises(TimeoutError):
        drv.wait(0, timeout=0.05)
    tok = drv.submit(0, [b"late"], [4])
    assert drv.wait(0)[0].token == tok


def test_event_idx_suppresses_kicks_while_the_device_is_busy(drv, echo):
    """With EVENT_IDX the device asks for a kick only past avail_event; the driver honours it."""
    bring_up(drv, event_idx=True)
    q = drv.queues[0]
    q.add([b"a"], [1])
    assert q.kick_needed()  # the device's avail_event starts at 0
    assert not q.kick_needed()  # nothing new since
    drv.kick(0)
    drv.wait(0)


def test_notification_data(mem):
    dev = EchoDevice(device_features=1 << F_NOTIFICATION_DATA, queue_max_size=64)
    d = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    try:
        for packed in (False, True):
            bring_up(d, packed=packed)
            assert d.features >> F_NOTIFICATION_DATA & 1
            for i in range(40):
                d.submit(1, [payload(i)], [200])
                assert d.wait(1)[0].data[: len(payload(i))] == payload(i)
            d.reset()
    finally:
        dev.close()


def test_queue_full_and_buffer_reuse(drv):
    bring_up(drv, size=4, indirect=False)
    q = drv.queues[0]
    for _ in range(2):
        q.add([b"xy"], [2])
    with pytest.raises(QueueFullError):
        q.add([b"x"], [1, 1])
    assert q.free_slots() == 0
    drv.kick(0)
    drv.wait(0, count=2)
    high_water = drv.alloc.next
    for _ in range(50):  # same sizes again: buffers come from the free list
        drv.submit(0, [b"xy"], [2])
        drv.wait(0)
    assert drv.alloc.next == high_water


def test_allocator_bounds(mem):
    a = GuestAllocator(mem, start=0x1000, end=0x3000)
    assert a.alloc(0x10) == 0x1000
    assert a.alloc(0x10, align=0x1000) == 0x2000
    with pytest.raises(MemoryError):
        a.alloc(0x1000)
    assert GuestAllocator(mem).alloc(8) == 0x1000  # page 0 stays unused


@pytest.mark.parametrize("version", [2, 1], ids=["modern", "legacy"])
def test_config_space_through_the_driver(echo, mem, version):
    d = VirtioMmioDriver(MmioTransport(echo, mem, version=version), mem)
    assert d.config_read(0, 4) == EchoDevice.MAGIC
    d.config_write(4, 4, 0x1234)
    assert d.config_read(0, 8) == 0x1234 << 32 | EchoDevice.MAGIC


def test_irq_callback_is_chained_and_config_interrupts_are_counted(echo, mem):
    levels = []
    d = VirtioMmioDriver(MmioTransport(echo, mem, irq=levels.append), mem)
    bring_up(d)
    d.config_write(4, 4, 7)
    assert d.handle_interrupt() == mmio_regs.INT_CONFIG and d.config_interrupts == 1
    assert levels == [1, 0]
    d.reset()


def test_features_refused_raise(echo, mem, monkeypatch):
    d = VirtioMmioDriver(MmioTransport(echo, mem), mem)
    monkeypatch.setattr(echo, "accept_features", lambda f: False)
    with pytest.raises(DriverError, match="refused"):
        d.init()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_hostile_descriptor_makes_the_device_need_reset(drv, echo, packed):
    bring_up(drv, packed=packed, indirect=False)
    q = drv.queues[0]
    q.add([b"boom"], [4])  # the first chain starts at descriptor 0 in both formats
    drv.mem.write_int(q.desc, 8, 1 << 48)  # its buffer now lies far outside guest RAM
    drv.kick(0)
    with pytest.raises(DeviceNeedsReset):
        drv.wait(0)
    assert drv.status & mmio_regs.S_DEVICE_NEEDS_RESET
    assert echo.broken
    assert drv.config_interrupts == 1
    bring_up(drv, packed=packed)  # a reset brings the device back
    drv.submit(0, [b"fine"], [4])
    assert drv.wait(0)[0].data == b"fine"


def test_driver_runs_from_another_thread_than_the_device(drv):
    """The vCPU-side calls never do device work: requests complete on the device thread."""
    bring_up(drv)
    seen = []
    orig = drv.transport.device.handle_queue

    def spy(q):
        seen.append(threading.get_ident())
        orig(q)

    drv.transport.device.handle_queue = spy
    drv.submit(0, [b"t"], [1])
    drv.wait(0)
    assert seen and threading.get_ident() not in seen


def test_long_run_many_requests(drv):
    bring_up(drv, size=64, packed=True)
    sent: dict[int, bytes] = {}

    def collect(count: int) -> None:
        for c in drv.wait(0, count=count):
            assert c.data == sent.pop(c.token)

    for _ in range(2000):
        if drv.queues[0].free_slots() == 0:
            collect(len(sent))
        data = os.urandom(32)
        sent[drv.submit(0, [data], [32])] = data
    collect(len(sent))
