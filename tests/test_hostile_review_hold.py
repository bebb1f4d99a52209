"""Hostile review of held interrupts (``Virtqueue.interrupt``, ``VirtioDevice.hold_interrupts``,
the device loop's ``_loop.HoldTimer`` alarm, ``blk:FILE,hold=US``).

Defects found in review (each test failed on the reviewed commit):

* A device thread that cannot have its timerfd (a process out of fds) died before its
  loop: the device never served again and every command, ``close()`` too, waited for
  ever. Before the alarm, the same process served the device (one fd for the epoll).
* ``blk:FILE,hold=`` with more than 4300 digits (leading zeros will do) raised a bare
  ValueError from ``int`` instead of a SpecError: ``emu serve`` died with a traceback
  instead of naming the spec.
* A drain stop of one ring (vhost-user GET_VRING_BASE under the drain policy) blocks the
  device thread until the backend answered that ring's requests; an interrupt another
  ring held waited all that time (a second here, up to the backend's latency), far past
  ``MAX_HOLD``, though the ring it belongs to keeps running.

The rest are attacks that found nothing, kept because they can fail: held interrupts
across guest STOP (drain and report, split and packed, the stop borrowed by the vCPU
thread that holds the transport's lock), VMM stops racing I/O with a driver that only
looks at its rings when interrupted, device and queue resets mid-hold, vhost-user
GET_VRING_BASE, SET_VRING_CALL, SET_STATUS 0 and a disconnect mid-hold, several queues
holding on one alarm, a flood of kicks, the alarm's fd over device lifetimes, and the
``hold=`` spec.

Most tests make a hold that never runs out by itself (``_hold_forever``: the queue's
``hold`` set to an hour, past what ``hold_interrupts`` allows), so that only the path
under test can send what is held: no test depends on the 10 ms alarm winning or losing
a race.
"""

from __future__ import annotations

import math
import os
import random
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import EchoDevice
from modes import wait_until

from emu.devices.base import MAX_HOLD, RunState
from emu.devices.blk import SERVED_HOLD_US, T_IN, BlkDevice
from emu.devices.registry import SpecError, make_devices
from emu.memory import GuestMemory
from emu.ringdefs import DESC_F_USED
from emu.testing.blk import BlkDriver
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.protocol import U64, Req

_loop = pytest.importorskip("emu.devices._loop")  # no alarm, no hold

ROOT = Path(__file__).resolve().parents[1]
RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
DESC_F_AVAIL = 1 << 7


# -- helpers --


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


class Served:
    """An in-process blk behind virtio-mmio (STOP offered) and the reference driver;
    ``sent[i]``: interrupts queue ``i`` sent, ``states``: the device's state at each."""

    def __init__(self, disk: Path, queues: int = 1, plane: str | None = None, **kw: object):
        self.dev = BlkDevice(str(disk), num_queues=queues, plane=plane)
        self.dev.hold_interrupts(MAX_HOLD)
        self.mem = GuestMemory.create(16 << 20)
        self.transport = MmioTransport(
            self.dev,
            self.mem,
            stop_feature_bit=mmio_regs.F_EMU_STOP,
            stop_policy=kw.pop("policy", None),  # type: ignore[arg-type]
        )
        self.drv = VirtioMmioDriver(self.transport, self.mem)
        self.sent = [0] * queues
        self.states: list[RunState] = []
        self.threads: list[str] = []
        for q in self.dev.queues:
            q.notify = self._counting(q.index, q.notify)
        self.blk = BlkDriver.open(self.drv, **kw)  # type: ignore[arg-type]

    def _counting(self, index: int, inner):  # type: ignore[no-untyped-def]
        def notify() -> None:
            self.sent[index] += 1
            self.states.append(self.dev.run_state)
            self.threads.append(threading.current_thread().name)
            inner()

        return notify

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@contextmanager
def served(disk: Path, **kw: object) -> Iterator[Served]:
    s = Served(disk, **kw)  # type: ignore[arg-type]
    try:
        yield s
    finally:
        s.close()


def _hold_forever(q) -> None:  # type: ignore[no-untyped-def]
    """The next interrupt of ``q`` is held and its alarm does not ring within the test."""
    q.hold = 3600.0
    q._skip = q._backoff = 0


