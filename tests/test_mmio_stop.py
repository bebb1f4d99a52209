"""Stopping a virtio-blk device through virtio-mmio: STOP, SUSPEND, the VMM's stop, save/restore.

Requests stay in flight for a while: each queue's ``latency`` (the delay backend model)
publishes used entries that long after the request ran. A report-mode stop withdraws them
and they run again after resume or restore; ``PARKED`` keeps them from ever completing on
their own, so "N in flight" holds without depending on timing.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emu.devices.base import RunState
from emu.devices.blk import SECTOR, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.ringdefs import F_RING_PACKED, F_VERSION_1
from emu.state import file as state_file
from emu.state.format import StateError
from emu.testing.blk import BlkDriver, status_of
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.transport import mmio, mmio_regs
from emu.transport.mmio import MmioTransport

LATENCY = 0.01
PARKED = 3600.0  # completions that never come by themselves
RAM = 16 << 20
DISK = 1 << 20
CONFIG_WRITEBACK = 32  # virtio_blk_config.writeback


class Rig:
    """blk device over a file, transport, reference driver; records the interrupt line."""

    def __init__(self, tmp_path, packed: bool, mem: GuestMemory, **transport_kw) -> None:
        self.tmp_path = tmp_path
        self.packed = packed
        self.mem = mem
        self.disk = tmp_path / "disk.img"
        if not self.disk.exists():
            self.disk.write_bytes(bytes(DISK))
        self.levels: list[int] = []
        self.dev, self.t = self.make_transport(**transport_kw)
        self.drv = VirtioMmioDriver(self.t, mem)
        self.blk: BlkDriver | None = None

    def make_transport(self, **kw) -> tuple[BlkDevice, MmioTransport]:
        """The STOP extension is offered here (at its usual bit) unless ``kw`` says not."""
        dev = BlkDevice(self.disk)
        for q in dev.queues:
            hold_completions(q, LATENCY)
        kw.setdefault("stop_feature_bit", mmio_regs.F_EMU_STOP)
        return dev, MmioTransport(dev, self.mem, irq=self.levels.append, **kw)

    def open(self, features: int | None = None, queue_size: int | None = 8) -> BlkDriver:
        self.blk = BlkDriver.open(self.drv, features, packed=self.packed, queue_size=queue_size)
        return self.blk

    @property
    def q(self):
        return self.dev.queues[0]

    def latency(self, seconds: float) -> None:
        for q in self.dev.queues:
            hold_completions(q, seconds)

    def write(self, sector: int, tag: int) -> int:
        """Submit (and kick) a one-sector write of a recognisable pattern; its token."""
        return self.blk.submit(T_OUT, sector, out=pattern(tag))

    def wait_fetched(self, n: int) -> None:
        """Until the device has fetched ``n`` chains from a fresh ring (test-side peek)."""
        deadline = time.monotonic() + 5
        while self.q.state().next_avail < n:
            assert time.monotonic() < deadline, "device never fetched the requests"
            time.sleep(0.001)

    def ram(self) -> bytes:
        return bytes(self.mem.regions[0].array)

    def close(self) -> None:
        self.t.write(mmio_regs.STATUS, 4, 0)
        self.dev.close()


def pattern(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (SECTOR // 4)


def on_disk(rig: Rig, sector: int) -> bytes:
    with open(rig.disk, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(SECTOR)


def collect(drv: VirtioMmioDriver, tokens: list[int]) -> list[int]:
    """Wait for exactly these requests; each must complete once, with status OK."""
    done = drv.wait(0, len(tokens))
    assert sorted(c.token for c in done) == sorted(tokens)
    assert all(status_of(c) == 0 for c in done)
    return [c.token for c in done]


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request):
    return request.param


@pytest.fixture
def mem():
    m = GuestMemory.create(RAM)
    yield m
    m.close()


@pytest.fixture
def rig(tmp_path, packed, mem):
    r = Rig(tmp_path, packed, mem, stop_policy="report")
    yield r
    r.close()


@pytest.fixture
def drain_rig(tmp_path, packed, mem):
    r = Rig(tmp_path, packed, mem, stop_policy="drain")
    yield r
    r.close()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == mmio.__name__]


# -- the STOP status bit --


def test_report_stop_is_immediate_and_reports_what_is_in_flight(rig):
    rig.open()
    rig.latency(PARKED)
    tokens = [rig.write(i, i) for i in range(5)]
    rig.wait_fetched(5)
    rig.drv.stop()  # returns although no request could complete
    assert rig.drv.status & mmio_regs.S_STOP
    assert rig.drv.inflight(0) == 5
    assert rig.drv.queues[0].poll() == []  # nothing was used
    rig.latency(LATENCY)
    rig.drv.resume()
    assert not rig.drv.status & mmio_regs.S_STOP
    collect(rig.drv, tokens)
    assert all(on_disk(rig, i) == pattern(i) for i in range(5))


def test_drain_stop_completes_everything_before_stop_reads_set(drain_rig):
    rig = drain_rig
    rig.open()
    tokens = [rig.write(i, 10 + i) for i in range(5)]
    rig.wait_fetched(5)
    rig.drv.stop()
    assert rig.drv.inflight(0) == 0
    done = rig.drv.queues[0].poll()  # already used: no wait, no interrupt needed
    assert sorted(c.token for c in done) == tokens
    rig.drv.resume()
    (token,) = [rig.write(7, 77)]
    collect(rig.drv, [token])
    assert on_disk(rig, 7) == pattern(77)


@pytest.mark.parametrize("how", ["stop-report", "stop-drain", "vmm-report", "vmm-drain"])
def test_stopped_device_writes_nothing_raises_nothing_and_serves_kicks_after(rig, how):
    rig.open()
    before = [rig.write(i, i) for i in range(3)]
    interface, policy = how.split("-")
    rig.wait_fetched(3)
    if interface == "stop":
        rig.t.stop_policy = policy
        rig.drv.stop()
    else:
        rig.t.vmm_stop(policy)
    # requests made available and kicked while stopped (the driver writes its ring now)
    dq = rig.drv.queues[0]
    new = [dq.add([bytes(16)], [1]) for _ in range(3)]
    ram, levels, isr = rig.ram(), list(rig.levels), rig.t.interrupt_status
    for _ in range(3):
        rig.drv.kick(0)
    time.sleep(0.05)  # give a misbehaving device every chance to touch guest RAM
    assert rig.ram() == ram
    assert rig.levels == levels and rig.t.interrupt_status == isr
    assert rig.dev.run_state is RunState.STOPPED
    if interface == "stop":
        rig.drv.resume()
    else:
        rig.t.vmm_resume()
    done = rig.drv.wait(0, 6)
    assert sorted(c.token for c in done) == before + new  # each exactly once
    assert rig.drv.queues[0].poll() == []
    assert all(on_disk(rig, i) == pattern(i) for i in range(3))


def test_ring_state_registers_match_the_queue_while_stopped(rig, caplog):
    rig.open(queue_size=8)
    for i in range(11):  # past the ring's end: packed wrap counters flip
        collect(rig.drv, [rig.write(i, i)])
    rig.latency(PARKED)
    tokens = [rig.write(20 + i, i) for i in range(3)]
    assert rig.drv.ring_state(0).next_avail == 0  # not stopped: reads 0 ...
    assert any("not stopped" in m for m in warnings(caplog))  # ... and says why
    deadline = time.monotonic() + 5
    while len(rig.q.state().inflight) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.drv.stop()
    want = rig.q.state()
    got = rig.drv.ring_state(0)
    assert (got.next_avail, got.next_used) == (want.next_avail, want.next_used)
    assert (want.next_avail, want.next_used) == ((14, 11) if not rig.packed else (6, 3))
    if rig.packed:
        assert (got.avail_wrap, got.used_wrap) == (want.avail_wrap, want.used_wrap) == (0, 0)
    assert rig.drv.inflight(0) == len(want.inflight) == 3
    rig.latency(LATENCY)
    rig.drv.resume()
    collect(rig.drv, tokens)


def test_ring_state_written_before_driver_ok_continues_a_fresh_device(drain_rig):
    rig = drain_rig
    rig.open(queue_size=8)
    for i in range(11):
        collect(rig.drv, [rig.write(i, i)])
    rig.drv.stop()
    states = {0: rig.drv.ring_state(0)}
    rig.close()  # the old device goes; its rings stay in guest RAM
    rig.dev, rig.t = rig.make_transport()
    drv = VirtioMmioDriver.load(rig.t, rig.mem, rig.drv.save())
    drv.reinit(states)
    assert rig.q.state().next_avail == states[0].next_avail
    rig.drv, rig.blk = drv, BlkDriver(drv)
    tokens = [rig.write(30 + i, 100 + i) for i in range(6)]  # wraps the ring again
    collect(drv, tokens)
    assert all(on_disk(rig, 30 + i) == pattern(100 + i) for i in range(6))


def test_stop_refused_without_the_feature_or_before_driver_ok(tmp_path, packed, mem, caplog):
    rig = Rig(tmp_path, packed, mem)
    try:
        features = 1 << F_VERSION_1 | (1 << F_RING_PACKED if packed else 0)
        rig.drv.init(features | 1 << mmio_regs.F_EMU_STOP, packed=packed)
        before = rig.t.status
        rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_STOP)  # before DRIVER_OK
        assert rig.t.status == before and rig.dev.run_state is RunState.IDLE
        rig.drv.init(features, packed=packed)
        rig.drv.setup_queue(0, 8)
        rig.drv.driver_ok()
        rig.blk = BlkDriver(rig.drv)
        before = rig.t.status
        rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_STOP)  # not negotiated
        msgs = warnings(caplog)
        assert any("STOP ignored: DRIVER_OK is not set" in m for m in msgs)
        assert any("STOP ignored: its feature was not negotiated" in m for m in msgs)
        assert rig.t.status == before
        assert rig.dev.run_state is RunState.RUNNING
        collect(rig.drv, [rig.write(1, 1)])
    finally:
        rig.close()


def test_stop_is_offered_only_when_asked(tmp_path, packed, mem, caplog):
    """The STOP extension is experimental: a transport built without stop_feature_bit
    offers SUSPEND but neither STOP nor the ring-state registers."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(DISK))
    dev = BlkDevice(disk)
    t = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(t, mem)
    try:
        assert t.offered_features >> mmio_regs.F_SUSPEND & 1
        assert not t.offered_features & 0x3F << 44  # nothing in the future-transport range
        asked = 1 << F_VERSION_1 | 1 << mmio_regs.F_EMU_STOP  # a driver that insists on STOP
        for value in (0, 1, 3):
            t.write(mmio_regs.STATUS, 4, value)
        for sel in (0, 1):
            t.write(mmio_regs.DRIVER_FEATURES_SEL, 4, sel)
            t.write(mmio_regs.DRIVER_FEATURES, 4, asked >> 32 * sel & 0xFFFFFFFF)
        t.write(mmio_regs.STATUS, 4, 0xB)
        assert not t.read(mmio_regs.STATUS, 4) & mmio_regs.S_FEATURES_OK
        BlkDriver.open(drv, packed=packed, queue_size=8)
        assert not drv.features >> mmio_regs.F_EMU_STOP & 1
        caplog.clear()
        t.write(mmio_regs.STATUS, 4, drv.status | mmio_regs.S_STOP)
        assert any("STOP ignored: its feature was not negotiated" in m for m in warnings(caplog))
        assert not t.status & mmio_regs.S_STOP and dev.run_state is RunState.RUNNING
        drv.suspend()  # virtio 1.4 SUSPEND stays on
        caplog.clear()
        t.write(mmio_regs.QUEUE_SEL, 4, 0)
        assert t.read(mmio_regs.QUEUE_RING_STATE, 4) == 0 and warnings(caplog)
        drv.resume()
    finally:
        t.write(mmio_regs.STATUS, 4, 0)
        dev.close()


