"""What every device shares: feature and config plumbing, and the device thread.

Devices know nothing about transports. A transport (virtio-mmio in-process, or the
vhost-user bridge) configures the queues, calls ``activate`` at DRIVER_OK, forwards kicks
to ``Virtqueue.kick`` (or hands the device the guest's kick eventfds) and sets
``Virtqueue.notify`` / ``on_config_change`` / ``on_needs_reset`` to raise interrupts.

The device thread owns the device. Requests are served there, never on the caller's
(vCPU) thread, and so is every lifecycle change: activate, start and stop of a queue,
stop, resume, fail, reset and the swap of a kick fd are commands the thread carries out
between passes. A pass serves one queue with a budget (a queue size of chains), so a
command waits at most one pass, and a stop or reset also closes the queues' gates so the
pass in progress ends after the request it is in. No lock is held while the device calls
out (interrupts take the transport's lock), so there is no lock order to get wrong.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from emu.memory import GuestMemory, GuestMemoryError
from emu.queue import OPEN, Gate, Virtqueue
from emu.ringdefs import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_RING_PACKED,
    F_RING_RESET,
    F_VERSION_1,
    InflightChain,
    RingError,
    RingState,
)
from emu.state.schema import Schema

try:
    from emu.devices import _loop
except ImportError:  # not built: the Python loop does it all
    _loop = None

log = logging.getLogger(__name__)

#: ring features every emu device offers; a device may mask some off
RING_FEATURES = (
    1 << F_VERSION_1
    | 1 << F_INDIRECT_DESC
    | 1 << F_EVENT_IDX
    | 1 << F_RING_PACKED
    | 1 << F_RING_RESET
)


class DeviceError(Exception):
    """The guest asked for something the device cannot do; the device needs a reset."""


class RunState(Enum):
    IDLE = "idle"  # not activated (before DRIVER_OK, or after reset)
    RUNNING = "running"
    STOPPING = "stopping"  # waiting for the backend: completions (drain), the write fence (report)
    STOPPED = "stopped"  # no guest memory written, no interrupt raised until resume
    BROKEN = "broken"  # needs reset: no ring is touched until then


#: the states the device loop checks on every turn, as plain names (see emu.queue.OPEN)
RUNNING, STOPPING = RunState.RUNNING, RunState.STOPPING

#: quiesce policies: finish and publish everything started, or publish nothing more and
#: report what was fetched as in flight
POLICIES = ("drain", "report")
#: the longest an interrupt may be held (VirtioDevice.hold_interrupts)
MAX_HOLD = 0.01


#: what the wake eventfd and the held-interrupt alarm are in the device thread's table of
#: watched fds
_WAKE = object()
_HOLD = object()


def _thread_stacks() -> list[str]:
    """Every thread's Python stack (a thread inside a C call shows the call's frame)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"thread {names.get(ident, ident)}:")
        lines += "".join(traceback.format_stack(frame)).splitlines()
    return lines


class _Completions:
    """What a queue's completion fd (emu.queue.Deferred.fd) is to the device thread: only the
    queues whose fd fired (or that have something due by time) are asked to publish."""

    __slots__ = ("q",)

    def __init__(self, q: Virtqueue) -> None:
        self.q = q