def held_request(s: Served, qidx: int = 0) -> None:
    """A read whose used entry is published and whose interrupt is held."""
    q = s.dev.queues[qidx]
    _hold_forever(q)
    before = s.sent[qidx]
    s.blk.submit(T_IN, 0, in_size=512, qidx=qidx)
    wait_until(lambda: q._owed_at is not None, 5.0)
    assert s.sent[qidx] == before


def unseen(dq, mem) -> bool:  # type: ignore[no-untyped-def]
    """The device used a buffer the driver has not collected."""
    if dq.packed:
        flags = mem.read_int(dq.desc + 16 * dq._next_used + 14, 2)
        used = bool(flags & DESC_F_USED)
        return used == bool(flags & DESC_F_AVAIL) == bool(dq._used_wrap)
    return mem.read_int(dq.device + 2, 2) != dq._last_used


def collect_by_interrupt(drv: VirtioMmioDriver, qidx: int, count: int) -> None:
    """Collect ``count`` completions looking at the ring only when interrupted (after
    the re-arm's own look, as Linux does): a used entry the device never announced is a
    guest that hangs."""
    dq = drv.queues[qidx]
    got = len(dq.poll())
    while got < count:
        if not drv._irq.wait(2.0):
            pytest.fail(
                f"queue {qidx}: no interrupt for 2 s with {got} of {count} completions "
                f"(used entries waiting unannounced: {unseen(dq, drv.mem)})"
            )
        drv._irq.clear()
        drv.handle_interrupt()
        got += len(dq.poll())


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def run_child(body: str, timeout: float = 20.0) -> str:
    """``body`` in a child process (what it tests can hang the interpreter for ever)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(body)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        return (out.decode() if isinstance(out, bytes) else out) + "\n(killed: timeout)"


# -- defects --


def test_a_device_thread_without_a_timerfd_still_serves() -> None:
    """One fd left when the device thread starts: its epoll takes it, the alarm's
    timerfd cannot be had. The device must serve all the same (holding nothing), as it
    did before the alarm existed, and close."""
    out = run_child(
        """
        import errno, os, resource, tempfile
        from emu.devices.blk import BlkDevice
        from emu.memory import GuestMemory
        from emu.testing.blk import BlkDriver
        from emu.testing.driver import VirtioMmioDriver
        from emu.transport.mmio import MmioTransport

        img = os.path.join(tempfile.mkdtemp(), "d.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        dev = BlkDevice(img)
        dev.hold_interrupts(0.001)
        mem = GuestMemory.create(16 << 20)
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
        filler = []
        try:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE
        os.close(filler.pop())  # one left: the device thread starts at the first reset
        blk = BlkDriver.open(drv)
        print("read", len(blk.read(0, 1)), flush=True)
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        dev.close()
        mem.close()
        print("closed", flush=True)
        """
    )
    assert "read 512" in out, out
    assert "closed" in out, out


def test_a_hold_of_more_digits_than_int_takes_is_a_spec_error(disk: Path) -> None:
    with pytest.raises(SpecError, match="hold="):
        make_devices([f"blk:{disk},hold=" + "9" * 5000])
    (dev,) = make_devices([f"blk:{disk},hold=" + "0" * 5000 + "1"])  # 1 us, as hold=01
    try:
        assert dev.queues[0].hold == pytest.approx(1e-6)
    finally:
        dev.close()


def test_a_drain_stop_of_one_ring_does_not_sit_on_another_rings_held_interrupt(
    tmp_path: Path,
) -> None:
    """vhost-user, drain policy: ring 1 has a request at a slow backend (1.5 s) and is
    stopped (SET_VRING_ENABLE 0, GET_VRING_BASE), which waits for it on the device
    thread. Ring 0 keeps running; what it held must go out before that wait, not after."""
    dev = EchoDevice(queue_max_size=64)
    dev.policy = "drain"
    hold_completions(dev.queues[1], 1.5)
    srv = VhostUserServer(dev, tmp_path / "echo.sock").start()
    fe = VhostUserDriver(srv.path)
    try:
        fe.init()
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        fe.driver_ok()
        fe.submit(1, [b"slow"], [4])
        wait_until(lambda: dev.queues[1].held() == 1, 5.0)
        q0 = dev.queues[0]
        _hold_forever(q0)
        fe.submit(0, [b"x"], [1])
        wait_until(lambda: q0._owed_at is not None, 5.0)
        stopper = threading.Thread(target=fe.stop_ring, args=(1,))
        stopper.start()
        try:
            wait_until(lambda: dev.queues[1].gate.value != "open", 5.0)
            assert fe.wait_call(0, 1.0), "ring 0's held interrupt waited for ring 1's drain"
            assert stopper.is_alive()  # (the drain was still under way)
        finally:
            stopper.join()
    finally:
        fe.close()
        srv.close()
        dev.close()


# -- attacks that found nothing --


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("policy", ["drain", "report"])
def test_a_guest_stop_sends_what_is_held_before_stopped_reads_back(
    disk: Path, policy: str, packed: bool
) -> None:
    """The stop is borrowed by the vCPU thread (the device thread is parked), which
    holds the transport's lock while it sends the held interrupt: no deadlock, the
    interrupt is pending when STOP reads back set, and nothing is sent while stopped."""
    with served(disk, policy=policy, packed=packed) as s:
        held_request(s)
        wait_until(lambda: not s.dev._owner.locked(), 5.0)  # parked: the stop is borrowed
        s.drv.stop()
        assert s.sent[0] == 1
        assert s.transport.interrupt_status & mmio_regs.INT_VRING
        assert s.dev.queues[0]._owed_at is None
        time.sleep(2 * MAX_HOLD)
        assert RunState.STOPPED not in s.states
        s.drv.resume()
        s.dev.hold_interrupts(MAX_HOLD)
        collect_by_interrupt(s.drv, 0, 1)
        for _ in range(5):
            s.blk.submit(T_IN, 8, in_size=4096)
            collect_by_interrupt(s.drv, 0, 1)


@pytest.mark.parametrize("packed", RINGS)
def test_suspend_and_a_vmm_stop_send_what_is_held_first(disk: Path, packed: bool) -> None:
    with served(disk, packed=packed) as s:
        held_request(s)
        s.transport.vmm_stop()
        assert s.sent[0] == 1
        s.transport.vmm_resume()
        s.drv.queues[0].poll()
        held_request(s)
        s.drv.suspend()  # virtio 1.4 SUSPEND: always a drain
        assert s.sent[0] == 2
        s.drv.resume()


@pytest.mark.parametrize(
    ("plane", "packed", "event_idx"),
    [
        ("native", False, True),
        ("native", True, True),
        ("native", False, False),
        ("python", False, True),
        ("python", True, False),
    ],
)
def test_vmm_stops_racing_requests_lose_no_interrupt(
    disk: Path, plane: str, packed: bool, event_idx: bool
) -> None:
    """A second thread (the VMM) stops and resumes the device behind the guest's back,
    both policies in turn, while the guest submits batches and looks at its ring only
    when interrupted; holds at MAX_HOLD, back-off as it comes."""
    with served(disk, plane=plane, packed=packed, event_idx=event_idx) as s:
        done = threading.Event()
        errors: list[BaseException] = []

        def vmm() -> None:
            r = random.Random(7)
            try:
                while not done.is_set():
                    s.transport.vmm_stop(r.choice(["drain", "report"]), timeout=5.0)
                    time.sleep(r.random() * 0.003)
                    s.transport.vmm_resume()
                    time.sleep(r.random() * 0.01)
            except BaseException as e:
                errors.append(e)

        racer = threading.Thread(target=vmm)
        racer.start()
        r = random.Random(3)
        try:
            end = time.monotonic() + 0.5
            while time.monotonic() < end and not errors:
                n = r.randint(1, 8)
                for i in range(n):
                    s.blk.submit(T_IN, i, in_size=512)
                collect_by_interrupt(s.drv, 0, n)
        finally:
            done.set()
            racer.join()
        assert not errors
        assert RunState.STOPPED not in s.states


def test_device_resets_mid_hold_send_nothing_once_reset(disk: Path) -> None:
    with served(disk) as s:
        for i in range(30):
            for k in range(4):
                s.blk.submit(T_IN, k, in_size=512)
            time.sleep(0.0005 * (i % 12))  # the hold is anywhere in its 10 ms
            s.drv.reset()
            assert s.transport.interrupt_status == 0
            s.blk = BlkDriver.open(s.drv)
        time.sleep(2 * MAX_HOLD)
        assert RunState.IDLE not in s.states
        assert s.transport.interrupt_status == 0
        held_request(s)
        s.drv.reset()
        assert s.dev.queues[0]._owed_at is None
        time.sleep(2 * MAX_HOLD)
        assert s.transport.interrupt_status == 0


def test_a_queue_reset_mid_hold_leaves_nothing_held(disk: Path) -> None:
    with served(disk) as s:
        held_request(s)
        s.drv._write(mmio_regs.QUEUE_SEL, 0)
        s.drv._write(mmio_regs.QUEUE_RESET, 1)
        wait_until(lambda: s.drv._read(mmio_regs.QUEUE_RESET) == 0, 5.0)
        assert s.dev.queues[0]._owed_at is None
        s.dev.hold_interrupts(MAX_HOLD)
        del s.drv.queues[0]
        s.drv.setup_queue(0)
        for _ in range(5):
            s.blk.submit(T_IN, 0, in_size=512)
            collect_by_interrupt(s.drv, 0, 1)


def test_queue_ready_0_mid_hold_sends_it(disk: Path) -> None:
    with served(disk) as s:
        held_request(s)
        s.drv._write(mmio_regs.QUEUE_SEL, 0)
        s.drv._write(mmio_regs.QUEUE_READY, 0)
        wait_until(lambda: not s.dev.queues[0].started, 5.0)
        assert s.sent[0] == 1


def test_several_queues_hold_on_one_alarm(disk: Path) -> None:
    with served(disk, queues=4) as s:
        for q in range(4):
            held_request(s, q)
        s.dev.stop("report")
        assert s.sent == [1, 1, 1, 1]
        s.dev.resume()
        s.dev.hold_interrupts(MAX_HOLD)
        for q in range(4):
            collect_by_interrupt(s.drv, q, 1)
        for _ in range(10):  # real holds, all queues at once, one alarm
            for q in range(4):
                s.blk.submit(T_IN, q, in_size=512, qidx=q)
            for q in range(4):
                collect_by_interrupt(s.drv, q, 1)


def test_a_flood_of_kicks_does_not_keep_the_held_interrupt_back(disk: Path) -> None:
    """A second vCPU writes QueueNotify without pause; every pass it sets off counts the
    hold as productive, and still the held interrupt goes when the hold runs out."""
    with served(disk) as s:
        done = threading.Event()

        def flood() -> None:
            while not done.is_set():
                s.transport.write(mmio_regs.QUEUE_NOTIFY, 4, 0)

        kicker = threading.Thread(target=flood)
        kicker.start()
        try:
            for _ in range(10):
                s.blk.submit(T_IN, 0, in_size=512)
                collect_by_interrupt(s.drv, 0, 1)
        finally:
            done.set()
            kicker.join()


def test_the_alarm_goes_with_its_device(disk: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with served(disk) as s:  # whatever the first one leaves for good (io_uring, numpy)
        s.blk.read(0, 1)
    before = fds()
    for _ in range(10):
        with served(disk, queues=2) as s:
            s.blk.read(0, 1, qidx=1)
    assert fds() == before


# -- vhost-user --


@contextmanager
def vhost_blk(disk: Path, tmp_path: Path, packed: bool = False) -> Iterator[tuple]:
    dev = BlkDevice(str(disk))
    dev.hold_interrupts(MAX_HOLD)
    srv = VhostUserServer(dev, tmp_path / "blk.sock").start()
    fe = VhostUserDriver(srv.path)
    try:
        blk = BlkDriver.open(fe, packed=packed)
        blk.read(0, 1)
        yield dev, srv, fe, blk
    finally:
        fe.close()
        srv.close()
        dev.close()


def vhost_held(dev: BlkDevice, fe: VhostUserDriver, blk: BlkDriver) -> None:
    q = dev.queues[0]
    _hold_forever(q)
    blk.submit(T_IN, 0, in_size=512)
    wait_until(lambda: q._owed_at is not None, 5.0)
    assert not readable(fe._calls[0])


@pytest.mark.parametrize("packed", RINGS)
def test_get_vring_base_answers_after_the_held_call(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    with vhost_blk(disk, tmp_path, packed) as (dev, _, fe, blk):
        vhost_held(dev, fe, blk)
        base = fe.stop_ring(0)
        assert readable(fe._calls[0])
        dev.hold_interrupts(MAX_HOLD)
        fe.restart_ring(0, base)
        assert blk.read(0, 1) == bytes(512)


def test_set_vring_call_mid_hold_moves_the_held_call_to_the_new_fd(
    disk: Path, tmp_path: Path
) -> None:
    with vhost_blk(disk, tmp_path) as (dev, _, fe, blk):
        vhost_held(dev, fe, blk)
        old = fe._calls[0]
        fe._calls[0] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_u64(Req.SET_VRING_CALL, 0, [fe._calls[0]])
        fe.stop_ring(0)
        assert readable(fe._calls[0])
        assert not readable(old)
        os.close(old)


def test_set_status_0_mid_hold_sends_it_first(disk: Path, tmp_path: Path) -> None:
    """QEMU 7.2's stop: SET_STATUS 0 before GET_VRING_BASE (a borrowed stop and reset)."""
    with vhost_blk(disk, tmp_path) as (dev, _, fe, blk):
        vhost_held(dev, fe, blk)
        fe.request(Req.SET_STATUS, U64.pack(0))
        assert readable(fe._calls[0])
        assert dev.queues[0]._owed_at is None


def test_a_disconnect_mid_hold_drops_it_and_the_next_frontend_is_served(
    disk: Path, tmp_path: Path
) -> None:
    with vhost_blk(disk, tmp_path) as (dev, srv, fe, blk):
        vhost_held(dev, fe, blk)
        fe.sock.close()  # the frontend goes; its call fd stays open on our side here
        wait_until(lambda: dev.run_state is RunState.IDLE and srv._conn is None, 5.0)
        assert dev.queues[0]._owed_at is None
        time.sleep(2 * MAX_HOLD)
        assert not readable(fe._calls[0])
        dev.hold_interrupts(MAX_HOLD)
        fe2 = VhostUserDriver(srv.path)
        try:
            blk2 = BlkDriver.open(fe2)
            for _ in range(5):
                assert blk2.read(0, 1) == bytes(512)
        finally:
            fe2.close()


# -- the hold's own checks --


@pytest.mark.parametrize("seconds", [-1e-6, MAX_HOLD * 1.0001, 1.0, math.nan, math.inf])
def test_hold_interrupts_refuses_what_it_cannot_keep(seconds: float) -> None:
    dev = EchoDevice()
    try:
        with pytest.raises(ValueError):
            dev.hold_interrupts(seconds)
    finally:
        dev.close()


def test_hold_spec(disk: Path) -> None:
    def holds(spec: str) -> list[float]:
        (dev,) = make_devices([spec])
        try:
            return [q.hold for q in dev.queues]
        finally:
            dev.close()

    assert holds(f"blk:{disk}") == [pytest.approx(SERVED_HOLD_US * 1e-6)]
    assert holds(f"blk:{disk},hold=0") == [0.0]
    assert holds(f"blk:{disk},hold=10000") == [MAX_HOLD]
    assert holds(f"blk:{disk},hold=00050") == [pytest.approx(50e-6)]
    assert holds(f"blk:{disk}:ro:queues=3,hold=7") == [pytest.approx(7e-6)] * 3
    assert (
        holds(f"blk:{disk}:queues=2,packed=off,hold=7,event_idx=off") == [pytest.approx(7e-6)] * 2
    )
    for bad in ["10001", "", "-1", "1e3", " 5", "5 ", "0x10", "١٠", "+5", "5.0"]:
        with pytest.raises(SpecError):
            make_devices([f"blk:{disk},hold={bad}"])
    with pytest.raises(SpecError):
        make_devices([f"blk:{disk},hold"])
    with pytest.raises(SpecError):
        make_devices([f"blk:{disk},hold=5,hold=6"])
    # refused before anything connects to the export
    with pytest.raises(SpecError, match="hold="):
        make_devices(["blk:nbd://127.0.0.1:1/x:queues=2,hold=99999"])
