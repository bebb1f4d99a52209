"""What every device shares: feature and config plumbing, and the device thread.

Devices know nothing about transports. A transport (virtio-mmio in-process, or the
vhost-user bridge) configures the queues, calls ``activate`` at DRIVER_OK, forwards kicks
to ``Virtqueue.kick`` (or hands the device the guest's kick eventfds) and sets
``Virtqueue.notify`` / ``on_config_change`` / ``on_needs_reset`` to raise interrupts.

Requests are handled on the device's own thread, never on the caller's (vCPU) thread:
it sleeps in poll() on the queues' kick eventfds and calls ``handle_queue`` for each.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from enum import Enum

from emu.memory import GuestMemory, GuestMemoryError
from emu.queue import Virtqueue
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
    STOPPING = "stopping"  # stop requested, the device thread is quiescing
    STOPPED = "stopped"  # no guest memory written, no interrupt raised until resume


#: quiesce policies: finish and publish everything started, or publish nothing more and
#: report what was fetched as in flight
POLICIES = ("drain", "report")


class VirtioDevice:
    device_id: int = 0
    name: str = "device"
    queue_max_size: int = 256
    #: device bits only a legacy (v1) transport offers, e.g. net GSO(6); modern hides them
    legacy_features: int = 0

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
        self.broken: str | None = None
        self._thread: threading.Thread | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._running = False
        self._resumed = False
        self.policy = "drain"
        self.run_state = RunState.IDLE
        self._stop_policy = self.policy
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        #: held by the device thread while it serves a queue; stop_queue takes it
        self._serving = threading.RLock()
        self._restore: dict[int, tuple[RingState, list[InflightChain]]] = {}
        #: kick fds replaced while the thread may poll them: it closes them when it re-polls
        self._retired_fds: list[int] = []
        self._kick_gen = 0

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

    # -- lifecycle --

    def activate(self, mem: GuestMemory, features: int, stopped: bool = False) -> None:
        """DRIVER_OK: build the rings of ready queues and start the device thread.

        ``stopped`` brings a restored device up without serving anything until resume().
        """
        self.mem = mem
        self.driver_features = features
        self.broken = None
        for q in self.queues:
            if q.ready and not q.started:
                self.start_queue(q)
        self._running = True
        if stopped:
            for q in self.queues:
                q.halted = True
            self.run_state = RunState.STOPPED
            self._stopped.set()
        else:
            self.run_state = RunState.RUNNING
        self._thread = threading.Thread(target=self._run, name=f"emu-{self.name}", daemon=True)
        self._thread.start()

    def start_queue(self, q: Virtqueue) -> None:
        state, inflight = self._restore.pop(q.index, (None, None))
        if self.broken is not None:
            log.warning("%s: queue %d not started: the device needs a reset", self.name, q.index)
            return
        try:
            q.start(self.mem, self.driver_features, state, inflight)
        except (RingError, ValueError) as e:  # ValueError: a ring state that cannot be
            self.fail(f"queue {q.index}: {e}")

    def stop_queue(
        self, q: Virtqueue, drain: bool = False
    ) -> tuple[RingState, list[InflightChain]] | None:
        """Take a queue away (QueueReady=0, queue reset) once the device thread is off it.

        ``drain`` first publishes the completions still held back (the delay model), so
        only chains never executed stay in flight. Returns the ring state and in-flight
        chains at that moment (None if the queue was not started): a vhost-user
        GET_VRING_BASE reports them, stable, as it must.
        """
        with self._serving:
            if drain and q.started:
                q.publish_all_due()
            saved = None
            if q.started:
                q.drop_due()
                self.forget_inflight({q.index})
                saved = (q.state(), q.inflight())
            q.stop()
        return saved

    def set_kick_fd(self, q: Virtqueue, fd: int) -> None:
        """Make ``fd`` the queue's kick eventfd (vhost-user SET_VRING_KICK); takes the fd.

        The device thread re-registers its poll set; the old fd is closed once it has.
        """
        with self._state_lock:
            self._retired_fds.append(q.swap_kick_fd(fd))
            self._kick_gen += 1
        if self._thread is None:
            self._close_retired()
        else:
            self.wake()

    def _close_retired(self) -> None:
        with self._state_lock:
            fds, self._retired_fds = self._retired_fds, []
        for fd in fds:
            os.close(fd)

    def restore_queue(self, index: int, state: RingState, inflight: list[InflightChain]) -> None:
        """Saved ring state for a queue the driver (or VMM) is about to start again."""
        self._restore[index] = (state, inflight)

    # -- stop and resume: the state machine every stop interface drives --

    def request_stop(self, policy: str | None = None) -> None:
        """Begin quiescing; returns at once (a status write must not block the vCPU)."""
        policy = policy or self.policy
        if policy not in POLICIES:
            raise ValueError(f"unknown quiesce policy {policy!r} (one of {POLICIES})")
        with self._state_lock:
            if self.run_state is not RunState.RUNNING:
                return
            self._stop_policy = policy
            self._stopped.clear()
            for q in self.queues:
                q.halted = True
                q.drop_pushes = policy == "report"
            self.run_state = RunState.STOPPING
        # The device thread between requests (not serving a queue) has nothing under way:
        # quiesce right here instead of waiting for it to wake up, unless draining has to
        # wait out held completions (this call must not block).
        if self._serving.acquire(blocking=False):
            try:
                if policy == "report" or not any(q.next_due() for q in self.queues):
                    self._quiesce()
            finally:
                self._serving.release()
        self.wake()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        if self.run_state is RunState.IDLE:
            return True
        return self._stopped.wait(timeout)

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
        with self._state_lock:
            if self.run_state is not RunState.STOPPED:
                return
            for q in self.queues:
                q.halted = q.drop_pushes = False
            self.run_state = RunState.RUNNING
            self._resumed = True  # the thread may never have seen STOPPED: tell it
        self.wake()

    def _quiesce(self) -> None:
        """Between requests, with ``_serving`` held: finish (drain) or abandon (report)."""
        if self.run_state is not RunState.STOPPING:
            return
        for q in self.queues:
            if not q.started:
                continue
            if self._stop_policy == "drain":
                q.publish_all_due()
            else:
                q.drop_due()
            q.requeue_inflight()
        self.forget_inflight({q.index for q in self.queues})
        with self._state_lock:
            self.run_state = RunState.STOPPED
            self._stopped.set()

    # -- device-specific state, saved beside the queues (see emu.devices.snapshot) --

    #: what ``save_state`` returns and ``load_state`` takes: fields, version, upgrades
    state_schema = Schema("device state", 1, 0, {})

    def save_state(self) -> dict:
        """JSON-able device state a fresh instance needs to carry on (stopped device)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Apply ``save_state``'s output to a fresh device before it is activated."""

    def reset(self) -> None:
        """Device reset: stop the thread, forget rings and negotiated state."""
        self._stop_thread()
        for q in self.queues:
            q.reset()
            q.clear_kick()
        self.driver_features = 0
        self.broken = None
        self._restore.clear()
        with self._state_lock:
            self.run_state = RunState.IDLE
            self._stopped.clear()

    def close(self) -> None:
        self.reset()
        self._close_retired()
        for q in self.queues:
            q.close()
        os.close(self._wake)

    def fail(self, reason: str) -> None:
        """A hostile or broken driver: stop touching its rings and ask for a reset."""
        if self.broken is None:
            log.warning("%s: device needs reset: %s", self.name, reason)
            self.broken = reason
            with self._serving:  # never pull a ring from under the device thread
                for q in self.queues:
                    q.stop()
            self.on_needs_reset(reason)

    # -- the device thread --

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._running = False
            self.wake()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None

    def _poll_set(self) -> tuple[select.poll, dict[int, Virtqueue], int]:
        with self._state_lock:
            gen = self._kick_gen
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            by_fd = {}
            for q in self.queues:
                poller.register(q.kick_fd, select.POLLIN)
                by_fd[q.kick_fd] = q
        self._close_retired()
        return poller, by_fd, gen

    def _run(self) -> None:
        poller, by_fd, gen = self._poll_set()
        # anything made available before DRIVER_OK (or before a restart) is served now, and
        # whatever the backend already holds (input that arrived while nobody listened)
        self._backend_events()
        pending = [q for q in self.queues if q.started]
        while self._running:
            if gen != self._kick_gen:
                poller, by_fd, gen = self._poll_set()
            for q in pending:
                if self.run_state is RunState.STOPPING:
                    break
                self._serve(q)
            pending = []
            state = self.run_state
            if state is RunState.STOPPING:
                with self._serving:
                    self._quiesce()
                continue
            if state is RunState.STOPPED:  # parked: only a wake (resume, reset) counts
                self._wait_wake()
                continue
            if self._resumed:  # catch up on everything held or requeued while stopped
                self._resumed = False
                with self._serving:
                    self._backend_events()
                pending = [q for q in self.queues if q.started]
                continue
            for fd, _ in poller.poll(self._due_timeout_ms()):
                if fd == self._wake:
                    self._drain_wake()
                    with self._serving:  # a stop taken meanwhile keeps the backend's data
                        if self.run_state is not RunState.RUNNING:
                            continue
                        self._backend_events()
                    pending.extend(q for q in self.queues if q.started and self.wants_poll(q))
                    continue
                q = by_fd[fd]
                if q.kick_fd != fd:  # replaced meanwhile: the next loop re-polls
                    continue
                q.clear_kick()
                if q.started:
                    pending.append(q)
            self._publish_due()

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass

    def _wait_wake(self) -> None:
        select.select([self._wake], [], [])
        self._drain_wake()

    def _due_timeout_ms(self) -> int:
        dues = [d for q in self.queues if q.started and (d := q.next_due()) is not None]
        if not dues:
            return -1
        return max(0, int((min(dues) - time.monotonic()) * 1000 + 0.999))

    def _publish_due(self) -> None:
        now = time.monotonic()
        with self._serving:
            for q in self.queues:
                if q.started and q.next_due() is not None:
                    q.publish_due(now)

    def _backend_events(self) -> None:
        try:
            self.on_wake()
        except Exception as e:  # a backend failure must not kill the device thread
            log.exception("%s: backend event failed", self.name)
            self.fail(f"backend: {e!r}")

    def _serve(self, q: Virtqueue) -> None:
        with self._serving:
            if not q.started or self.run_state is RunState.STOPPED:
                return
            try:
                self.handle_queue(q)
            except (RingError, GuestMemoryError, DeviceError) as e:
                self.fail(f"queue {q.index}: {e}")
            except Exception as e:  # last line of defence: the thread must not die
                log.exception("%s: queue %d: unexpected error", self.name, q.index)
                self.fail(f"queue {q.index}: internal error: {e!r}")

    # -- what a device implements --

    def handle_queue(self, q: Virtqueue) -> None:
        """Process what the driver made available on ``q`` (device thread)."""
        raise NotImplementedError

    def on_wake(self) -> None:
        """A backend event woke the thread (e.g. rx data arrived)."""

    def wants_poll(self, q: Virtqueue) -> bool:
        """Serve ``q`` after a wake-up even without a kick (rx queues waiting for data)."""
        return False

    def forget_inflight(self, queues: set[int]) -> None:
        """At stop of ``queues``: drop chains the device holds itself on them (they are
        handed to it again, with everything else in flight, when the queues restart)."""
