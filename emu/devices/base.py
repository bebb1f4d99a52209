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
from collections.abc import Callable

from emu.memory import GuestMemory, GuestMemoryError
from emu.queue import Virtqueue
from emu.ringdefs import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_RING_PACKED,
    F_RING_RESET,
    F_VERSION_1,
    RingError,
)

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

    def activate(self, mem: GuestMemory, features: int) -> None:
        """DRIVER_OK: build the rings of ready queues and start the device thread."""
        self.mem = mem
        self.driver_features = features
        self.broken = None
        for q in self.queues:
            if q.ready and not q.started:
                self.start_queue(q)
        self._running = True
        self._thread = threading.Thread(target=self._run, name=f"emu-{self.name}", daemon=True)
        self._thread.start()

    def start_queue(self, q: Virtqueue) -> None:
        try:
            q.start(self.mem, self.driver_features)
        except RingError as e:
            self.fail(f"queue {q.index}: {e}")

    def reset(self) -> None:
        """Device reset: stop the thread, forget rings and negotiated state."""
        self._stop_thread()
        for q in self.queues:
            q.reset()
            q.clear_kick()
        self.driver_features = 0
        self.broken = None

    def close(self) -> None:
        self.reset()
        for q in self.queues:
            q.close()
        os.close(self._wake)

    def fail(self, reason: str) -> None:
        """A hostile or broken driver: stop touching its rings and ask for a reset."""
        if self.broken is None:
            log.warning("%s: device needs reset: %s", self.name, reason)
            self.broken = reason
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

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        by_fd = {}
        for q in self.queues:
            poller.register(q.kick_fd, select.POLLIN)
            by_fd[q.kick_fd] = q
        # anything made available before DRIVER_OK (or before a restart) is served now
        pending = [q for q in self.queues if q.started]
        while self._running:
            for q in pending:
                self._serve(q)
            pending = []
            for fd, _ in poller.poll():
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    self.on_wake()
                    pending.extend(q for q in self.queues if q.started and self.wants_poll(q))
                    continue
                q = by_fd[fd]
                q.clear_kick()
                if q.started:
                    pending.append(q)

    def _serve(self, q: Virtqueue) -> None:
        try:
            self.handle_queue(q)
        except (RingError, GuestMemoryError, DeviceError) as e:
            self.fail(f"queue {q.index}: {e}")

    # -- what a device implements --

    def handle_queue(self, q: Virtqueue) -> None:
        """Process what the driver made available on ``q`` (device thread)."""
        raise NotImplementedError

    def on_wake(self) -> None:
        """A backend event woke the thread (e.g. rx data arrived)."""

    def wants_poll(self, q: Virtqueue) -> bool:
        """Serve ``q`` after a wake-up even without a kick (rx queues waiting for data)."""
        return False
