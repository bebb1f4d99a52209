"""vhost-user backend: one emu device served over a unix socket to one frontend at a time.

The frontend (QEMU, UML, or emu's own test frontend) shares its RAM by fd; the device
reads rings and buffers there directly, on its own thread, exactly as in-process:

    frontend writes the kick eventfd -> device thread poll() -> handle_queue -> q.pop ->
    backend I/O into the mapped RAM -> q.push -> q.notify = Notifier.signal -> call fd

This module only turns messages into queue configuration: ``Session`` handles one
connection, ``VhostUserServer`` accepts them one after another.

Reply rules (shared/traces/vhost-user/README.md): requests with a reply of their own get
exactly that; any other request with need_reply gets a u64 (0 ok, 1 refused); nothing else
is answered. A request that is malformed (size, fds, unknown) closes the connection. A
well-formed request the backend will not carry out (e.g. a ring address outside the memory
table) is answered 1 when the frontend asked for an ack, and otherwise also closes the
connection, since the frontend would carry on believing it worked. The device is reset at
every disconnect; the server itself never goes down because of what a frontend sent.

BACKEND_REQ is offered because UML 6.1 needs it (without it virtio_uml puts the vring
interrupts on irq 0 and fails to probe); the channel carries the device's config change
notices (CONFIG_CHANGE_MSG: a balloon's new target), nothing else. The session owns its
extensions, each with its own handlers: DEVICE_STATE and state files (emu's snapshot
format, ``StateKeeper`` in device_state.py), and LOG_SHMFD / LOG_ALL, without which QEMU
7.2 will not migrate (``DirtyLog`` in dirty_log.py; docs/stop.md).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable

from emu.devices.base import RunState, VirtioDevice
from emu.memory import GuestMemory, GuestMemoryError
from emu.queue import Virtqueue
from emu.ringdefs import DESC_F_USED, F_RING_PACKED, F_RING_RESET, InflightChain, RingError
from emu.vhost_user.device_state import StateFiles, StateKeeper
from emu.vhost_user.dirty_log import F_LOG_ALL, VRING_F_LOG, DirtyLog
from emu.vhost_user.handler import Refused, Reply, handlers_of, handles
from emu.vhost_user.inflight import InflightRegion, reparse, restore_state
from emu.vhost_user.memtable import MAX_SLOTS, MemoryTable, MemRegion
from emu.vhost_user.protocol import (
    CONFIG_HEAD,
    F_PROTOCOL_FEATURES,
    INFLIGHT,
    MAX_CONFIG,
    MAX_REGIONS,
    MEM_REGION,
    MEM_TABLE_HEAD,
    OWN_REPLY,
    PF,
    U64,
    VRING_ADDR,
    VRING_IDX_MASK,
    VRING_NOFD,
    VRING_STATE,
    BackendReq,
    Message,
    PeerClosed,
    ProtocolError,
    Req,
    fd_kind,
    recv_message,
    reply,
    send_message,
)
from emu.vhost_user.vring import Vring, decode_base, encode_base

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (
    1 << PF.MQ
    | 1 << PF.REPLY_ACK
    | 1 << PF.BACKEND_REQ
    | 1 << PF.CONFIG
    | 1 << PF.INFLIGHT_SHMFD
    | 1 << PF.RESET_DEVICE
    | 1 << PF.CONFIGURE_MEM_SLOTS
    | 1 << PF.STATUS
    | 1 << PF.DEVICE_STATE
    | 1 << PF.LOG_SHMFD
)
#: device id -> feature bits a frontend may implement itself rather than forward: QEMU
#: keeps virtio-net's control queue and forwards GUEST_ANNOUNCE (and MQ) without CTRL_VQ
FRONTEND_KEPT = {1: 1 << 17}
#: vhost bits in the virtio feature word, never the device's: protocol features, and
#: LOG_ALL (dirty logging while migrating)
VHOST_BITS = 1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL
#: virtio status bits SET_STATUS/GET_STATUS care about
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
#: seconds between attempts when accept fails (no free fd): the frontend stays queued
ACCEPT_RETRY = 0.1


class Session:
    """One frontend connection driving one device."""

    def __init__(
        self,
        device: VirtioDevice,
        sock: socket.socket,
        negotiated: list[int] | None = None,
        state_files: StateFiles | None = None,
    ) -> None:
        self.device = device
        self.sock = sock
        self.negotiated = [] if negotiated is None else negotiated
        self.table = MemoryTable()
        self.vrings = [Vring(i) for i in range(len(device.queues))]
        self.vu_features = 0  # as SET_FEATURES sent them, bit 30 included
        self.protocol = 0
        self.status = 0
        self.inflight: InflightRegion | None = None
        self._later: list[Callable[[], None]] = []  # after_reply
        self.backend_req: socket.socket | None = None  # config change notices go there
        self._lost_notices = 0  # notices the frontend did not take (full or closed channel)
        self.device_state = StateKeeper(self, state_files)
        self.dirty_log = DirtyLog(self)
        self.handlers = {
            **handlers_of(self),
            **handlers_of(self.device_state),
            **handlers_of(self.dirty_log),
        }
        for q, vr in zip(device.queues, self.vrings, strict=True):
            q.notify = vr.call.signal
        device.on_needs_reset = self._needs_reset
        device.on_config_change = self._config_changed

    # -- the message loop --

    def run(self) -> None:
        while True:
            self.dispatch(recv_message(self.sock))

    def dispatch(self, msg: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "vhost-user: %s: F>B %s flags=%#x size=%d fds=%d %s",
                self.device.name,
                msg.name,
                msg.flags,
                len(msg.payload),
                len(msg.fds),
                msg.payload[:64].hex(),
            )
        status = 0
        try:
            try:
                result = self._handle(msg)
            except (Refused, GuestMemoryError, RingError) as e:
                if not msg.need_reply or msg.req in OWN_REPLY:
                    raise ProtocolError(f"{msg.name} refused: {e}") from e
                log.warning("vhost-user: %s refused: %s", msg.name, e)
                result, status = None, 1
        finally:
            msg.close_fds()  # whatever a handler did not take
        try:
            if result is not None:
                payload, fds = result if isinstance(result, tuple) else (result, [])
                self._reply(reply(msg, payload, fds))
            elif msg.need_reply:
                self._reply(reply(msg, U64.pack(status)))
        finally:
            later, self._later = self._later, []
            for fn in later:
                fn()

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the request being handled is answered: work the frontend must
        not wait for (GET_VRING_BASE is part of a migration's downtime)."""
        self._later.append(fn)

    def _reply(self, answer: Message) -> None:
        log.debug(
            "vhost-user: %s: B>F %s fds=%d %s",
            self.device.name,
            answer.name,
            len(answer.fds),
            answer.payload[:64].hex(),
        )
        send_message(self.sock, answer)

    def _handle(self, msg: Message) -> Reply:
        h = self.handlers.get(msg.req)
        if h is None:
            raise ProtocolError(f"unsupported request {msg.name}")
        if h.size is not None and len(msg.payload) != h.size:
            raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes, not {h.size}")
        if not h.min_fds <= len(msg.fds) <= h.max_fds:
            raise ProtocolError(
                f"{msg.name}: {len(msg.fds)} fds, expected {h.min_fds}..{h.max_fds}"
            )
        return h.fn(msg)

    # -- helpers --

    @property
    def features(self) -> int:
        return self.vu_features & ~VHOST_BITS

    @property
    def packed(self) -> bool:
        return bool(self.features >> F_RING_PACKED & 1)

    @property
    def mem(self) -> GuestMemory:
        return self.table.mem

    def offered_features(self) -> int:
        # RING_RESET has no vhost-user counterpart (a ring stops with GET_VRING_BASE)
        return self.device.features & ~(1 << F_RING_RESET) | VHOST_BITS

    def acceptable(self, virtio: int) -> bool:
        """The device's FEATURES_OK check, with what the frontend keeps to itself counted
        as negotiated (the device's dependency rules hold for the whole virtio device)."""
        kept = FRONTEND_KEPT.get(self.device.device_id, 0) & self.device.features
        return self.device.accept_features(virtio | kept)

    def offered_protocol(self) -> int:
        # no config space, no CONFIG: QEMU's vhost-user-rng warns that it cannot use it
        if not self.device.config_bytes():
            return PROTOCOL_FEATURES & ~(1 << PF.CONFIG)
        return PROTOCOL_FEATURES

    def _vring(self, index: int) -> tuple[Vring, Virtqueue]:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"vring index {index}, device has {len(self.vrings)}")
        return self.vrings[index], self.device.queues[index]

    def _vring_fd(self, msg: Message, kinds: tuple[str, ...]) -> tuple[Vring, Virtqueue, bool]:
        """Decode SET_VRING_KICK/CALL/ERR: (vring, queue, whether an fd came). The fd stays
        in ``msg`` (closed with it) until the handler hands it on."""
        (value,) = U64.unpack(msg.payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"{msg.name}: reserved bits set in {value:#x}")
        vr, q = self._vring(value & VRING_IDX_MASK)
        if value & VRING_NOFD:
            if msg.fds:
                raise ProtocolError(f"{msg.name}: an fd came with the nofd flag")
            return vr, q, False
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name}: no fd and no nofd flag")
        kind = fd_kind(msg.fds[0])
        if kind not in kinds:
            raise Refused(f"vring {vr.index}: fd is a {kind}, expected {' or '.join(kinds)}")
        return vr, q, True

    def _needs_reset(self, reason: str) -> None:
        log.error("vhost-user: %s needs a reset: %s", self.device.name, reason)
        for vr in self.vrings:
            vr.err.signal()

    def _config_changed(self) -> None:
        """Tell the frontend, so its guest reads the config again: CONFIG_CHANGE_MSG on the
        backend request channel, without need_reply. Any thread may call this (a
        balloon's control), so it never blocks: a frontend that does not read its channel
        loses the notice (logged), it does not hold the caller."""
        channel = self.backend_req
        if channel is None or not self.protocol >> PF.BACKEND_REQ & 1:
            log.info("vhost-user: %s config changed (no channel to say so)", self.device.name)
            return
        data = Message(BackendReq.CONFIG_CHANGE_MSG).pack()
        try:
            sent = channel.send(data, socket.MSG_DONTWAIT)
        except OSError as e:  # full, closed by the frontend, or replaced meanwhile
            sent, why = 0, str(e)
        else:
            why = "short write"
        if sent != len(data):
            self._lost_notices += 1
            if self._lost_notices & (self._lost_notices - 1) == 0:  # 1st, 2nd, 4th, ...
                log.warning(
                    "vhost-user: %s config change notice not sent (%d so far): %s",
                    self.device.name,
                    self._lost_notices,
                    why,
                )

    # -- ring start and stop --

    def _may_run(self, vr: Vring) -> bool:
        enabled = vr.enabled or not self.vu_features >> F_PROTOCOL_FEATURES & 1
        return vr.kicked and enabled and vr.addr is not None and vr.num > 0

    def _try_start(self, vr: Vring) -> None:
        q = self.device.queues[vr.index]
        if q.started or not self._may_run(vr) or not self.table.regions:
            return
        assert vr.addr is not None
        n, packed = vr.num, self.packed
        desc = self.table.to_gpa(vr.addr[0], 16 * n)
        driver = self.table.to_gpa(vr.addr[1], 4 if packed else 6 + 2 * n)
        device = self.table.to_gpa(vr.addr[2], 4 if packed else 6 + 8 * n)
        used_idx = 0 if packed else self.table.mem.read_int(device + 2, 2)
        base = vr.base
        if packed and base == 0 and not self.table.mem.read_int(desc + 14, 2) & DESC_F_USED:
            # UML 6.1 (virtio_uml) sends SET_VRING_BASE 0 for every ring, packed too, where
            # a fresh packed ring starts with both wrap counters set. A real base of 0 (both
            # indexes back at 0 after one lap) shows in desc[0]: the device marked it used
            # in that lap, which leaves its USED flag set; a fresh ring's is still clear.
            base = 1 << 15 | 1 << 31
        state = decode_base(base, packed, used_idx)
        if packed and max(state.next_avail, state.next_used) >= n:
            raise Refused(f"vring {vr.index}: base {vr.base:#x} beyond a ring of {n}")
        chains: list[InflightChain] = []
        q.tracker = None
        if (loaded := self.device_state.take_loaded(vr, q)) is not None:
            state, chains = loaded  # a loaded DEVICE_STATE (or restore file) wins
        elif self.inflight is not None and vr.index < self.inflight.num_queues:
            tracker = self.inflight.queues[vr.index]
            tracker.queue_size = n
            if packed:
                tracker.slots = lambda: dict(q.ring.state().inflight) if q.ring else {}
                found = tracker.recover(state.next_used)
                chains = reparse(self.table.mem, self.features, n, None, found)
            else:
                heads = tracker.recover(used_idx)
                found = [InflightChain(h, 0, []) for h in heads]
                chains = reparse(self.table.mem, self.features, n, desc, found)
                state.next_avail = (used_idx + len(chains)) & 0xFFFF
            q.tracker = tracker
        elif vr.saved is not None and encode_base(vr.saved[0], packed) == vr.base:
            state, chains = vr.saved
        if chains:
            log.info("vhost-user: vring %d resubmits %d in-flight chains", vr.index, len(chains))
        vr.saved = None
        q.size, q.desc, q.driver, q.device, q.ready = n, desc, driver, device, True
        self.device.restore_queue(vr.index, restore_state(state, chains), chains)
        try:
            if self.device.run_state is RunState.IDLE:
                self.device.activate(self.table.mem, self.features)
            else:
                self.device.start_queue(q)
        except ValueError as e:  # set_state refusing a base that cannot be real
            raise Refused(f"vring {vr.index}: {e}") from e
        if not q.started:
            raise Refused(f"vring {vr.index} did not start: {self.device.broken}")
        q.kick()  # serve whatever the driver made available while the ring was stopped

    def _stop(self, vr: Vring) -> None:
        q = self.device.queues[vr.index]
        saved = self.device.stop_queue(q, drain=self.device.policy == "drain")
        if saved is not None:
            vr.saved = saved
        q.ready = False
        q.tracker = None

    def _paused(self, change: Callable[[], None]) -> None:
        """Change the memory table with the device thread off every ring (rings built over
        the old table would not see new regions), then carry on where each ring stopped."""
        running = [vr for vr in self.vrings if self.device.queues[vr.index].started]
        for vr in running:
            self._stop(vr)
            assert vr.saved is not None
            vr.base = encode_base(vr.saved[0], self.packed)
        # the old table's page marks (used descriptors, avail_event) go with its regions:
        # into the log first, or a live migration loses them
        self.dirty_log.rings_stopped()
        try:
            change()
        finally:
            for vr in running:
                self._try_start(vr)

    def _rings_stopped(self) -> None:
        """GET_VRING_BASE: once the last running ring stopped, report the pages written to
        the dirty log and write the state file."""
        if any(q.started for q in self.device.queues):
            return
        self.dirty_log.rings_stopped()
        self.device_state.rings_stopped()

    def _reset_keeping_rings(self) -> None:
        """Device reset that keeps where the rings stopped, for the GET_VRING_BASE to come.

        QEMU 7.2 (with STATUS negotiated) sends SET_STATUS 0 at every stop *before*
        GET_VRING_BASE; QEMU 8.1 moved it after ("vhost-user: send SET_STATUS 0 after
        GET_VRING_BASE"). A plain reset there would answer GET_VRING_BASE with 0 and drop
        the requests in flight, and QEMU would carry that 0 into ``cont`` and the migration
        stream. So the running rings are stopped first (under the device's policy), and
        their saved state, base and size and the negotiated features outlive the reset;
        the device itself is reset as the spec says, and set up again by the frontend's
        start sequence.
        """

        def stop_and_reset() -> dict[int, tuple]:
            for vr in self.vrings:
                if self.device.queues[vr.index].started:
                    self._stop(vr)
            kept = {vr.index: (vr.saved, vr.num) for vr in self.vrings if vr.saved is not None}
            self.device.reset()
            self._forget_rings()  # its kick fd swaps too run here, not as commands of their own
            return kept

        # at most one trip to the device thread, none if it is parked (this is a
        # migration's downtime); the dirty log goes on: a migration's last stop comes here
        features = self.vu_features
        kept = self.device.call(stop_and_reset, borrow=True)
        self.vu_features = features
        for index, (saved, num) in kept.items():
            vr = self.vrings[index]
            vr.saved, vr.num = saved, num
            vr.base = encode_base(saved[0], self.packed)

    def reset(self) -> None:
        """Device reset (RESET_OWNER, RESET_DEVICE, disconnect): logging ends too."""
        self.device.reset()
        self._forget_rings()
        self.dirty_log.update()

    def _forget_rings(self) -> None:
        """What the connection knows of the rings, after the device was reset."""
        for q, vr in zip(self.device.queues, self.vrings, strict=True):
            q.tracker = None
            vr.close()
            self.vrings[vr.index] = fresh = Vring(vr.index)
            q.notify = fresh.call.signal
            self._own_kick_fd(q)
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            inflight.close()
        self.vu_features = 0
        self.status = 0

    def _own_kick_fd(self, q: Virtqueue) -> None:
        """Give ``q`` a kick eventfd of emu's own, so the frontend's is closed. Without a
        free fd the frontend's stays until the next SET_VRING_KICK replaces it: harmless,
        the queue is stopped, and a reset must not fail for want of an fd."""
        try:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as e:
            log.warning(
                "vhost-user: %s: queue %d keeps its kick fd: %s", self.device.name, q.index, e
            )
            return
        self.device.set_kick_fd(q, fd)

    def close(self) -> None:
        """End of the connection. Every step runs even when one before it fails (a process
        out of fds), so that what the connection holds is released all the same."""
        steps: list[Callable[[], None]] = [
            self.device_state.close,
            self.reset,
            self.dirty_log.close,
            self.table.clear,
            self.sock.close,
        ]
        channel, self.backend_req = self.backend_req, None  # no config change notice after
        if channel is not None:
            steps.append(channel.close)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("vhost-user: %s: cleanup step failed", self.device.name)

    # -- features --

    @handles(Req.GET_FEATURES, 0)
    def get_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_features())

    @handles(Req.SET_FEATURES, 8)
    def set_features(self, msg: Message) -> None:
        (value,) = U64.unpack(msg.payload)
        virtio = value & ~VHOST_BITS
        if value & ~self.offered_features() or not self.acceptable(virtio):
            raise Refused(f"features {value:#x} (offered {self.offered_features():#x})")
        if self.device.run_state is not RunState.IDLE and virtio != self.features:
            raise Refused(f"features {value:#x} changed while rings run")
        self.dirty_log.check_features(value)
        starts_logging = bool(value >> F_LOG_ALL & 1 and not self.vu_features >> F_LOG_ALL & 1)
        self.vu_features = value
        self.dirty_log.update(started_logging=starts_logging)  # on running rings too
        self.negotiated.append(virtio)
        log.info("vhost-user: %s: frontend set features %#x", self.device.name, value)

    @handles(Req.GET_PROTOCOL_FEATURES, 0)
    def get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_protocol())

    @handles(Req.SET_PROTOCOL_FEATURES, 8)
    def set_protocol_features(self, msg: Message) -> None:
        (value,) = U64.unpack(msg.payload)
        if value & ~self.offered_protocol():
            raise Refused(f"protocol features {value:#x} (offered {self.offered_protocol():#x})")
        self.protocol = value

    @handles(Req.SET_OWNER, 0)
    def set_owner(self, msg: Message) -> None:
        return None

    @handles(Req.RESET_OWNER, 0)
    def reset_owner(self, msg: Message) -> None:
        self.reset()

    @handles(Req.RESET_DEVICE, 0)
    def reset_device(self, msg: Message) -> None:
        self.reset()

    @handles(Req.GET_QUEUE_NUM, 0)
    def get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(len(self.vrings))

    @handles(Req.SET_BACKEND_REQ_FD, 0, (1, 1))
    def set_backend_req_fd(self, msg: Message) -> None:
        if fd_kind(msg.fds[0]) != "socket":
            raise Refused("backend request channel is not a socket")
        channel = socket.socket(fileno=msg.fds[0])
        msg.fds.pop()
        if self.backend_req is not None:
            self.backend_req.close()
        self.backend_req = channel

    @handles(Req.SET_STATUS, 8)
    def set_status(self, msg: Message) -> None:
        (value,) = U64.unpack(msg.payload)
        if value > 0xFF:
            raise Refused(f"status {value:#x} is not a status byte")
        if value == 0:
            self._reset_keeping_rings()  # QEMU 7.2 sends it at every stop
            return
        if value & S_FEATURES_OK and not self.acceptable(self.features):
            value &= ~S_FEATURES_OK
        self.status = value

    @handles(Req.GET_STATUS, 0)
    def get_status(self, msg: Message) -> bytes:
        return U64.pack(self.status | (S_NEEDS_RESET if self.device.broken else 0))

    # -- memory --

    @handles(Req.GET_MAX_MEM_SLOTS, 0)
    def get_max_mem_slots(self, msg: Message) -> bytes:
        return U64.pack(MAX_SLOTS)

    @handles(Req.SET_MEM_TABLE, None, (1, MAX_REGIONS))
    def set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < MEM_TABLE_HEAD.size:
            raise ProtocolError("SET_MEM_TABLE: payload shorter than its header")
        n, _ = MEM_TABLE_HEAD.unpack_from(msg.payload)
        # UML sends room for more regions than it fills (72 bytes for one): not an error
        room = (len(msg.payload) - MEM_TABLE_HEAD.size) // MEM_REGION.size
        if not 1 <= n <= min(room, MAX_REGIONS) or len(msg.payload) > 8 + 32 * MAX_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: {n} regions in {len(msg.payload)} bytes")
        if n != len(msg.fds):
            raise ProtocolError(f"SET_MEM_TABLE: {n} regions but {len(msg.fds)} fds")
        regions = [MemRegion.unpack(msg.payload, 8 + 32 * i) for i in range(n)]
        self.dirty_log.check_memory(max(r.gpa + r.size for r in regions))
        self._paused(lambda: self.table.replace(regions, msg.take_fds()))

    @handles(Req.ADD_MEM_REG, 8 + MEM_REGION.size, (1, 1))
    def add_mem_reg(self, msg: Message) -> None:
        region = MemRegion.unpack(msg.payload, 8)
        self.dirty_log.check_memory(region.gpa + region.size)
        self._paused(lambda: self.table.add(region, msg.fds.pop()))

    @handles(Req.REM_MEM_REG, 8 + MEM_REGION.size, (0, 1))
    def rem_mem_reg(self, msg: Message) -> None:
        region = MemRegion.unpack(msg.payload, 8)
        self._paused(lambda: self.table.remove(region))

    # -- vrings --

    @handles(Req.SET_VRING_NUM, 8)
    def set_vring_num(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        vr, q = self._vring(index)
        if q.started:
            raise Refused(f"vring {index} is running")
        if not 1 <= num <= q.max_size:
            raise Refused(f"vring {index}: size {num} not in 1..{q.max_size}")
        if not self.packed and num & (num - 1):
            raise Refused(f"vring {index}: split ring size {num} is not a power of 2")
        vr.num = num

    @handles(Req.SET_VRING_ADDR, VRING_ADDR.size)
    def set_vring_addr(self, msg: Message) -> None:
        """Ring addresses, and whether (and where) the used ring's writes are logged.

        On a running ring only the logging may change (QEMU turns it on and off there
        when a live migration starts, ends or fails); the addresses must be the ones the
        ring runs on."""
        index, flags, desc, used, avail, log_addr = VRING_ADDR.unpack(msg.payload)
        vr, q = self._vring(index)
        if flags & ~VRING_F_LOG:
            raise Refused(f"vring {index}: unknown flags {flags:#x}")
        if flags & VRING_F_LOG:
            self.dirty_log.check_ring(vr, log_addr)
        if q.started:
            if vr.addr != (desc, avail, used):
                raise Refused(f"vring {index} is running: its addresses cannot change")
        else:
            for addr in (desc, used, avail):
                self.table.to_gpa(addr, 1)  # GuestMemoryError: refused
            vr.addr = (desc, avail, used)
        vr.log_addr = log_addr if flags & VRING_F_LOG else None
        self.dirty_log.update()

    @handles(Req.SET_VRING_BASE, 8)
    def set_vring_base(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        vr, q = self._vring(index)
        if q.started:
            raise Refused(f"vring {index} is running")
        vr.base = num

    @handles(Req.GET_VRING_BASE, 8)
    def get_vring_base(self, msg: Message) -> bytes:
        index, _ = VRING_STATE.unpack(msg.payload)
        vr, q = self._vring(index)
        if q.started:
            self._stop(vr)
        vr.kicked = False  # stopped: only a new kick starts it again
        self._rings_stopped()
        base = encode_base(vr.saved[0], self.packed) if vr.saved else vr.base
        log.info("vhost-user: vring %d stopped at base %#x", index, base)
        return VRING_STATE.pack(index, base)

    @handles(Req.SET_VRING_KICK, 8, (0, 1))
    def set_vring_kick(self, msg: Message) -> None:
        vr, q, has_fd = self._vring_fd(msg, ("eventfd",))
        if not has_fd:
            raise Refused(f"vring {vr.index}: polling mode (kick nofd) is not supported")
        os.set_blocking(msg.fds[0], False)  # the device thread drains it; never block on it
        self.device.set_kick_fd(q, msg.fds.pop())
        vr.kicked = True
        self._try_start(vr)

    @handles(Req.SET_VRING_CALL, 8, (0, 1))
    def set_vring_call(self, msg: Message) -> None:
        vr, _, has_fd = self._vring_fd(msg, ("eventfd", "socket"))
        if not has_fd:
            vr.call.set(-1, "none")
        else:
            vr.call.set(msg.fds[0], fd_kind(msg.fds[0]))
            msg.fds.pop()

    @handles(Req.SET_VRING_ERR, 8, (0, 1))
    def set_vring_err(self, msg: Message) -> None:
        vr, _, has_fd = self._vring_fd(msg, ("eventfd",))
        vr.err.set(msg.fds.pop() if has_fd else -1)

    @handles(Req.SET_VRING_ENABLE, 8)
    def set_vring_enable(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        vr, q = self._vring(index)
        if num not in (0, 1):
            raise Refused(f"vring {index}: enable {num}")
        vr.enabled = bool(num)
        if vr.enabled:
            self._try_start(vr)
        elif q.started:
            self._stop(vr)
            assert vr.saved is not None
            vr.base = encode_base(vr.saved[0], self.packed)

    # -- config space --

    def _config_request(self, msg: Message) -> tuple[int, int, int, bytes]:
        if len(msg.payload) < CONFIG_HEAD.size:
            raise ProtocolError(f"{msg.name}: payload shorter than its header")
        offset, size, flags = CONFIG_HEAD.unpack_from(msg.payload)
        if size > MAX_CONFIG or offset > MAX_CONFIG - size:
            raise ProtocolError(f"{msg.name}: offset {offset} size {size} beyond {MAX_CONFIG}")
        if len(msg.payload) != CONFIG_HEAD.size + size:
            raise ProtocolError(f"{msg.name}: {len(msg.payload)} bytes for {size} of config")
        return offset, size, flags, msg.payload[CONFIG_HEAD.size :]

    @handles(Req.GET_CONFIG, None)
    def get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = self._config_request(msg)
        data = bytes(self.device.read_config(offset + i, 1) for i in range(size))
        return CONFIG_HEAD.pack(offset, size, flags) + data

    @handles(Req.SET_CONFIG, None)
    def set_config(self, msg: Message) -> None:
        offset, size, _, data = self._config_request(msg)
        if size:
            self.device.write_config(offset, size, int.from_bytes(data, "little"))

    # -- inflight tracking --

    def _inflight_layout(self, payload: bytes) -> tuple[int, int, int, int]:
        size, offset, num_queues, queue_size = INFLIGHT.unpack(payload)
        if not 1 <= num_queues <= len(self.vrings) or not 1 <= queue_size <= 32768:
            raise Refused(f"inflight for {num_queues} queues of {queue_size}")
        return size, offset, num_queues, max(queue_size, self.device.queue_max_size)

    @handles(Req.GET_INFLIGHT_FD, INFLIGHT.size)
    def get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        _, _, num_queues, desc_num = self._inflight_layout(msg.payload)
        if any(q.started for q in self.device.queues):
            raise Refused("inflight region replaced while rings run")
        if self.inflight is not None:
            old, self.inflight = self.inflight, None
            old.close()
        self.inflight = InflightRegion.create(num_queues, desc_num, self.packed)
        queue_size = INFLIGHT.unpack(msg.payload)[3]
        payload = INFLIGHT.pack(self.inflight.size, 0, num_queues, queue_size)
        return payload, [self.inflight.fd]

    @handles(Req.SET_INFLIGHT_FD, INFLIGHT.size, (1, 1))
    def set_inflight_fd(self, msg: Message) -> None:
        size, offset, num_queues, desc_num = self._inflight_layout(msg.payload)
        if any(q.started for q in self.device.queues):
            raise Refused("inflight region replaced while rings run")
        region = InflightRegion(msg.fds.pop(), size, offset, num_queues, desc_num, self.packed)
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()


class VhostUserServer:
    """Listens on ``path`` and serves one frontend connection at a time, for ever."""

    def __init__(
        self,
        device: VirtioDevice,
        path: str | os.PathLike,
        state_files: StateFiles | None = None,
    ) -> None:
        """``state_files``: ``emu serve --state-dir/--restore-dir`` for the device."""
        self.device = device
        self.path = os.fspath(path)
        self.state_files = state_files
        if os.path.exists(self.path) and stat.S_ISSOCK(os.stat(self.path).st_mode):
            os.unlink(self.path)  # a stale socket from an earlier run
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.connections = 0
        #: virtio features every frontend set (SET_FEATURES), in order: what a guest chose
        self.negotiated: list[int] = []
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> VhostUserServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="emu-vhost-user", daemon=True
        )
        self._thread.start()
        return self

    def describe(self) -> str:
        """Whom the socket serves, one line (``emu serve``'s SIGUSR1 report)."""
        if self._conn is not None:
            return f"{self.path}: frontend connected (connection {self.connections})"
        return f"{self.path}: no frontend ({self.connections} connections so far)"

    def serve_forever(self) -> None:
        """Serve connections one after another until ``close``. Nothing that goes wrong
        with one connection, nor a failed accept (a process out of fds), ends the loop."""
        while True:
            try:
                conn = self._accept()
            except OSError as e:
                log.error("vhost-user: %s: cannot accept a connection: %s", self.device.name, e)
                if self._stopped(ACCEPT_RETRY):  # the frontend waits in the backlog
                    return
                continue
            if conn is None:
                return
            self.connections += 1
            self._serve(conn)

    def _stopped(self, timeout: float) -> bool:
        """Whether ``close`` was called, waiting up to ``timeout`` seconds for it."""
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))

    def _accept(self) -> socket.socket | None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        if any(fd == self._stop for fd, _ in poller.poll()):
            return None
        conn, _ = self.listener.accept()
        self._conn = conn
        return conn

    def _serve(self, conn: socket.socket) -> None:
        log.info("vhost-user: %s: frontend connected on %s", self.device.name, self.path)
        session = None
        try:
            session = Session(self.device, conn, self.negotiated, self.state_files)
            session.run()
        except PeerClosed:
            log.info("vhost-user: %s: frontend disconnected", self.device.name)
        except ProtocolError as e:
            log.warning("vhost-user: %s: closing the connection: %s", self.device.name, e)
        except Exception:  # a bug here must not take the server down with it
            log.exception(
                "vhost-user: %s: internal error, closing the connection", self.device.name
            )
        finally:
            self._conn = None
            if session is not None:
                session.close()  # never raises
            else:
                conn.close()

    def close(self) -> None:
        os.eventfd_write(self._stop, 1)
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
        if self.state_files is not None:
            self.state_files.flush()  # a state file being written is finished first
        self.listener.close()
        os.close(self._stop)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
