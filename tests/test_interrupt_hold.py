"""Held interrupts (VirtioDevice.hold_interrupts, Virtqueue.interrupt): a used-buffer
interrupt may wait up to the hold so that what the driver submits meanwhile is answered by
the same one; a hold that saw no kick backs off; nothing held outlives a stop, a ring stop
(vhost-user GET_VRING_BASE) or a reset."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from modes import wait_until

from emu.devices.base import MAX_HOLD
from emu.devices.blk import S_OK, SERVED_HOLD_US, T_IN, BlkDevice
from emu.devices.registry import SpecError, make_devices
from emu.memory import GuestMemory
from emu.queue import HOLD_BACKOFF_MAX, Gate, Virtqueue
from emu.testing.blk import BlkDriver, status_of
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer

_loop = pytest.importorskip("emu.devices._loop", reason="emu.devices._loop is not built")

#: a hold no test outlives: what goes out goes out because of a kick, a stop or a reset
FOREVER = 3600.0


# -- the policy, on a queue of its own --


class Policy:
    """A queue with a hold and no device: interrupts and alarms are counted."""

    def __init__(self) -> None:
        self.q = Virtqueue(0, 8)
        self.q.hold = 1.0
        self.alarms: list[float] = []
        self.sent = 0
        self.q.arm_hold = self.alarms.append
        self.q.notify = self._sent

    def _sent(self) -> None:
        self.sent += 1

    def held(self) -> bool:
        """One interrupt asked for: was it held (not sent)?"""
        before = self.sent
        self.q.interrupt()
        return self.sent == before


def test_an_interrupt_is_held_until_flushed_and_the_alarm_is_set_for_its_deadline() -> None:
    p = Policy()
    t0 = time.monotonic()
    assert p.held()
    assert p.q.interrupt_due() is not None and p.alarms == [p.q.interrupt_due()]
    assert t0 + 1.0 <= p.alarms[0] <= time.monotonic() + 1.0
    assert p.held()  # a second one while held: covered by the first
    assert len(p.alarms) == 1
    p.q.flush_interrupt()
    assert p.sent == 1 and p.q.interrupt_due() is None
    p.q.flush_interrupt()  # nothing held: nothing sent
    assert p.sent == 1


def test_holds_no_kick_came_into_back_off_and_a_kicked_one_resets() -> None:
    p = Policy()
    pattern = []
    for _ in range(40):
        if p.held():
            pattern.append("H")
            p.q.flush_interrupt()  # ran out with no kick
        else:
            pattern.append(".")
    # held, then sent at once for 1, 2, 4, 8 ... interrupts
    assert "".join(pattern) == "H.H..H....H........H................H..."
    while not p.held():  # the back-off runs out; then a kick comes into the hold
        pass
    p.q.begin_pass()  # a kick: the hold was worth it
    p.q.flush_interrupt()
    assert p.held()  # no back-off after a hold that saw a kick
    p.q.flush_interrupt()


def test_the_back_off_is_bounded() -> None:
    p = Policy()
    longest = run = 0
    for _ in range(20 * HOLD_BACKOFF_MAX):
        if p.held():
            p.q.flush_interrupt()
            run = 0
        else:
            run += 1
            longest = max(longest, run)
    assert longest == HOLD_BACKOFF_MAX


@pytest.mark.parametrize("gate", [Gate.HALT, Gate.CLOSED])
def test_a_queue_that_is_not_open_sends_at_once(gate: Gate) -> None:
    p = Policy()
    p.q.gate = gate
    assert not p.held()


def test_no_hold_without_an_alarm_or_with_hold_zero() -> None:
    p = Policy()
    p.q.arm_hold = None
    assert not p.held()
    p = Policy()
    p.q.hold = 0.0
    assert not p.held()


def test_a_reset_forgets_the_held_interrupt_and_the_back_off() -> None:
    p = Policy()
    assert p.held()
    p.q.reset()
    p.q.flush_interrupt()
    assert p.sent == 0  # the driver starts over: nothing is owed to it
    assert p.held()  # and no back-off is carried over


# -- the alarm --


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_the_alarm_fires_at_the_sooner_deadline_and_clear_quietens_it() -> None:
    alarm = _loop.HoldTimer()
    try:
        now = time.monotonic()
        alarm.arm(now + FOREVER)
        alarm.arm(now + 0.005)  # sooner: replaces
        assert readable(alarm.fd, 10.0)
        alarm.clear()
        assert not readable(alarm.fd, 0)
        now = time.monotonic()
        alarm.arm(now + 0.005)
        alarm.arm(now + FOREVER)  # later: the sooner one stands
        assert readable(alarm.fd, 10.0)
        alarm.clear()
    finally:
        alarm.close()


# -- a blk device behind the in-process transport --


class Served:
    """BlkDevice + the reference driver; every interrupt queue 0 sends is timed."""

    def __init__(self, tmp_path: Path, hold: float, *, event_idx: bool = False) -> None:
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(1 << 20))
        self.dev = BlkDevice(img)
        self.dev.hold_interrupts(min(hold, MAX_HOLD))
        self.mem = GuestMemory.create(8 << 20)
        transport = MmioTransport(self.dev, self.mem, stop_feature_bit=mmio_regs.F_EMU_STOP)
        self.drv = VirtioMmioDriver(transport, self.mem)
        self.blk = BlkDriver.open(self.drv, event_idx=event_idx)
        q = self.q = self.dev.queues[0]
        if hold > MAX_HOLD:
            q.hold = hold  # longer than the API allows: nothing runs out during the test
        self.sent: list[float] = []
        transport_notify = q.notify

        def timed() -> None:
            self.sent.append(time.monotonic())
            transport_notify()

        q.notify = timed

    def read_visible(self) -> None:
        """Submit a read, kick, and wait until its used entry is in the ring (polled)."""
        self.blk.submit(T_IN, 0, in_size=512)
        self.drv.kick(0)
        done: list = []
        wait_until(lambda: bool(done.extend(self.drv.queues[0].poll()) or done))
        assert [status_of(c) for c in done] == [S_OK]

    def close(self) -> None:
        self.drv.reset()
        self.dev.close()
        self.mem.close()


@contextmanager
def served(tmp_path: Path, hold: float, **kw) -> Iterator[Served]:
    s = Served(tmp_path, hold, **kw)
    try:
        yield s
    finally:
        s.close()


def test_a_held_interrupt_goes_out_when_the_hold_runs_out(tmp_path: Path) -> None:
    with served(tmp_path, MAX_HOLD) as s:
        kicked = time.monotonic()
        s.read_visible()
        wait_until(lambda: s.sent)
        assert s.sent[0] - kicked >= MAX_HOLD  # the alarm cannot fire before its deadline


def test_without_a_hold_the_interrupt_goes_out_with_the_used_entry(tmp_path: Path) -> None:
    with served(tmp_path, 0.0) as s:
        s.read_visible()
        wait_until(lambda: s.sent)
        assert len(s.sent) == 1


def test_a_kick_during_the_hold_is_answered_by_the_same_interrupt(tmp_path: Path) -> None:
    with served(tmp_path, FOREVER) as s:
        s.read_visible()
        s.read_visible()  # its kick comes into the hold
        s.read_visible()
        assert s.sent == []
        assert s.q._kicked
        s.dev.stop("drain")
        assert len(s.sent) == 1  # one interrupt for the three, sent by the stop


def test_a_held_interrupt_goes_out_before_stopped_is_reported(tmp_path: Path) -> None:
    with served(tmp_path, FOREVER) as s:
        s.read_visible()
        assert s.sent == []
        s.drv.stop()  # the driver's STOP: the device quiesces, then reports STOPPED
        assert len(s.sent) == 1
        s.drv.resume()
        s.read_visible()  # serving again, holding again
        s.dev.stop("report")
        assert len(s.sent) == 2


def test_a_reset_drops_the_held_interrupt(tmp_path: Path) -> None:
    with served(tmp_path, FOREVER) as s:
        s.read_visible()
        s.drv.reset()
        wait_until(lambda: s.q.interrupt_due() is None)
        assert s.sent == []


def test_a_closing_device_drops_what_it_held_and_its_alarm(tmp_path: Path) -> None:
    s = Served(tmp_path, FOREVER)
    try:
        s.read_visible()
        s.dev.close()  # a reset, then its thread ends
        assert s.sent == [] and s.q.interrupt_due() is None and s.q.arm_hold is None
    finally:
        s.mem.close()


# -- vhost-user: GET_VRING_BASE --


def test_get_vring_base_sends_the_held_interrupt_first(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    dev = BlkDevice(img)
    server = VhostUserServer(dev, tmp_path / "vu.sock").start()
    fe = VhostUserDriver(tmp_path / "vu.sock")
    try:
        blk = BlkDriver.open(fe, event_idx=False)
        dev.queues[0].hold = FOREVER
        blk.submit(T_IN, 0, in_size=512)
        fe.kick(0)
        done: list = []
        wait_until(lambda: bool(done.extend(fe.queues[0].poll()) or done))
        call = fe._calls[0]
        wait_until(lambda: dev.queues[0].interrupt_due() is not None)
        assert not readable(call, 0)  # held: the used entry is there, the call is not
        fe.stop_ring(0)
        assert readable(call, 0)  # written before the reply to GET_VRING_BASE
    finally:
        fe.close()
        server.close()
        dev.close()


# -- the spec option --


def test_served_blk_holds_by_default_and_hold_sets_it(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    (dev,) = make_devices([f"blk:{img}"])
    (off,) = make_devices([f"blk:{img},hold=0"])
    (most,) = make_devices([f"blk:{img},hold={int(MAX_HOLD * 1e6)}"])
    try:
        assert [q.hold for q in dev.queues] == [SERVED_HOLD_US * 1e-6]
        assert off.queues[0].hold == 0.0
        assert most.queues[0].hold == pytest.approx(MAX_HOLD)
        assert BlkDevice(img).queues[0].hold == 0.0  # the Python API holds nothing unasked
    finally:
        for d in (dev, off, most):
            d.close()


@pytest.mark.parametrize("value", ["-1", "abc", "", "1e3", str(int(MAX_HOLD * 1e6) + 1)])
def test_a_bad_hold_is_refused(tmp_path: Path, value: str) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    with pytest.raises(SpecError, match="hold="):
        make_devices([f"blk:{img},hold={value}"])


@pytest.mark.parametrize("seconds", [-1e-6, MAX_HOLD * 2])
def test_hold_interrupts_refuses_what_is_out_of_range(tmp_path: Path, seconds: float) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    dev = BlkDevice(img)
    try:
        with pytest.raises(ValueError, match="interrupt hold"):
            dev.hold_interrupts(seconds)
    finally:
        dev.close()