def test_stop_feature_bit_is_configurable(tmp_path, packed, mem):
    rig = Rig(tmp_path, packed, mem, stop_feature_bit=45)
    rig.drv.stop_feature_bit = 45
    try:
        rig.open()
        assert rig.drv.features >> 45 & 1 and not rig.drv.features >> mmio_regs.F_EMU_STOP & 1
        rig.drv.stop()
        rig.drv.resume()
        collect(rig.drv, [rig.write(2, 2)])
    finally:
        rig.close()
    with pytest.raises(ValueError):
        MmioTransport(rig.dev, mem, stop_feature_bit=mmio_regs.F_SUSPEND)


@pytest.fixture
def blk(tmp_path: Path) -> Iterator[BlkDevice]:
    disk = tmp_path / "bits.img"
    disk.write_bytes(bytes(DISK))
    dev = BlkDevice(disk)
    yield dev
    dev.close()


def test_stop_feature_bit_refused_where_taken_or_out_of_range(
    blk: BlkDevice, mem: GuestMemory
) -> None:
    """The bit is the transport's: it must not shadow a device feature or SUSPEND, and
    must fit the 64 feature bits; the free bits around the refused ones are accepted."""
    device_bits = [b for b in range(64) if blk.features >> b & 1]
    assert F_VERSION_1 in device_bits and min(device_bits) < 32  # a device bit of each word
    for bit in [min(device_bits), F_VERSION_1, mmio_regs.F_SUSPEND, 64, 65, -1]:
        with pytest.raises(ValueError, match=f"stop feature bit {bit} is taken or out of range"):
            MmioTransport(blk, mem, stop_feature_bit=bit)
    for bit in (44, mmio_regs.F_EMU_STOP, 49, 63):
        assert bit not in device_bits
        t = MmioTransport(blk, mem, stop_feature_bit=bit)
        assert t.offered_features >> bit & 1


