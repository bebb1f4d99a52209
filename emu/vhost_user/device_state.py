"""Device state over vhost-user: DEVICE_STATE transfers, and state files for QEMU 7.2.

Saving: once every ring is stopped (GET_VRING_BASE), the device's state is emu's snapshot
format (``emu.state.format``): features, status, per ring VQ_CFG plus the RING_STATE and
INFLIGHT parts taken from ``Vring.saved``, the device's own ``save_state`` part, and an
optional TRANSPORT part (``{"transport": "vhost-user", "version": 1, "features",
"protocol", "bases"}``). It travels either through SET_DEVICE_STATE_FD (protocol feature
DEVICE_STATE) or, for frontends without it (QEMU 7.2), through a file ``emu serve
--state-dir`` writes whenever a device's last running ring stops (right after answering
GET_VRING_BASE, so that the disk is not part of a migration's downtime).

Loading checks the whole state against the device before anything is applied; then the
device takes its part (``load_state``) and each ring's saved (RingState, in-flight chains)
waits for the frontend to start that ring (SET_VRING_NUM/BASE/ADDR/KICK): ``take_loaded``,
called by the session when a ring starts, hands them to it, so the chains are submitted
again exactly once. The frontend's features and base must match what was saved (QEMU
re-sends the source's GET_VRING_BASE value); anything else is refused rather than guessed.
A loaded state wins over an INFLIGHT_SHMFD region, which on a migration destination is
fresh: the region is seeded with the loaded chains so that tracking goes on.

Each session owns a ``StateKeeper`` (its transfers and loaded state); ``StateFiles`` holds
what ``emu serve --state-dir/--restore-dir`` asked for one device, shared by its sessions.

SET_DEVICE_STATE_FD: payload ``u32 direction (0 save, 1 load), u32 phase (0 stopped)`` and
one fd (pipe, socket or file). The reply is a u64 with bit 8 set (emu never returns an fd
of its own) and 0 in bits 0-7 when the transfer started, 1 when refused (a ring running, a
bad direction, phase or fd). The bytes move on a thread of their own, bounded in size and
time, so the frontend may write or read the pipe while it waits; CHECK_DEVICE_STATE waits
for it and answers 0 when the state was written, or read, decoded, validated and staged,
1 otherwise (and then nothing was applied).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from emu.devices.base import RunState, VirtioDevice
from emu.devices.snapshot import checked_save, device_part_of, target_of
from emu.memory import GuestMemoryError
from emu.queue import Virtqueue
from emu.ringdefs import Batch, InflightChain, RingState
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import MAX_STATE_BYTES, DeviceState, StateError, decode, encode
from emu.state.schema import Const, Int, Map, Schema
from emu.state.validate import check as check_state
from emu.vhost_user.handler import Refused, handles
from emu.vhost_user.inflight import InflightRegion
from emu.vhost_user.memtable import MemoryTable
from emu.vhost_user.protocol import U64, Message, Req, fd_kind
from emu.vhost_user.snapshot import LOAD, NO_FD, PHASE_STOPPED, SAVE, STATE_FD
from emu.vhost_user.vring import Vring, encode_base

log = logging.getLogger(__name__)

#: a transfer the frontend neither drains nor feeds ends after this long
TRANSFER_TIMEOUT = 30.0
#: how long a ring start waits for ``--restore-dir``'s file, and how often it looks
RESTORE_TIMEOUT = 60.0
RESTORE_POLL = 0.05
TRANSPORT = "vhost-user"
TRANSPORT_VERSION = 1
_U64 = 2**64 - 1
#: the TRANSPORT part: what the frontend had negotiated, and each saved ring's base
TRANSPORT_SCHEMA = Schema(
    "vhost-user transport",
    1,
    0,
    {
        "transport": Const(TRANSPORT),
        "version": Const(TRANSPORT_VERSION),
        "features": Int(0, _U64),
        "protocol": Int(0, _U64),
        "bases": Map(Int(0, 0xFFFFFFFF), 0x10000),
    },
)

Ring = tuple[RingState, list[InflightChain]]


@dataclass
class Loaded:
    """A state checked against the device, waiting to be applied or for rings to start."""

    driver_features: int
    device_part: dict
    rings: dict[int, Ring] = field(default_factory=dict)


class TransferError(Exception):
    """A transfer cancelled, timed out or too long."""


class Transfer:
    """One SET_DEVICE_STATE_FD transfer on its own thread; owns (and closes) the fd.

    The fd is made non-blocking: a frontend that stops reading a pipe it filled must not
    hold the thread (and so the session's cleanup) in a write past the deadline.
    """

    def __init__(self, fd: int, direction: int, data: bytes = b"") -> None:
        self.fd, self.direction, self.data = fd, direction, data
        try:
            os.set_blocking(fd, False)
        except OSError:
            os.close(fd)
            raise
        self.received = bytearray()
        self.error: str | None = None
        self._cancelled = threading.Event()
        self._deadline = time.monotonic() + TRANSFER_TIMEOUT
        self.thread = threading.Thread(target=self._run, name="emu-device-state", daemon=True)
        try:
            self.thread.start()
        except BaseException:
            os.close(fd)
            raise

    def _run(self) -> None:
        try:
            self._write() if self.direction == SAVE else self._read()
        except (OSError, TransferError) as e:
            self.error = str(e)
        finally:
            os.close(self.fd)

    def _wait(self, event: int) -> None:
        """Until the fd is ready; in slices, so that a cancel or the deadline ends it."""
        poller = select.poll()
        poller.register(self.fd, event)
        while not poller.poll(100):
            if self._cancelled.is_set():
                raise TransferError("transfer cancelled")
            if time.monotonic() > self._deadline:
                raise TransferError(f"transfer not done after {TRANSFER_TIMEOUT} s")

    def _write(self) -> None:
        view = memoryview(self.data)
        while view:
            self._wait(select.POLLOUT)
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                continue

    def _read(self) -> None:
        while True:
            self._wait(select.POLLIN)
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                return
            self.received += chunk
            if len(self.received) > MAX_STATE_BYTES:
                raise TransferError(f"state longer than {MAX_STATE_BYTES} bytes")

    def finish(self) -> str | None:
        """Wait for the end of the transfer; its error, if any."""
        self.thread.join()  # bounded: the thread gives up at the deadline
        return self.error

    def cancel(self) -> None:
        self._cancelled.set()
        self.thread.join()


class SessionView(Protocol):
    """What the state keeper reads of its session (``emu.vhost_user.backend.Session``)."""

    device: VirtioDevice
    vrings: list[Vring]
    table: MemoryTable
    inflight: InflightRegion | None
    vu_features: int
    protocol: int
    status: int

    @property
    def features(self) -> int: ...

    @property
    def packed(self) -> bool: ...

    def after_reply(self, fn: Callable[[], None]) -> None: ...


# -- building and checking a state --


def build(session: SessionView, waiting: dict[int, Ring]) -> DeviceState:
    """The state of a device whose rings are all stopped; ``waiting``: rings of a loaded
    state not started again since, which are still due."""
    dev = session.device
    if any(q.started for q in dev.queues):
        raise StateError(f"{dev.name}: a ring is still running")
    out = [
        parts.make(parts.DEV_FEATURES, dev.features),
        parts.make(parts.DRV_FEATURES, session.features),
        parts.make(parts.DEVICE_STATUS, session.status & 0xFF),
    ]
    bases = {}
    for vr, q in zip(session.vrings, dev.queues, strict=True):
        if vr.num == 0:
            continue  # never set up
        cfg = dict(size=vr.num, enabled=vr.enabled, desc=q.desc, driver=q.driver, device=q.device)
        out.append(parts.make(parts.VQ_CFG, cfg, vq=vr.index))
        ring = vr.saved or waiting.get(vr.index)  # loaded and not started again: still due
        if ring is None:
            continue
        rs, chains = ring
        out.append(parts.make(parts.RING_STATE, _ring_part(rs), vq=vr.index))
        chain_parts = [dict(head=c.head, ndesc=c.ndesc, segments=c.segments) for c in chains]
        out.append(parts.make(parts.INFLIGHT, chain_parts, vq=vr.index))
        bases[str(vr.index)] = encode_base(rs, session.packed)
    transport = dict(
        transport=TRANSPORT,
        version=TRANSPORT_VERSION,
        features=session.vu_features,
        protocol=session.protocol,
        bases=bases,
    )
    version = TRANSPORT_SCHEMA.version
    out.append(parts.make(parts.TRANSPORT, transport, optional=True, version=version))
    out.append(device_part_of(dev))
    return checked_save(DeviceState(dev.device_id, out), target_of(dev, TRANSPORT_SCHEMA))


def _ring_part(rs: RingState) -> dict:
    return dict(
        next_avail=rs.next_avail,
        next_used=rs.next_used,
        avail_wrap=rs.avail_wrap,
        used_wrap=rs.used_wrap,
        signalled_used=rs.signalled_used,
    )


def check(dev: VirtioDevice, state: DeviceState) -> Loaded:
    """Everything a restore needs, checked against ``dev`` by the validator the
    virtio-mmio restore uses too (``emu.state.validate``); nothing is applied here."""
    checked = check_state(state, target_of(dev, TRANSPORT_SCHEMA))
    return Loaded(checked.acked, checked.device, checked.rings)


# -- state files (emu serve --state-dir / --restore-dir) --


@dataclass
class StateFiles:
    """``emu serve``'s state files for one device, shared by every session of it."""

    #: ``--state-dir``: where the state goes whenever all the device's rings stop
    save_to: Path | None = None
    #: ``--restore-dir``: the state to apply when the first session starts a ring
    restore_from: Path | None = None
    #: ``--restore-timeout``: how long that ring start waits for the file to appear
    restore_timeout: float = RESTORE_TIMEOUT

    @classmethod
    def open(
        cls,
        dev: VirtioDevice,
        socket: str,
        state_dir: str | None,
        restore_dir: str | None,
        restore_timeout: float = RESTORE_TIMEOUT,
    ) -> StateFiles:
        """DIR/<socket name>.state, saved at each stop and/or restored at the first start.

        The restore file is read when the frontend starts a ring, not now: a live
        migration's destination starts before its source has stopped (the source writes
        the file at its last GET_VRING_BASE, which QEMU sends before the destination can
        start the device). A file already there is checked now all the same, so one that
        cannot fit the device is an error at start (StateError).
        """
        name = f"{Path(socket).name}.state"
        restore_from = None if restore_dir is None else Path(restore_dir) / name
        if restore_from is not None and restore_from.exists():
            dev.load_state(check(dev, statefile.load(restore_from)).device_part)
        save_to = None if state_dir is None else Path(state_dir) / name
        return cls(save_to, restore_from, restore_timeout)

    def __post_init__(self) -> None:
        if self.save_to is not None:  # started now: a thread start may take milliseconds
            self._queue: queue.Queue[tuple[DeviceState, str]] = queue.Queue()
            threading.Thread(target=self._writer, name="emu-state-file", daemon=True).start()

    def retire(self, name: str) -> None:
        """Before GET_VRING_BASE is answered: the old state file goes, so that no reader
        takes it for the one ``write`` is about to replace it with."""
        assert self.save_to is not None
        self.flush()  # a write still under way (stops in quick succession) goes first
        try:
            self.save_to.unlink(missing_ok=True)
        except OSError as e:
            log.error("vhost-user: %s: cannot remove old state file %s: %s", name, self.save_to, e)

    def write(self, state: DeviceState, name: str) -> None:
        """After the answer (the stop is a migration's downtime, the disk is not part of
        it): the new state file is written (temp, fsync, rename) by a thread of its own.
        A restore waits for it to appear; ``flush`` waits for it to be written."""
        self._queue.put((state, name))

    def flush(self) -> None:
        """Wait until every state file ``write`` asked for is on disk."""
        if self.save_to is not None:
            self._queue.join()

    def _writer(self) -> None:
        assert self.save_to is not None
        while True:
            state, name = self._queue.get()
            try:
                statefile.save(self.save_to, state)
                log.info("vhost-user: %s: state saved to %s", name, self.save_to)
            except (OSError, StateError) as e:
                log.error("vhost-user: %s: cannot write state file %s: %s", name, self.save_to, e)
            finally:
                self._queue.task_done()

    def take(self, dev: VirtioDevice) -> Loaded | None:
        """The restore file's state, checked against ``dev``, waiting for the file up to
        ``restore_timeout``; None without ``--restore-dir`` or once a state was taken. A
        missing or unfitting file is a StateError (and stays due: starting fresh would
        drop the requests the guest still waits for)."""
        path = self.restore_from
        if path is None:
            return None
        deadline = time.monotonic() + self.restore_timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise StateError(
                    f"no state file {path} after {self.restore_timeout:g} s (--restore-timeout)"
                )
            time.sleep(RESTORE_POLL)
        loaded = check(dev, statefile.load(path))
        self.restore_from = None
        return loaded


# -- one session's device state --


class StateKeeper:
    """A session's DEVICE_STATE transfers, the state loaded into it (by a transfer or a
    restore file) until its rings start, and the state file written at each stop."""

    def __init__(self, session: SessionView, files: StateFiles | None = None) -> None:
        self.session = session
        self.files = files if files is not None else StateFiles()
        self.transfer: Transfer | None = None
        self.loaded: Loaded | None = None

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.cancel()
            self.transfer = None

    def apply(self, loaded: Loaded) -> None:
        """Give the device its part now and the rings theirs when they start."""
        dev = self.session.device
        if dev.run_state is not RunState.IDLE or any(vr.saved for vr in self.session.vrings):
            raise StateError(f"{dev.name}: a state loads into a device whose rings never ran")
        dev.load_state(loaded.device_part)  # refuses untouched (StateError)
        self.loaded = loaded

    # -- the ring start hook (Session._try_start) --

    def take_loaded(self, vr: Vring, q: Virtqueue) -> Ring | None:
        """The loaded (RingState, chains) for a ring about to start, if a state was loaded.

        Refused when the frontend's features or base are not the saved ones, or a chain's
        buffers are outside the memory it shared.
        """
        session, dev = self.session, self.session.device
        if self.loaded is None and self.files.restore_from is not None:
            if dev.run_state is RunState.IDLE:
                try:
                    loaded = self.files.take(dev)
                except StateError as e:
                    raise Refused(f"vring {vr.index}: {e}") from e
                assert loaded is not None
                self.apply(loaded)
                log.info("vhost-user: %s: state from the restore file applied", dev.name)
        if self.loaded is None or vr.index not in self.loaded.rings:
            return None
        rs, chains = self.loaded.rings[vr.index]
        if session.features != self.loaded.driver_features:
            raise Refused(
                f"vring {vr.index}: features {session.features:#x}, "
                f"the loaded state has {self.loaded.driver_features:#x}"
            )
        base = encode_base(rs, session.packed)
        if vr.base != base:
            raise Refused(f"vring {vr.index}: base {vr.base:#x}, the loaded state has {base:#x}")
        try:
            for c in chains:
                for addr, length, _ in c.segments:
                    session.table.mem.translate(addr, length)
        except GuestMemoryError as e:
            raise Refused(
                f"vring {vr.index}: a loaded in-flight chain is outside memory: {e}"
            ) from e
        if session.inflight is not None and vr.index < session.inflight.num_queues:
            self._seed_region(vr, q, rs, chains)
        del self.loaded.rings[vr.index]
        return rs, chains

    def _seed_region(self, vr: Vring, q: Virtqueue, rs: RingState, chains: list) -> None:
        """Record the loaded chains in the (fresh) INFLIGHT_SHMFD region and track from it."""
        session = self.session
        assert session.inflight is not None
        tracker: Any = session.inflight.queues[vr.index]
        tracker.queue_size = vr.num
        if session.packed:
            tracker.slots = lambda: {c.head: c.ndesc for c in chains}
        if tracker.recover(rs.next_used):
            raise Refused(f"vring {vr.index}: the inflight region has requests of its own")
        if chains:
            tracker.fetched(Batch.from_chains([(c.head, c.segments) for c in chains]))
        if session.packed:
            tracker.slots = lambda: dict(q.ring.state().inflight) if q.ring else {}
        q.tracker = tracker

    # -- the stop hook: the state file --

    def build(self) -> DeviceState:
        return build(self.session, self.loaded.rings if self.loaded is not None else {})

    def rings_stopped(self) -> None:
        """Every ring is stopped: write the state file, if ``emu serve`` asked for one."""
        name = self.session.device.name
        if self.files.save_to is None or not any(vr.saved for vr in self.session.vrings):
            return
        try:
            state = self.build()
        except StateError as e:
            log.error("vhost-user: %s: cannot build the state: %s", name, e)
            return
        self.files.retire(name)
        self.session.after_reply(lambda: self.files.write(state, name))

    # -- SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE --

    def _refuse(self, why: str) -> bytes:
        log.warning(
            "vhost-user: %s: SET_DEVICE_STATE_FD refused: %s", self.session.device.name, why
        )
        return U64.pack(NO_FD | 1)

    @handles(Req.SET_DEVICE_STATE_FD, STATE_FD.size, (1, 1))
    def set_device_state_fd(self, msg: Message) -> bytes:
        direction, phase = STATE_FD.unpack(msg.payload)
        self.close()  # a new transfer replaces an unfinished one
        if direction not in (SAVE, LOAD):
            return self._refuse(f"direction {direction}")
        if phase != PHASE_STOPPED:
            return self._refuse(f"phase {phase}")
        if any(q.started for q in self.session.device.queues):
            return self._refuse("a ring is still running (stop it with GET_VRING_BASE)")
        why = _fd_problem(msg.fds[0], direction)
        if why is not None:
            return self._refuse(why)
        data = b""
        if direction == SAVE:
            try:
                data = encode(self.build())
            except StateError as e:
                return self._refuse(str(e))
        self.transfer = Transfer(msg.fds.pop(), direction, data)
        return U64.pack(NO_FD)

    @handles(Req.CHECK_DEVICE_STATE, 0)
    def check_device_state(self, msg: Message) -> bytes:
        transfer, self.transfer = self.transfer, None
        name = self.session.device.name
        if transfer is None:
            log.warning("vhost-user: %s: CHECK_DEVICE_STATE without a transfer", name)
            return U64.pack(1)
        error = transfer.finish()
        if error is not None:
            log.warning("vhost-user: %s: device state transfer failed: %s", name, error)
            return U64.pack(1)
        if transfer.direction == LOAD:
            try:
                self.apply(check(self.session.device, decode(bytes(transfer.received))))
            except StateError as e:
                log.warning("vhost-user: %s: device state refused: %s", name, e)
                return U64.pack(1)
            log.info("vhost-user: %s: device state loaded", name)
        return U64.pack(0)


def _fd_problem(fd: int, direction: int) -> str | None:
    kind = fd_kind(fd)
    if kind not in ("socket", "file") and not kind.startswith("pipe:"):
        return f"state fd is a {kind}, not a pipe, socket or file"
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if mode == (os.O_RDONLY if direction == SAVE else os.O_WRONLY):
        return f"state fd is not open for {'writing' if direction == SAVE else 'reading'}"
    return None
