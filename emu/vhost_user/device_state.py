"""Device state over vhost-user: DEVICE_STATE transfers, and state files for QEMU 7.2.

Saving: once every ring is stopped (GET_VRING_BASE), the device's state is emu's snapshot
format (``emu.state.format``): features, status, per ring VQ_CFG plus the RING_STATE and
INFLIGHT parts taken from ``Vring.saved``, the device's own ``save_state`` part, and an
optional TRANSPORT part (``{"transport": "vhost-user", "version": 1, "features",
"protocol", "bases"}``). It travels either through SET_DEVICE_STATE_FD (protocol feature
DEVICE_STATE) or, for frontends without it (QEMU 7.2), through a file ``emu serve
--state-dir`` writes whenever a device's last running ring stops.

Loading checks the whole state against the device before anything is applied; then the
device takes its part (``load_state``) and each ring's saved (RingState, in-flight chains)
waits for the frontend to start that ring (SET_VRING_NUM/BASE/ADDR/KICK): ``take_loaded``,
called by the session when a ring starts, hands them to it, so the chains are submitted
again exactly once. The frontend's features and base must match what was saved (QEMU
re-sends the source's GET_VRING_BASE value); anything else is refused rather than guessed.
A loaded state wins over an INFLIGHT_SHMFD region, which on a migration destination is
fresh: the region is seeded with the loaded chains so that tracking goes on.

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
import select
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from emu.vhost_user import dirty_log
from emu.vhost_user.backend import OWN_REPLY, Refused, Session, handles
from emu.vhost_user.protocol import U64, Message, Req, fd_kind
from emu.vhost_user.snapshot import LOAD, NO_FD, PHASE_STOPPED, SAVE, STATE_FD
from emu.vhost_user.vring import Vring, encode_base

log = logging.getLogger(__name__)

#: a transfer the frontend neither drains nor feeds ends after this long
TRANSFER_TIMEOUT = 30.0
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
    """One SET_DEVICE_STATE_FD transfer on its own thread; owns (and closes) the fd."""

    def __init__(self, fd: int, direction: int, data: bytes = b"") -> None:
        self.fd, self.direction, self.data = fd, direction, data
        self.received = bytearray()
        self.error: str | None = None
        self._cancelled = threading.Event()
        self._deadline = time.monotonic() + TRANSFER_TIMEOUT
        self.thread = threading.Thread(target=self._run, name="emu-device-state", daemon=True)
        self.thread.start()

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


@dataclass
class _SessionState:
    transfer: Transfer | None = None
    loaded: Loaded | None = None


_sessions: weakref.WeakKeyDictionary[Session, _SessionState] = weakref.WeakKeyDictionary()
#: ``emu serve --restore-dir``: a state for the first session that starts a ring
_pending: weakref.WeakKeyDictionary[VirtioDevice, Loaded] = weakref.WeakKeyDictionary()
#: ``emu serve --state-dir``: where each device's state goes when its rings stop
_state_files: weakref.WeakKeyDictionary[VirtioDevice, Path] = weakref.WeakKeyDictionary()


def _of(session: Session) -> _SessionState:
    return _sessions.setdefault(session, _SessionState())


# -- building and checking a state --


def build(session: Session) -> DeviceState:
    """The state of a device whose rings are all stopped."""
    dev = session.device
    if any(q.started for q in dev.queues):
        raise StateError(f"{dev.name}: a ring is still running")
    st = _sessions.get(session)
    waiting = st.loaded.rings if st is not None and st.loaded is not None else {}
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


def apply(session: Session, loaded: Loaded) -> None:
    """Give the device its part now and the rings theirs when they start."""
    dev = session.device
    if dev.run_state is not RunState.IDLE or any(vr.saved for vr in session.vrings):
        raise StateError(f"{dev.name}: a state loads into a device whose rings never ran")
    dev.load_state(loaded.device_part)  # refuses untouched (StateError)
    _of(session).loaded = loaded


# -- the ring start hook (Session._try_start) --


def take_loaded(session: Session, vr: Vring, q: Virtqueue) -> Ring | None:
    """The loaded (RingState, chains) for a ring about to start, if a state was loaded.

    Refused when the frontend's features or base are not the saved ones, or a chain's
    buffers are outside the memory it shared.
    """
    dev = session.device
    st = _sessions.get(session)
    if (st is None or st.loaded is None) and dev in _pending and dev.run_state is RunState.IDLE:
        apply(session, _pending.pop(dev))
        log.info("vhost-user: %s: state from the restore file applied", dev.name)
        st = _sessions.get(session)
    if st is None or st.loaded is None or vr.index not in st.loaded.rings:
        return None
    rs, chains = st.loaded.rings[vr.index]
    if session.features != st.loaded.driver_features:
        raise Refused(
            f"vring {vr.index}: features {session.features:#x}, "
            f"the loaded state has {st.loaded.driver_features:#x}"
        )
    base = encode_base(rs, session.packed)
    if vr.base != base:
        raise Refused(f"vring {vr.index}: base {vr.base:#x}, the loaded state has {base:#x}")
    try:
        for c in chains:
            for addr, length, _ in c.segments:
                session.table.mem.translate(addr, length)
    except GuestMemoryError as e:
        raise Refused(f"vring {vr.index}: a loaded in-flight chain is outside memory: {e}") from e
    if session.inflight is not None and vr.index < session.inflight.num_queues:
        _seed_region(session, vr, q, rs, chains)
    del st.loaded.rings[vr.index]
    return rs, chains


def _seed_region(session: Session, vr: Vring, q: Virtqueue, rs: RingState, chains: list) -> None:
    """Record the loaded chains in the (fresh) INFLIGHT_SHMFD region and track from it."""
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


# -- SET_STATUS 0 --


def reset_keeping_rings(session: Session) -> None:
    """Device reset that keeps where the rings stopped, for the GET_VRING_BASE to come.

    QEMU 7.2 (with STATUS negotiated) sends SET_STATUS 0 at every stop *before*
    GET_VRING_BASE; QEMU 8.1 moved it after ("vhost-user: send SET_STATUS 0 after
    GET_VRING_BASE"). A plain reset there would answer GET_VRING_BASE with 0 and drop the
    requests in flight, and QEMU would carry that 0 into ``cont`` and the migration
    stream. So the running rings are stopped first (under the device's policy), and their
    saved state, base and size and the negotiated features outlive the reset; the device itself
    is reset as the spec says, and set up again by the frontend's start sequence.
    """
    for vr in session.vrings:
        if session.device.queues[vr.index].started:
            session._stop(vr)
    kept = {vr.index: (vr.saved, vr.num) for vr in session.vrings if vr.saved is not None}
    features = session.vu_features
    session.reset()
    session.vu_features = features
    for index, (saved, num) in kept.items():
        vr = session.vrings[index]
        vr.saved, vr.num = saved, num
        vr.base = encode_base(saved[0], session.packed)


# -- state files (emu serve --state-dir / --restore-dir) --


def save_on_stop(dev: VirtioDevice, path: Path) -> None:
    """Write ``dev``'s state to ``path`` whenever all its rings have been stopped."""
    _state_files[dev] = path


def restore_file(dev: VirtioDevice, path: Path) -> None:
    """Check ``path`` against the fresh ``dev`` now; apply it when a frontend starts rings."""
    loaded = check(dev, statefile.load(path))
    dev.load_state(loaded.device_part)  # checks the device part; taken again at apply
    _pending[dev] = loaded


def state_files(
    dev: VirtioDevice, socket: str, state_dir: str | None, restore_dir: str | None
) -> None:
    """``emu serve``: DIR/<socket name>.state, saved at each stop and/or restored at start.

    A restore file that is missing or does not fit the device is an error (StateError):
    starting fresh would silently drop the requests the guest still waits for.
    """
    name = f"{Path(socket).name}.state"
    if restore_dir is not None:
        restore_file(dev, Path(restore_dir) / name)
    if state_dir is not None:
        save_on_stop(dev, Path(state_dir) / name)


def rings_stopped(session: Session) -> None:
    """GET_VRING_BASE hook: once the last running ring stopped, report the pages written
    to the dirty log and write the state file."""
    if any(q.started for q in session.device.queues):
        return
    dirty_log.flush(session)
    path = _state_files.get(session.device)
    if path is None:
        return
    if not any(vr.saved for vr in session.vrings):
        return
    try:
        statefile.save(path, build(session))
    except (OSError, StateError) as e:
        log.error("vhost-user: %s: cannot write state file %s: %s", session.device.name, path, e)
        return
    log.info("vhost-user: %s: state saved to %s", session.device.name, path)


# -- SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE --


def _fd_problem(fd: int, direction: int) -> str | None:
    kind = fd_kind(fd)
    if kind not in ("socket", "file") and not kind.startswith("pipe:"):
        return f"state fd is a {kind}, not a pipe, socket or file"
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if mode == (os.O_RDONLY if direction == SAVE else os.O_WRONLY):
        return f"state fd is not open for {'writing' if direction == SAVE else 'reading'}"
    return None


def _refuse(session: Session, why: str) -> bytes:
    log.warning("vhost-user: %s: SET_DEVICE_STATE_FD refused: %s", session.device.name, why)
    return U64.pack(NO_FD | 1)


@handles(Req.SET_DEVICE_STATE_FD, STATE_FD.size, (1, 1))
def set_device_state_fd(session: Session, msg: Message) -> bytes:
    direction, phase = STATE_FD.unpack(msg.payload)
    st = _of(session)
    if st.transfer is not None:  # a new transfer replaces an unfinished one
        st.transfer.cancel()
        st.transfer = None
    if direction not in (SAVE, LOAD):
        return _refuse(session, f"direction {direction}")
    if phase != PHASE_STOPPED:
        return _refuse(session, f"phase {phase}")
    if any(q.started for q in session.device.queues):
        return _refuse(session, "a ring is still running (stop it with GET_VRING_BASE)")
    why = _fd_problem(msg.fds[0], direction)
    if why is not None:
        return _refuse(session, why)
    data = b""
    if direction == SAVE:
        try:
            data = encode(build(session))
        except StateError as e:
            return _refuse(session, str(e))
    st.transfer = Transfer(msg.fds.pop(), direction, data)
    return U64.pack(NO_FD)


@handles(Req.CHECK_DEVICE_STATE, 0)
def check_device_state(session: Session, msg: Message) -> bytes:
    st = _of(session)
    transfer, st.transfer = st.transfer, None
    name = session.device.name
    if transfer is None:
        log.warning("vhost-user: %s: CHECK_DEVICE_STATE without a transfer", name)
        return U64.pack(1)
    error = transfer.finish()
    if error is not None:
        log.warning("vhost-user: %s: device state transfer failed: %s", name, error)
        return U64.pack(1)
    if transfer.direction == LOAD:
        try:
            apply(session, check(session.device, decode(bytes(transfer.received))))
        except StateError as e:
            log.warning("vhost-user: %s: device state refused: %s", name, e)
            return U64.pack(1)
        log.info("vhost-user: %s: device state loaded", name)
    return U64.pack(0)


OWN_REPLY.update({Req.SET_DEVICE_STATE_FD, Req.CHECK_DEVICE_STATE})