@pytest.mark.parametrize("other", [None, 45], ids=["no-bit", "bit45"])
def test_snapshot_with_stop_restores_only_where_the_same_bit_is_offered(
    rig: Rig, other: int | None
) -> None:
    """A driver that negotiated STOP at bit 47 would otherwise find its feature gone, or
    moved, under it after a restore."""
    rig.open()
    assert rig.drv.features >> mmio_regs.F_EMU_STOP & 1
    rig.latency(PARKED)
    tokens = [rig.write(i, 30 + i) for i in range(2)]
    rig.wait_fetched(2)
    rig.drv.stop()
    state, guest = rig.t.save(), rig.drv.save()
    rig.close()
    rig.dev, rig.t = rig.make_transport(stop_feature_bit=mmio_regs.F_EMU_STOP)

    dev, t = rig.make_transport(stop_feature_bit=other)
    try:
        with pytest.raises(StateError, match="driver_features .* are not all offered here"):
            t.restore(state)
        assert dev.run_state is RunState.IDLE and t.status == 0  # nothing applied
    finally:
        dev.close()

    rig.t.restore(state)
    rig.drv = VirtioMmioDriver.load(rig.t, rig.mem, guest)
    rig.blk = BlkDriver(rig.drv)
    assert rig.dev.stopped and rig.drv.status & mmio_regs.S_STOP
    assert rig.drv.inflight(0) == 2
    rig.latency(LATENCY)
    rig.drv.resume()
    collect(rig.drv, tokens)
    assert all(on_disk(rig, i) == pattern(30 + i) for i in range(2))