class Command:
    """A lifecycle change queued for the device thread; ``wait`` for its outcome.

    Waiters sleep on the device's condition, not an Event of their own: most commands
    (a borrowed stop above all) are never waited for, and a stop is timed in microseconds.
    """

    def __init__(self, fn: Callable[[], Any], changed: threading.Condition) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self._changed = changed
        self._done = False

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the waiter, whatever it is
            self.error = e
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        with self._changed:
            done = self._changed.wait_for(self.done, timeout)
        if not done:
            raise TimeoutError(f"device command not carried out after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class VirtioDevice:
    device_id: int = 0
    name: str = "device"
    queue_max_size: int = 256
    #: device bits only a legacy (v1) transport offers, e.g. net GSO(6); modern hides them
    legacy_features: int = 0
    #: seconds a stop waits for a backend that stopped answering; then the device needs a
    #: reset instead of hanging (what the backend held has an unknown fate)
    stop_timeout: float = 5.0

    def __init__(
        self, num_queues: int, device_features: int = 0, queue_max_size: int | None = None
    ) -> None:
        self.features = RING_FEATURES | device_features
        if queue_max_size is not None:
            self.queue_max_size = queue_max_size
        self.queues = [Virtqueue(i, self.queue_max_size) for i in range(num_queues)]
        self.driver_features = 0
        self.mem: GuestMemory | None = None
        self.on_config_change: Callable[[], None] = lambda: None
        self.on_needs_reset: Callable[[str], None] = lambda reason: None
        self.policy = "drain"
        #: written by the device thread only; others read it
        self.run_state = RunState.IDLE
        self.broken: str | None = None  # why, while BROKEN
        self._stop_policy = self.policy
        self._restore: dict[int, tuple[RingState, list[InflightChain]]] = {}
        # -- the device thread and its command queue --
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._commands: deque[Command] = deque()
        #: guards the command queue and the stop counters; never held while calling out
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stops_asked = self._stops_seen = 0
        self._stop_deadline = 0.0  # while STOPPING: when the device gives the backend up
        #: queues with work for the next pass, in serving order (device thread only)
        self._pending: dict[int, Virtqueue] = {}
        #: the device thread's epoll and what each fd in it is (the wake eventfd, a
        #: queue for its kick fd, a queue's completions); set while the thread runs
        self._epoll: select.epoll | None = None
        self._watched: dict[int, Any] = {}
        #: held by the device thread except while it is parked in select (see _borrow)
        self._owner = threading.Lock()
        self._borrower: threading.Thread | None = None  # the thread holding it instead
        self._in_pass = False  # the device thread is in handle_queue (see _post's later)
        self._describing: Command | None = None  # the last ``describe`` asked

    def hold_interrupts(self, seconds: float) -> None:
        """Let every queue hold an interrupt for up to ``seconds`` so that requests the
        driver submits meanwhile are answered by the same one (Virtqueue.interrupt, which
        says when it pays); 0, the default, tells the driver at once. Needs the device
        loop's wait in C (emu.devices._loop): without it nothing is held."""
        if not 0.0 <= seconds <= MAX_HOLD:
            raise ValueError(f"interrupt hold {seconds} s not in 0..{MAX_HOLD} s")
        for q in self.queues:
            q.hold = seconds

    def describe(self, timeout: float = 1.0) -> list[str]:
        """Where the device and each of its queues stand, for someone looking at a guest
        that waits (``emu serve`` prints it on SIGUSR1). Read between passes; a device
        thread that does not come back within ``timeout`` is the news itself: then the
        lines say so, with what guest memory holds and where each thread is."""
        head = f"{self.name}: {self.run_state.value}"
        if self.broken:
            head += f" (needs reset: {self.broken})"
        if self._closed:
            return [f"{head}, closed"]
        asked = self._describing
        try:
            if asked is None or asked.done():  # one at a time: a stuck thread gets one
                asked = self._describing = self._post(self._describe, wait=False, borrow=True)
            lines = asked.wait(timeout)
        except RuntimeError:  # closed meanwhile
            return [f"{head}, closed"]
        except TimeoutError:
            lines = [f"the device thread has not come back for {timeout:g} s; guest memory:"]
            lines += [f"queue {q.index}: {q.describe_driver(self.mem)}" for q in self.queues]
            lines += _thread_stacks()
        return [head, *lines]

    def _describe(self) -> list[str]:
        lines = [q.describe(self.mem) for q in self.queues]
        if self._pending:
            lines.append(f"queues waiting for a pass: {sorted(self._pending)}")
        return lines

    # -- config space: subclasses override config_bytes / config_write --

    def config_bytes(self) -> bytes:
        return b""

    def read_config(self, offset: int, size: int) -> int:
        cfg = self.config_bytes()
        if offset < 0 or size <= 0 or offset + size > len(cfg):
            return 0
        return int.from_bytes(cfg[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        log.info("%s: ignoring write to read-only config offset %#x", self.name, offset)

    def has(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def accept_features(self, features: int) -> bool:
        """FEATURES_OK check: only a subset of what we offer, and VERSION_1 if modern."""
        return features & ~self.features == 0

    # -- lifecycle: each public call is a command for the device thread --

    def activate(
        self, mem: GuestMemory, features: int, stopped: bool = False, wait: bool = True
    ) -> Command:
        """DRIVER_OK: build the rings of ready queues and serve them.

        ``stopped`` brings a restored device up without serving anything until resume().
        ``wait=False`` for a caller that holds a lock the device's callbacks take.
        """
        return self._post(lambda: self._activate(mem, features, stopped), wait)

    def start_queue(self, q: Virtqueue, wait: bool = True) -> Command:
        return self._post(lambda: self._start_queue(q), wait)

    def stop_queue(
        self, q: Virtqueue, drain: bool = False
    ) -> tuple[RingState, list[InflightChain]] | None:
        """Take a queue away (QueueReady=0, vhost-user GET_VRING_BASE) between passes.

        ``drain`` first publishes the completions a backend still holds, so only chains
        never executed stay in flight. Returns the ring state and in-flight chains at
        that moment (None if the queue was not started).
        """
        return self.request_stop_queue(q, drain).wait()

    def request_stop_queue(self, q: Virtqueue, drain: bool = False, reset: bool = False) -> Command:
        """``stop_queue`` without waiting; ``reset`` also resets the queue (QueueReset)."""
        if q.started:
            q.gate = Gate.HALT if drain else Gate.CLOSED  # end a pass in progress early
        return self._post(lambda: self._stop_queue(q, drain, reset), wait=False)

    def set_kick_fd(self, q: Virtqueue, fd: int) -> None:
        """Make ``fd`` the queue's kick eventfd (vhost-user SET_VRING_KICK); takes the fd."""
        self._post(lambda: self._swap_kick_fd(q, fd), wait=False)

    def call(self, fn: Callable[[], Any], borrow: bool = False) -> Any:
        """Run ``fn`` on the device thread between passes and return what it returns: a
        transport's own change to queues that may be running (vhost-user dirty logging
        turned on or off), never made while a pass uses them.

        ``borrow``: if the thread is parked, run ``fn`` here with its ownership token
        instead (as a stop does, see ``_borrow``), sparing two thread switches; only for
        what never waits for another thread."""
        return self._post(fn, borrow=borrow).result

    def restore_queue(self, index: int, state: RingState, inflight: list[InflightChain]) -> None:
        """Saved ring state for a queue the driver (or VMM) is about to start again."""
        self._post(lambda: self._restore.__setitem__(index, (state, inflight)))

    def request_stop(self, policy: str | None = None) -> None:
        """Begin quiescing; returns at once (a status write must not block the vCPU)."""
        policy = policy or self.policy
        if policy not in POLICIES:
            raise ValueError(f"unknown quiesce policy {policy!r} (one of {POLICIES})")
        if self.run_state is RunState.RUNNING:  # end a pass in progress early
            gate = Gate.HALT if policy == "drain" else Gate.CLOSED
            for q in self.queues:
                q.gate = gate
        with self._lock:
            self._stops_asked += 1
            seq = self._stops_asked
        self._post(lambda: self._stop(policy, seq), wait=False, borrow=True, later=True)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """True once every stop asked so far is carried out and the device is not serving."""
        with self._changed:
            return self._changed.wait_for(self._quiet, timeout)

    def _quiet(self) -> bool:
        busy = (RunState.RUNNING, RunState.STOPPING)
        return self._stops_seen >= self._stops_asked and self.run_state not in busy

    def stop(self, policy: str | None = None, timeout: float | None = 30.0) -> None:
        """Quiesce and wait: afterwards nothing touches guest memory until resume()."""
        self.request_stop(policy)
        if not self.wait_stopped(timeout):
            raise TimeoutError(f"{self.name}: not stopped after {timeout} s")

    @property
    def stopped(self) -> bool:
        return self.run_state is RunState.STOPPED

    def resume(self) -> None:
        """Back to work: in-flight chains are handed to the device again before new ones."""
        self._post(self._resume, wait=False)

    def sync(self, timeout: float | None = None) -> None:
        """Wait until every command posted so far is carried out (a caller that posted
        without waiting, e.g. under a lock, and now wants the outcome)."""
        self._post(lambda: None, wait=False).wait(timeout)

    def reset(self) -> None:
        """Device reset: forget rings and negotiated state."""
        self.request_reset().wait()

    def request_reset(self) -> Command:
        """``reset`` without waiting (a vCPU's Status=0 waits a bounded time, then polls)."""
        for q in self.queues:
            q.gate = Gate.CLOSED  # end a pass in progress early
        return self._post(self._reset, wait=False)

    def fail(self, reason: str, wait: bool = True) -> None:
        """A hostile or broken driver: stop touching its rings and ask for a reset."""
        self._post(lambda: self._fail(reason), wait)

    def close(self) -> None:
        if self._closed:
            return
        self.reset()
        thread = self._thread
        if thread is not None:
            self._post(self._exit, wait=False)
            thread.join()
        self._closed = True
        for q in self.queues:
            q.close()
        os.close(self._wake)

    # -- the commands, on the device thread --

    def _activate(self, mem: GuestMemory, features: int, stopped: bool) -> None:
        self.mem = mem
        self.driver_features = features
        self.broken = None
        self.on_activate(features)
        self._set_state(RunState.STOPPED if stopped else RunState.RUNNING)
        for q in self.queues:
            q.gate = Gate.CLOSED if stopped else Gate.OPEN
            if q.ready and not q.started:
                self._start_queue(q)
        if self.run_state is RunState.RUNNING:
            self._catch_up()

    def _start_queue(self, q: Virtqueue) -> None:
        state, inflight = self._restore.pop(q.index, (None, None))
        if self.run_state is RunState.BROKEN:
            log.warning("%s: queue %d not started: the device needs a reset", self.name, q.index)
            return
        q.gate = Gate.OPEN if self.run_state is RunState.RUNNING else Gate.CLOSED
        try:
            q.start(self.mem, self.driver_features, state, inflight)
        except (RingError, ValueError) as e:  # ValueError: a ring state that cannot be
            self._fail(f"queue {q.index}: {e}")
            return
        if q.gate is Gate.OPEN:
            self._pending[q.index] = q  # anything made available before it started

    def _stop_queue(
        self, q: Virtqueue, drain: bool, reset: bool
    ) -> tuple[RingState, list[InflightChain]] | None:
        saved = None
        if q.started:
            # a drain or a write fence below may keep this thread waiting for the
            # backend: what any queue holds goes now (the others keep running)
            self._send_held()
            if drain:
                q.gate = Gate.HALT
                q.publish_all_due()
            q.drop_due()
            self.forget_inflight({q.index})
            saved = (q.state(), q.inflight())
        q.stop()
        self._pending.pop(q.index, None)
        if reset:
            q.reset()
            q.clear_kick()
            self.on_queue_reset(q.index)
        self._fate_unknown([q])
        return saved

    def _fate_unknown(self, queues: list[Virtqueue]) -> bool:
        """A stop must not report a write in flight whose fate is unknown (the backend
        went away before answering it: it may still land, after a destination resubmitted
        it and the guest wrote newer data). The device needs a reset instead."""
        if lost := sum(q.take_uncertain() for q in queues):
            self._fail(
                f"stop: the backend went away with {lost} writes unanswered; whether they "
                "reached the disk is unknown, so they cannot be reported in flight"
            )
        return bool(lost)

    def _swap_kick_fd(self, q: Virtqueue, fd: int) -> None:
        old = q.swap_kick_fd(fd)
        if self._epoll is not None:
            self._epoll.unregister(old)
            del self._watched[old]
            self._watch(fd, q)
        os.close(old)

    def _stop(self, policy: str, seq: int) -> None:
        if self.run_state is RunState.RUNNING:
            self._stop_policy = policy
            for q in self.queues:
                q.gate = Gate.HALT if policy == "drain" else Gate.CLOSED
            self.run_state = RunState.STOPPING  # announced with the outcome below
            self._stop_deadline = time.monotonic() + self.stop_timeout
            self._finish_stop(announce=False)
        with self._changed:
            self._stops_seen = max(self._stops_seen, seq)
            self._changed.notify_all()

    def _finish_stop(self, announce: bool = True) -> None:
        """STOPPING -> STOPPED once the backend holds nothing more: a drain has published
        everything, a report has cancelled reads and its writes are fenced. A backend that
        stays silent past the deadline, or a write whose fate is unknown, fails the device."""
        if self.run_state is not RunState.STOPPING:
            return
        started = [q for q in self.queues if q.started]
        if self._stop_policy == "report":
            for q in started:
                q.cancel_due()
        if held := sum(q.held() for q in started):
            if time.monotonic() < self._stop_deadline:
                return  # the loop publishes (drain) or fences (report) them as they come
            self._fail(
                f"stop: the backend left {held} requests unanswered for {self.stop_timeout:g} s"
            )
            return
        if self._fate_unknown(started):
            return
        self._send_held()  # what was published reaches the driver before STOPPED
        for q in started:
            q.drop_due()
            q.gate = Gate.CLOSED
            q.requeue_inflight()
        self.forget_inflight({q.index for q in started})
        self._pending.clear()
        if announce:
            self._set_state(RunState.STOPPED)
        else:
            self.run_state = RunState.STOPPED

    def _resume(self) -> None:
        if self.run_state is not RunState.STOPPED:
            return
        for q in self.queues:
            q.gate = Gate.OPEN
        self._set_state(RunState.RUNNING)
        self._catch_up()

    def _catch_up(self) -> None:
        """Serve everything made available or held while nobody served (start, resume)."""
        self._backend_events()
        self._pending.update((q.index, q) for q in self.queues if q.started)

    def _reset(self) -> None:
        for q in self.queues:
            q.reset()
            q.clear_kick()
        self._pending.clear()
        self.driver_features = 0
        self.broken = None
        self._restore.clear()
        self.on_reset()
        self._set_state(RunState.IDLE)

    def _fail(self, reason: str) -> None:
        if self.run_state is RunState.BROKEN:
            return
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.broken = reason
        for q in self.queues:
            q.gate = Gate.CLOSED
            q.stop()
        self._pending.clear()
        self._set_state(RunState.BROKEN)
        self.on_needs_reset(reason)

    def _exit(self) -> None:
        self._closed = True

    def _set_state(self, state: RunState) -> None:
        with self._changed:
            self.run_state = state
            self._changed.notify_all()

    # -- device-specific state, saved beside the queues (see emu.devices.snapshot) --

    #: what ``save_state`` returns and ``load_state`` takes: fields, version, upgrades
    state_schema = Schema("device state", 1, 0, {})

    def save_state(self) -> dict:
        """JSON-able device state a fresh instance needs to carry on (stopped device)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Apply ``save_state``'s output to a fresh device before it is activated."""

    # -- the device thread --

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def _post(
        self, fn: Callable[[], Any], wait: bool = True, borrow: bool = False, later: bool = False
    ) -> Command:
        """``later``: asked from the device thread inside a pass, run it after the pass
        instead of inline (a stop asked inside a request must not report STOPPED before
        that request's own writes)."""
        cmd = Command(fn, self._changed)
        owner = threading.current_thread() in (self._thread, self._borrower)
        if owner and not (later and self._in_pass):
            cmd.run()  # the owner itself (a device failing its own queue, a borrowed command)
        elif owner:
            with self._lock:
                self._commands.append(cmd)
            self.wake()
        elif not (borrow and self._borrow(cmd)):
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"{self.name}: device is closed")
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"emu-{self.name}", daemon=True
                    )
                    self._thread.start()
                self._commands.append(cmd)
            self.wake()
        if wait:
            cmd.wait()
        return cmd

    def _borrow(self, cmd: Command) -> bool:
        """Run ``cmd`` in the caller's thread if the device thread is parked in select with
        nothing queued: ownership passes to the caller for the call, so a stop costs no
        thread hand-off. Only for commands that never wait for another thread, so no
        lock held elsewhere is waited for while the token is held: the only interrupt a
        stop sends is one a hold kept back, through a lock the waiting thread never holds
        while it waits for the device (the in-process transport's lock, reentrant for the
        vCPU that asked; vhost-user's Notifier's own); a report stop cancels outstanding
        reads (``Deferred.cancel``), a kernel call that waits at most for local reads
        already under way, and leaves the write fence to the device thread."""
        if not self._owner.acquire(blocking=False):
            return False
        try:
            with self._lock:
                if self._commands:
                    return False  # keep the order: queued ones first
            self._borrower = threading.current_thread()  # its own commands run inline
            try:
                cmd.run()
            finally:
                self._borrower = None
        finally:
            self._owner.release()
        if self.run_state is RunState.STOPPING:
            self.wake()  # the thread publishes what a drain waits for
        return True

    def _run(self) -> None:
        self._owner.acquire()  # released only while parked in select
        # epoll itself rather than a selectors wrapper: this loop turns once per guest
        # kick, so its own cost is part of every request's latency
        ep = self._epoll = select.epoll()
        watched = self._watched = {}
        self._watch(self._wake, _WAKE)
        for q in self.queues:
            self._watch(q.kick_fd, q)
            if q.deferred is not None and q.deferred.fd is not None:
                self._watch(q.deferred.fd, _Completions(q))
        alarm = None
        if _loop is not None:
            try:
                alarm = _loop.HoldTimer()
            except OSError as e:  # out of fds: serve all the same, holding nothing
                log.warning("%s: no alarm for held interrupts: %s; none are held", self.name, e)
        if alarm is not None:
            self._watch(alarm.fd, _HOLD)
            for q in self.queues:
                q.arm_hold = alarm.arm
        try:
            while not self._closed:
                if self._commands:  # (checked here: the loop runs once per guest kick)
                    self._run_commands()
                    if self._closed:
                        break
                if self._pending:
                    self._serve_pass()
                busy = self._pending and self.run_state is RUNNING
                timeout = 0 if busy else self._due_timeout()
                self._owner.release()
                try:
                    if timeout is None and self.run_state is RUNNING and self.serve_parked(ep):
                        timeout = 0  # it came back: what it left to this loop is ready
                    events = ep.poll(-1 if timeout is None else timeout)
                finally:
                    self._owner.acquire()
                fired = []
                for fd, _ in events:
                    what = watched.get(fd)  # None: unwatched meanwhile (a kick fd swapped)
                    if what is _WAKE:
                        self._woken()
                    elif what is _HOLD:
                        self._hold_ran_out(alarm)
                    elif type(what) is _Completions:
                        fired.append(what.q)  # published below
                    elif what is not None and what.kick_fd == fd:
                        what.clear_kick()
                        if what.ring is not None and what.gate is OPEN:  # started, open
                            self._pending[what.index] = what
                self._publish_due(fired)
        finally:
            for q in self.queues:
                q.arm_hold = None
            self._send_held()
            if alarm is not None:
                alarm.close()
            self._epoll = None
            self._watched = {}
            ep.close()
            self._owner.release()

    def _watch(self, fd: int, what: Any) -> None:
        """Wake the device thread when ``fd`` is readable; ``what`` says what it is."""
        assert self._epoll is not None
        self._epoll.register(fd, select.EPOLLIN)
        self._watched[fd] = what

    def _send_held(self) -> None:
        """Every queue's held interrupt, sent now (Virtqueue.interrupt)."""
        for q in self.queues:
            q.flush_interrupt()

    def _hold_ran_out(self, alarm: Any) -> None:
        """Send the held interrupts that are due; the alarm is set again for the rest."""
        alarm.clear()
        now = time.monotonic()
        for q in self.queues:
            due = q.interrupt_due()
            if due is None:
                continue
            if due <= now:
                q.flush_interrupt()
            else:
                alarm.arm(due)

    def _run_commands(self) -> None:
        while self._commands:
            with self._lock:
                cmd = self._commands.popleft()
            cmd.run()
            if cmd.error is not None:
                log.error("%s: device command failed", self.name, exc_info=cmd.error)
                if not isinstance(cmd.error, Exception):
                    raise cmd.error  # KeyboardInterrupt and the like end the thread

    def _woken(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        if self.run_state is not RUNNING:
            return  # a stopped device leaves backend input with the backend
        self._backend_events()
        self._pending.update((q.index, q) for q in self.queues if q.started and self.wants_poll(q))

    def _serve_pass(self) -> None:
        """One budgeted pass per pending queue; commands waiting end the round early."""
        for q in list(self._pending.values()):
            if self._commands or self.run_state is not RUNNING:
                return
            del self._pending[q.index]
            if q.ring is None or q.gate is not OPEN:  # not started, or not open
                continue
            q.begin_pass()
            self._in_pass = True
            try:
                self.handle_queue(q)
            except Exception as e:  # the thread must not die
                self.queue_failed(q, e)
            finally:
                self._in_pass = False
            if q.more and q.ring is not None:  # budget spent: after the other queues
                self._pending[q.index] = q

    def queue_failed(self, q: Virtqueue, e: Exception) -> None:
        """A pass over ``q`` raised ``e``: a bad ring, buffer or request makes the device
        need a reset; so does anything else, logged as emu's own error."""
        if isinstance(e, (RingError, GuestMemoryError, DeviceError)):
            self._fail(f"queue {q.index}: {e}")
            return
        log.error("%s: queue %d: unexpected error", self.name, q.index, exc_info=e)
        self._fail(f"queue {q.index}: internal error: {e!r}")

    def _due_timeout(self) -> float | None:
        due = self._stop_deadline if self.run_state is STOPPING else None
        for q in self.queues:  # a plain loop: runs before every wait, mostly finds nothing
            if q.deferred is not None and q.started:
                d = q.deferred.next_due()
                if d is not None and (due is None or d < due):
                    due = d
        return None if due is None else max(0.0, due - time.monotonic())

    def _publish_due(self, fired: list[Virtqueue]) -> None:
        """Publish what is ready: queues whose completion fd fired, and those whose
        deferred is due by time (no fd: ``take_due`` looks at the clock)."""
        if self.run_state is not RUNNING and self.run_state is not STOPPING:
            return
        now = time.monotonic()
        for q in self.queues:
            d = q.deferred
            if d is None or q.ring is None:  # no deferred, or not started
                continue
            if d.fd is None or q in fired:
                q.publish_due(now)
        if self.run_state is STOPPING:
            self._finish_stop()

    def _backend_events(self) -> None:
        try:
            self.on_wake()
        except Exception as e:  # a backend failure must not kill the device thread
            log.exception("%s: backend event failed", self.name)
            self._fail(f"backend: {e!r}")

    # -- what a device implements --

    def handle_queue(self, q: Virtqueue) -> None:
        """Process what the driver made available on ``q`` (device thread)."""
        raise NotImplementedError

    def native_pass(self, q: Virtqueue) -> Callable[[], None] | None:
        """What ``handle_queue(q)`` does, as a call the wait in C (emu.devices._loop) makes
        without a Python frame of the device's (blk's native plane), while ``q.deferred``
        stays what it is now; None: it calls ``handle_queue``."""
        return None

    def on_wake(self) -> None:
        """A backend event woke the thread (e.g. rx data arrived)."""

    def on_activate(self, features: int) -> None:
        """DRIVER_OK, before the rings start (device thread)."""

    def on_reset(self) -> None:
        """Device reset: drop guest-side state (device thread)."""

    def serve_parked(self, ep: select.epoll) -> bool:
        """Instead of parking in ``ep.poll`` (nothing pending, nothing due, RUNNING): wait
        in emu.devices._loop, which serves kicks and native completions in C until an fd
        it leaves to this loop is ready. Called and returns with the ownership token
        released. True: it waited (poll at once for what it left); False: it cannot (not
        built, or a deferred only this loop publishes, as the delay model's)."""
        if _loop is None:
            return False
        fds: dict[int, tuple[Virtqueue, Any, bool, Callable[[], None] | None]] = {}
        for q in self.queues:
            if not q.started:
                continue
            d = q.deferred
            if d is not None and not hasattr(d, "publish_done"):
                return False
            fds[q.kick_fd] = (q, d, True, self.native_pass(q))
            if d is not None:
                fds[d.fd] = (q, d, False, None)
        if not fds:
            return False
        _loop.serve_parked(self, ep.fileno(), self._owner, fds, RUNNING, OPEN)
        return True

    def wants_poll(self, q: Virtqueue) -> bool:
        """Serve ``q`` after a wake-up even without a kick (rx queues waiting for data)."""
        return False

    def on_queue_reset(self, index: int) -> None:
        """Queue ``index`` was reset (VIRTIO_F_RING_RESET), after ``forget_inflight``: its
        chains in flight went back to the driver, which hands their heads out again for
        new requests, so a head the device acted on before the reset means nothing now
        (device thread)."""

    def forget_inflight(self, queues: set[int]) -> None:
        """At stop of ``queues``: drop chains the device holds itself on them (they are
        handed to it again, with everything else in flight, when the queues restart)."""
