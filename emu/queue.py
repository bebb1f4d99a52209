"""One virtqueue, whatever ring format the driver chose.

The transport fills in the configuration (size, addresses, ready); the device only pops
chains and pushes used entries. ``pop``/``push`` go straight to the ring core, and ``push``
raises the used-buffer notification itself when the ring says the driver wants one.

Only the device thread pops and pushes. Other threads speak to a queue through its
``gate`` alone (a stop or reset asks a pass in progress to end early); every other change
is a command the device thread carries out between passes (emu.devices.base).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, Protocol

import numpy as np

from emu import pyring
from emu.memory import GuestMemory, GuestMemoryError
from emu.ringdefs import F_RING_PACKED, Batch, InflightChain, RingState

try:
    from emu import _ring as _cring
except ImportError:  # not built: the pure-Python twin still works, only slower
    _cring = None


def ring_module(impl: str | None = None) -> Any:
    """The ring core to use: "cython" (default when built) or "python" (EMU_RING overrides)."""
    impl = impl or os.environ.get("EMU_RING") or ("cython" if _cring else "python")
    if impl == "python":
        return pyring
    if impl == "cython":
        if _cring is None:
            raise RuntimeError(
                "emu._ring is not built; run `pip install -e .` or set EMU_RING=python"
            )
        return _cring
    raise ValueError(f"unknown ring implementation {impl!r}")


def _readable(fd: int) -> bool:
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    return bool(ready.poll(0))


class Gate(Enum):
    """What the device may do with a queue right now: one value instead of flags."""

    OPEN = "open"  # serving
    HALT = "halt"  # drain stop: fetch nothing more, finish and publish what was fetched
    CLOSED = "closed"  # report stop, reset, queue stop: fetch nothing, publish nothing


#: the gates as plain names: an Enum member lookup costs ten times a global's, and the
#: request path checks the gate several times per request
OPEN, CLOSED = Gate.OPEN, Gate.CLOSED

#: a pass serves at most a queue size of chains and this many descriptors per chain slot,
#: so a stop or reset waits one bounded pass and no queue starves the others
PASS_DESCS_PER_SLOT = 4
#: a hold no kick came into is not tried again for this many interrupts, doubling per
#: such hold up to this bound (a driver that waits for each interrupt pays one hold in
#: 64 at most)
HOLD_BACKOFF_MAX = 64


class Deferred(Protocol):
    """Completions a backend finishes after the pass that started them.

    Two kinds fit: the delay model (emu.testing.delay: requests ran, their used entries
    are published ``latency`` later, due by time) and an asynchronous backend (requests
    are outstanding at the backend; ``fd`` turns readable when some finished). The device
    thread publishes them as they come (``take_due``); a drain stop waits for all of them
    (``take_all``); a report stop ``cancel``s them (nothing more is published, reads stop
    writing guest memory) and then waits until ``count`` is 0: writes already handed to a
    backend are fenced before the device says STOPPED. Their chains stay in flight.

    A deferred with an ``fd`` may also publish by itself, ``publish_done()`` (blk's native
    plane): the device thread's wait in C (emu.devices._loop) calls it when ``fd`` turns
    readable; one without it keeps the device in its Python loop.
    """

    fd: int | None  # readable while completions wait (None: due by time, ``next_due``)

    def defer(self, heads: np.ndarray, lengths: np.ndarray) -> None: ...
    def next_due(self) -> float | None: ...
    def take_due(self, now: float) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def take_all(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...  # waits for each
    # publish nothing more (take_due yields nothing afterwards); reads stop writing guest
    # memory before it returns: waits only for reads the backend cannot cancel (local
    # io_uring reads already under way), never for a write
    def cancel(self) -> None: ...
    def drop(self) -> None: ...  # cancel, then wait until count() is 0; forgets all
    def count(self) -> int: ...  # outstanding or held: not published, not fenced yet
    # writes answered "backend gone" after a cancel since the last call: they may still
    # reach the disk, so they must not be reported in flight
    def take_uncertain(self) -> int: ...


class Virtqueue:
    """Queue configuration plus the ring, and what a stop needs to keep track of.

    The ring holds every chain popped, with its segments, until it is pushed (``segments``),
    so a stopped queue can report its in-flight chains, and a resumed or restored one hands
    them to the device again, ahead of anything new, through ``pop``.
    """

    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.notify: Callable[[], None] = lambda: None
        #: how long an interrupt may be held (seconds; 0: never), and the device loop's
        #: alarm for held ones (``arm(deadline)``; None: no loop to fire it, never hold)
        self.hold = 0.0
        self.arm_hold: Callable[[float], None] | None = None
        #: optional observer of the request path (the vhost-user inflight region):
        #: ``fetched(batch)`` after a pop from the ring, ``using(heads)`` / ``used(heads)``
        #: just before and just after used entries are published
        self.tracker: Any = None
        #: the migration dirty log while a vhost-user frontend asks for one (LOG_ALL),
        #: else None: ``before_publish()`` logs every page written so far, before the used
        #: entries that show them are published; ``published(q, count)`` logs the used
        #: ring's own writes. Set by a command on the device thread; kept across restarts.
        self.log: Any = None
        self.ring: Any = None
        self.impl: str | None = None
        #: where completions go when the backend finishes them later (None: at once)
        self.deferred: Deferred | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the power-on configuration (spec: on device or queue reset)."""
        self.size = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0
        self.ring = None
        self.features = 0
        self.gate = Gate.OPEN
        #: the pass budget ran out with chains still available: serve again next pass
        self.more = False
        self._chains_left = self._descs_left = 0
        self._resubmit: list[InflightChain] = []
        self._requeue = False
        self._owed_at: float | None = None  # an interrupt held since then (None: none)
        self._kicked = False  # a kick came while it was held
        self._backoff = self._skip = 0
        if self.deferred is not None:
            self.deferred.drop()

    @property
    def packed(self) -> bool:
        return bool(self.features >> F_RING_PACKED & 1)

    def start(
        self,
        mem: GuestMemory,
        features: int,
        state: RingState | None = None,
        inflight: list[InflightChain] | None = None,
    ) -> None:
        """Build the ring over guest memory once the driver has set the queue up.

        ``state`` and ``inflight`` restore a saved queue: the ring continues at the saved
        indexes, and the in-flight chains come out of ``pop`` first. Raises RingError when
        the configured areas are not usable (outside RAM, misaligned).
        """
        self.features = features
        mod = ring_module(self.impl)
        cls = mod.PackedRing if features >> F_RING_PACKED & 1 else mod.SplitRing
        ring = cls(mem, self.size, self.desc, self.driver, self.device, features)
        if state is not None:
            ring.set_state(state)
        for chain in inflight or []:
            ring.remember(chain.head, list(chain.segments))
        self.ring = ring
        self.drop_due()
        self._resubmit = list(inflight or [])
        self._requeue = False

    def stop(self) -> None:
        self.flush_interrupt()
        self.ring = None
        self.drop_due()
        self._resubmit = []
        self._requeue = False

    @property
    def started(self) -> bool:
        return self.ring is not None

    # -- the request path --

    def begin_pass(self) -> None:
        """A new pass of the device thread over this queue: a fresh budget."""
        self.more = False
        self._chains_left = self.size
        self._descs_left = PASS_DESCS_PER_SLOT * self.size
        if self._owed_at is not None:
            self._kicked = True

    def pop(self, max_chains: int = 64) -> Batch:
        if self.gate is not OPEN:
            return Batch.empty()
        if self._chains_left <= 0 or self._descs_left <= 0:
            self.more = True
            return Batch.empty()
        if self._requeue:
            self._resubmit = self.inflight()
            self._requeue = False
        if self._resubmit:
            batch = self._take_resubmit(min(max_chains, self._chains_left))
            self._descs_left -= len(batch.addr)
        else:  # from the ring (inline: a device thread pops once per guest kick)
            batch = self.ring.pop(min(max_chains, self._chains_left), self._descs_left)
            self._descs_left -= batch.walked
            if self.tracker is not None and len(batch.heads):
                self.tracker.fetched(batch)
        self._chains_left -= len(batch.heads)
        return batch

    def push(self, heads: np.ndarray | list[int], lengths: np.ndarray | list[int]) -> None:
        """Publish used entries (arrays, or lists of ints: the ring reads those directly)."""
        if self.gate is CLOSED:  # report stop: the chains stay in flight
            return
        if self.deferred is not None or self.tracker is not None:
            heads = np.asarray(heads, np.uint16)
            lengths = np.asarray(lengths, np.uint32)
        if self.deferred is not None:
            self.deferred.defer(heads, lengths)
            return
        self._publish(heads, lengths)

    def _publish(self, heads: np.ndarray, lengths: np.ndarray) -> None:
        tracker, log = self.tracker, self.log
        if log is not None:
            log.before_publish()
        if tracker is not None:
            tracker.using(heads)
        notify = self.ring.push(heads, lengths)
        if log is not None:
            log.published(self, len(heads))
        if tracker is not None:
            tracker.used(heads)
        if notify:
            self.interrupt()

    # -- interrupts --

    def interrupt(self) -> None:
        """The driver asked to hear of the used entries just published: tell it now, or
        hold the interrupt for up to ``hold`` so that what it submits meanwhile is answered
        by the same one (docs/architecture.md, "Held interrupts"; bench/guest_io.py
        measures what it does to UML and microvm under fio).

        A driver that waits for the interrupt before it submits again gains nothing from
        a hold and pays it in latency: a hold that no kick came into is not tried again
        for the next 1, 2, 4 ... HOLD_BACKOFF_MAX interrupts, and one that a kick came into
        ends that. Only an OPEN queue holds: a stopping or stopped one tells at once."""
        if self._owed_at is not None:
            return  # the held one covers these entries too
        if not self.hold or self.arm_hold is None or self.gate is not OPEN:
            self.notify()
            return
        if self._skip:
            self._skip -= 1
            self.notify()
            return
        self._owed_at = now = time.monotonic()
        self._kicked = False
        self.arm_hold(now + self.hold)

    def interrupt_due(self) -> float | None:
        """When the held interrupt must go out (time.monotonic()), None if none is held."""
        return None if self._owed_at is None else self._owed_at + self.hold

    def flush_interrupt(self) -> None:
        """Send the held interrupt, if there is one (the hold ran out, or a stop)."""
        if self._owed_at is None:
            return
        self._owed_at = None
        if self._kicked:
            self._backoff = 0
        else:
            self._backoff = min(HOLD_BACKOFF_MAX, 2 * self._backoff or 1)
            self._skip = self._backoff
        self.notify()

    def set_kicks(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not); True when chains are waiting already.

        Once the pass budget is spent it answers False without touching the ring: the
        device thread comes back to this queue after serving the others.
        """
        if self.gate is not OPEN:
            return False
        if enabled and self.more:
            return False
        return bool(self._resubmit) or self._requeue or self.ring.set_notify(enabled)

    @property
    def open(self) -> bool:
        return self.gate is OPEN

    # -- completions a backend finishes later (Deferred) --

    def next_due(self) -> float | None:
        return self.deferred.next_due() if self.deferred is not None else None

    def publish_due(self, now: float) -> None:
        """Publish the completions that are ready (a closed gate discards them: the chains
        stay in flight and are done again after resume or restore)."""
        if self.deferred is not None:
            for heads, lengths in self.deferred.take_due(now):
                if self.gate is not CLOSED:
                    self._publish(heads, lengths)

    def publish_all_due(self) -> None:
        """Drain: wait for every deferred completion and publish it."""
        if self.deferred is not None:
            for heads, lengths in self.deferred.take_all():
                self._publish(heads, lengths)

    def cancel_due(self) -> None:
        """Report stop: publish nothing more (``held`` counts what is still to be fenced)."""
        if self.deferred is not None:
            self.deferred.cancel()

    def drop_due(self) -> None:
        if self.deferred is not None:
            self.deferred.drop()

    def take_uncertain(self) -> int:
        return self.deferred.take_uncertain() if self.deferred is not None else 0

    def held(self) -> int:
        """Requests whose used entries are not published and that the backend may still
        be working on (a report stop waits for writes among them to be fenced)."""
        return self.deferred.count() if self.deferred is not None else 0

    # -- what a stuck queue needs read (VirtioDevice.describe) --

    def describe(self, mem: GuestMemory | None) -> str:
        """The device's side of the ring beside the driver's, one line. Device thread
        only: the ring core's own state changes under a pass."""
        if self.ring is None:
            return f"queue {self.index}: not started, gate {self.gate.value}"
        st = self.ring.state()
        aw = f" wrap {int(st.avail_wrap)}" if self.packed else ""
        uw = f" wrap {int(st.used_wrap)}" if self.packed else ""
        held = self._owed_at
        parts = [
            f"queue {self.index}: {'packed' if self.packed else 'split'} size {self.size}",
            f"gate {self.gate.value}",
            f"next_avail {st.next_avail}{aw}",
            f"next_used {st.next_used}{uw}",
            f"signalled_used {st.signalled_used}",
            f"in_flight {len(st.inflight)}",
            f"at_backend {self.held()}",
            f"kick_waiting {'yes' if _readable(self.kick_fd) else 'no'}",
            "interrupt_held "
            + ("no" if held is None else f"{(time.monotonic() - held) * 1e6:.0f}us"),
        ]
        if self.more:
            parts.append("budget_spent")
        return ", ".join(parts) + "; driver: " + self.describe_driver(mem)

    def describe_driver(self, mem: GuestMemory | None) -> str:
        """The ring's indexes and flags as guest memory has them now; any thread (the
        driver may be writing them meanwhile: a view, not a state; a frontend may be
        replacing the memory: then they are unreadable, never a crash)."""
        if mem is None or not self.ready:
            return "no ring set up"

        def u16(gpa: int) -> str:
            try:
                return str(mem.read_int(gpa, 2))
            except GuestMemoryError:
                return "outside RAM"
            except ValueError:  # its mmap was closed meanwhile (a new memory table)
                return "unmapped"

        if self.packed:  # event suppression areas: off_wrap, then flags
            return (
                f"driver_event off_wrap {u16(self.driver)} flags {u16(self.driver + 2)}, "
                f"device_event off_wrap {u16(self.device)} flags {u16(self.device + 2)}"
            )
        return (
            f"avail idx {u16(self.driver + 2)} flags {u16(self.driver)}, "
            f"used idx {u16(self.device + 2)} flags {u16(self.device)}, "
            f"used_event {u16(self.driver + 4 + 2 * self.size)}, "
            f"avail_event {u16(self.device + 4 + 8 * self.size)}"
        )

    # -- stop / state --

    def state(self) -> RingState:
        return self.ring.state()

    def inflight(self) -> list[InflightChain]:
        """Chains fetched and not used, in fetch order, with their segments (none known
        for a head restored in flight without its chain)."""
        ring = self.ring
        return [InflightChain(h, n, ring.segments(h) or []) for h, n in ring.state().inflight]

    def requeue_inflight(self) -> None:
        """After a stop: the next pops hand every in-flight chain to the device again.

        Only marked here (a stop must be quick); the list is built on the first pop.
        """
        self._requeue = True

    def _take_resubmit(self, max_chains: int) -> Batch:
        take, self._resubmit = self._resubmit[:max_chains], self._resubmit[max_chains:]
        return Batch.from_chains([(c.head, c.segments) for c in take])

    # -- kicks --

    def clear_kick(self) -> None:
        """Take the kick count if there is one, never waiting for it: a frontend's kick
        eventfd can be blocking (it can clear O_NONBLOCK on its side, which ours shares)
        and may be another ring's as well, whose read took the count. RWF_NOWAIT makes
        the read non-blocking whatever the file's flags (emu.devices._loop's is the same)."""
        try:
            os.preadv(self.kick_fd, [bytearray(8)], -1, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as e:  # a kernel without RWF_NOWAIT for eventfds: look, then read
            if e.errno != errno.EOPNOTSUPP:
                raise
            if _readable(self.kick_fd):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.kick_fd)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def swap_kick_fd(self, fd: int) -> int:
        """Use ``fd`` (e.g. a vhost-user frontend's eventfd) for kicks; returns the old fd,
        which the caller closes once nothing polls it (``VirtioDevice.set_kick_fd``)."""
        old, self.kick_fd = self.kick_fd, fd
        return old

    def close(self) -> None:
        os.close(self.kick_fd)