@pytest.mark.parametrize(
    "asked, holder",
    [("STOP", "stop"), ("STOP", "suspend"), ("STOP", "needs-reset"), ("SUSPEND", "needs-reset")],
)
def test_stop_or_suspend_ignored_while_held_or_broken(
    rig: Rig, caplog: pytest.LogCaptureFixture, asked: str, holder: str
) -> None:
    """A second stop request must not stack on one the device holds (STOP still stopping
    under a VMM stop, or SUSPEND), and a device that needs a reset cannot stop at all (it
    keeps presenting DEVICE_NEEDS_RESET, as a failed SUSPEND must)."""
    rig.open()
    if holder == "stop":  # the guest's STOP waits behind the VMM's: STOP still reads 0
        rig.t.vmm_stop()
        rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_STOP)
        assert rig.t.status & mmio_regs.S_STOP and not rig.drv.status & mmio_regs.S_STOP
    elif holder == "suspend":
        rig.drv.suspend()
    else:
        rig.dev.fail("test: the guest broke its ring")
        assert rig.drv.status & mmio_regs.S_DEVICE_NEEDS_RESET
    held, seen, run_state = rig.t.status, rig.drv.status, rig.dev.run_state
    caplog.clear()
    bit = mmio_regs.S_STOP if asked == "STOP" else mmio_regs.S_SUSPEND
    rig.t.write(mmio_regs.STATUS, 4, seen | bit)
    assert (rig.t.status, rig.drv.status) == (held, seen)
    assert rig.dev.run_state is run_state
    assert f"virtio-mmio: {asked} ignored: the device is stopped, stopping or needs a reset" in (
        warnings(caplog)
    )
    if holder == "needs-reset":
        assert rig.drv.status & mmio_regs.S_DRIVER_OK  # not suspended, not stopped
        return  # only a reset (rig.close) brings it back
    if holder == "stop":
        rig.t.vmm_resume()  # now the guest gets the one stop it asked for
        rig.drv.stop()
    rig.drv.resume()
    collect(rig.drv, [rig.write(5, 5)])


@pytest.mark.parametrize("how", ["stop", "vmm"])
def test_config_change_while_stopped_is_announced_on_resume(rig: Rig, how: str) -> None:
    """Held back, not lost: the driver learns of the change once the device runs again."""
    rig.open()
    if how == "stop":
        rig.drv.stop()
    else:
        rig.t.vmm_stop()
    levels = list(rig.levels)
    rig.dev.on_config_change()  # e.g. a backend resize
    assert not rig.t.interrupt_status & mmio_regs.INT_CONFIG and rig.levels == levels
    if how == "stop":
        rig.drv.resume()
    else:
        rig.t.vmm_resume()
    assert rig.t.interrupt_status & mmio_regs.INT_CONFIG


def test_config_writes_ignored_while_stop_is_held(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped device's config is frozen, as under SUSPEND: the snapshot taken now is
    the config the device stopped with."""
    rig.open()
    assert rig.t.read(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1) == 1
    rig.drv.stop()
    caplog.clear()
    rig.t.write(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1, 0)
    assert rig.t.read(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1) == 1
    assert any("config write" in m and "while stopped ignored" in m for m in warnings(caplog))
    rig.drv.resume()
    rig.t.write(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1, 0)
    assert rig.t.read(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1) == 0


# -- virtio 1.4 SUSPEND --


def test_suspend_drains_then_presents_suspend_without_driver_ok(rig, caplog):
    rig.open()  # stop_policy "report": SUSPEND drains all the same
    tokens = [rig.write(i, 50 + i) for i in range(4)]
    rig.wait_fetched(4)
    rig.drv.suspend()
    status = rig.drv.status
    assert status & mmio_regs.S_SUSPEND and not status & mmio_regs.S_DRIVER_OK
    assert sorted(c.token for c in rig.drv.queues[0].poll()) == tokens
    # config writes are ignored while suspended; clearing SUSPEND is not the way back
    rig.t.write(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1, 0)
    assert rig.t.read(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1) == 1
    rig.t.write(mmio_regs.STATUS, 4, status & ~mmio_regs.S_SUSPEND)
    assert rig.drv.status == status
    assert any("config write" in m for m in warnings(caplog))
    rig.drv.resume()  # DRIVER_OK
    status = rig.drv.status
    assert status & mmio_regs.S_DRIVER_OK and not status & mmio_regs.S_SUSPEND
    rig.t.write(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1, 0)
    assert rig.t.read(mmio_regs.CONFIG + CONFIG_WRITEBACK, 1) == 0
    collect(rig.drv, [rig.write(9, 9)])


def test_suspend_ignored_without_feature_or_before_driver_ok(tmp_path, packed, mem, caplog):
    rig = Rig(tmp_path, packed, mem)
    try:
        features = 1 << F_VERSION_1 | (1 << F_RING_PACKED if packed else 0)
        rig.drv.init(features | 1 << mmio_regs.F_SUSPEND, packed=packed)
        rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_SUSPEND)
        assert not rig.drv.status & mmio_regs.S_SUSPEND
        rig.drv.init(features, packed=packed)
        rig.drv.setup_queue(0, 8)
        rig.drv.driver_ok()
        rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_SUSPEND)
        assert (
            rig.drv.status & (mmio_regs.S_SUSPEND | mmio_regs.S_DRIVER_OK) == mmio_regs.S_DRIVER_OK
        )
        msgs = warnings(caplog)
        assert any("SUSPEND ignored: DRIVER_OK is not set" in m for m in msgs)
        assert any("SUSPEND ignored: its feature was not negotiated" in m for m in msgs)
        rig.blk = BlkDriver(rig.drv)
        collect(rig.drv, [rig.write(3, 3)])
    finally:
        rig.close()


def test_config_change_while_suspended_is_announced_on_resume(rig):
    rig.open()
    rig.drv.suspend()
    rig.dev.on_config_change()  # e.g. a backend resize
    assert rig.t.interrupt_status == 0
    rig.drv.resume()
    assert rig.t.interrupt_status & mmio_regs.INT_CONFIG


# -- the VMM's stop, save and restore --


def test_vmm_stop_is_invisible_to_the_guest(rig):
    rig.open()
    status = rig.drv.status
    rig.latency(PARKED)
    tokens = [rig.write(i, i) for i in range(3)]
    rig.wait_fetched(3)
    rig.t.vmm_stop("report")
    assert rig.dev.stopped
    assert rig.drv.status == status  # no STOP, DRIVER_OK still set
    assert rig.drv.ring_state(0).next_avail == 0  # the guest did not stop anything
    tokens += [rig.write(3 + i, 3 + i) for i in range(2)]  # an unmodified driver carries on
    assert rig.drv.status == status
    rig.latency(LATENCY)
    rig.t.vmm_resume()
    collect(rig.drv, tokens)


def test_guest_stop_during_a_vmm_stop_waits_for_vmm_resume(drain_rig):
    rig = drain_rig
    rig.open()
    rig.t.vmm_stop()
    rig.t.write(mmio_regs.STATUS, 4, rig.drv.status | mmio_regs.S_STOP)
    assert not rig.drv.status & mmio_regs.S_STOP  # still "stopping" as far as the guest knows
    rig.t.vmm_resume()
    rig.drv.stop()  # now the guest's own stop completes
    rig.t.vmm_stop()
    rig.t.vmm_resume()  # the guest still holds it
    assert rig.dev.stopped
    rig.drv.resume()
    collect(rig.drv, [rig.write(4, 4)])


@pytest.mark.parametrize("how", ["vmm", "stop", "suspend"])
def test_save_and_restore_into_a_fresh_transport_and_device(rig, how):
    rig.open()
    collect(rig.drv, [rig.write(0, 1)])
    rig.latency(LATENCY if how == "suspend" else PARKED)  # SUSPEND always drains
    tokens = [rig.write(1 + i, 1 + i) for i in range(4)]
    rig.wait_fetched(5)
    if how == "vmm":
        rig.t.vmm_stop("report")
    elif how == "stop":
        rig.drv.stop()
    else:
        rig.drv.suspend()
        assert sorted(c.token for c in rig.drv.queues[0].poll()) == tokens
        tokens = []
    state = rig.t.save()
    guest = rig.drv.save()
    rig.close()

    rig.dev, rig.t = rig.make_transport(stop_policy="report")
    rig.t.restore(state)
    drv = VirtioMmioDriver.load(rig.t, rig.mem, guest)
    rig.drv, rig.blk = drv, BlkDriver(drv)
    if how == "vmm":
        assert rig.dev.run_state is RunState.RUNNING
    else:
        assert rig.dev.stopped and drv.status & (mmio_regs.S_STOP | mmio_regs.S_SUSPEND)
        drv.resume()
    tokens.append(rig.write(10, 10))
    collect(drv, tokens)
    assert drv.queues[0].poll() == []
    assert [on_disk(rig, i) for i in (0, 1, 2, 3, 4, 10)] == [
        pattern(i) for i in (1, 1, 2, 3, 4, 10)
    ]


def test_restore_refuses_a_state_from_another_transport_version(rig, mem):
    rig.open()
    rig.t.vmm_stop()
    state = rig.t.save()
    dev = BlkDevice(rig.disk)
    try:
        with pytest.raises(Exception, match="version"):
            MmioTransport(dev, mem, version=1).restore(state)
        assert dev.run_state is RunState.IDLE
    finally:
        dev.close()
    rig.t.vmm_resume()


CHILD = textwrap.dedent(
    """
    import json, pickle, sys
    from emu.devices.blk import BlkDevice
    from emu.memory import GuestMemory
    from emu.state import file as state_file
    from emu.testing.blk import BlkDriver, status_of
    from emu.testing.driver import VirtioMmioDriver
    from emu.transport.mmio import MmioTransport

    ram, ram_size, disk, state, guest = sys.argv[1:]
    mem = GuestMemory.create(int(ram_size), backing=ram)
    dev = BlkDevice(disk)
    t = MmioTransport(dev, mem, stop_feature_bit=47)  # the saved driver accepted it
    t.restore(state_file.load(state))
    with open(guest, "rb") as f:
        drv = VirtioMmioDriver.load(t, mem, pickle.load(f))
    blk = BlkDriver(drv)
    done = drv.wait(0, 4)
    more = blk.write(40, (0xABCD).to_bytes(4, "little") * 128)
    print(json.dumps({"tokens": [c.token for c in done],
                      "status": [status_of(c) for c in done], "more": more}))
    t.write(0x70, 4, 0)
    dev.close()
    """
)


def test_restore_in_a_fresh_process_over_file_backed_ram(tmp_path, packed):
    ram = tmp_path / "guest.ram"
    mem = GuestMemory.create(RAM, backing=ram)
    rig = Rig(tmp_path, packed, mem)
    try:
        rig.open()
        collect(rig.drv, [rig.write(0, 5)])
        rig.latency(PARKED)
        tokens = [rig.write(1 + i, 20 + i) for i in range(4)]
        rig.wait_fetched(4)
        rig.t.vmm_stop("report")
        state_file.save(tmp_path / "blk.state", rig.t.save())
        (tmp_path / "guest.pickle").write_bytes(pickle.dumps(rig.drv.save()))
    finally:
        rig.close()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(ram), str(RAM), str(rig.disk)]
        + [str(tmp_path / "blk.state"), str(tmp_path / "guest.pickle")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    mem.close()
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert sorted(out["tokens"]) == tokens and out["status"] == [0] * 4
    assert out["more"] == 0
    assert [on_disk(rig, i) for i in range(5)] == [pattern(5)] + [pattern(20 + i) for i in range(4)]
    assert on_disk(rig, 40) == pattern(0xABCD)


def test_a_clean_stop_and_resume_logs_nothing(rig, caplog):
    caplog.set_level(logging.WARNING)
    rig.open()
    rig.drv.stop()
    rig.drv.resume()
    assert warnings(caplog) == []
