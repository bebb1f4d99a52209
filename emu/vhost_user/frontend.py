"""A vhost-user frontend in Python: plays QEMU's part against any vhost-user backend.

Guest RAM is a memfd-backed ``GuestMemory`` shared with the backend. The frontend speaks
the protocol (negotiation, memory, vring setup, start and stop, config, DEVICE_STATE) and
knows where each ring lies, not what is in it: a driver lays the rings out in ``mem`` and
adds and completes buffers (``emu.testing.vhost_user.VhostUserDriver`` puts the reference
driver's rings on top, so emu.testing's device helpers drive a backend through it). Ring
addresses are sent as "user" addresses offset from guest-physical ones (as QEMU's are),
which checks that a backend translates them through the memory table.

Every request that has no reply of its own asks for a REPLY_ACK when the backend offers
it, so a refusal surfaces at the call that caused it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import time
from typing import Protocol

from emu.memory import GuestMemory
from emu.ringdefs import F_EVENT_IDX, F_IN_ORDER, F_INDIRECT_DESC, F_RING_PACKED
from emu.vhost_user import snapshot
from emu.vhost_user.dirty_log import F_LOG_ALL, LOG_BASE, VRING_F_LOG, log_take
from emu.vhost_user.protocol import (
    CONFIG_HEAD,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    INFLIGHT,
    MEM_TABLE_HEAD,
    OWN_REPLY,
    PF,
    REPLY_FLAGS,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    BackendReq,
    Message,
    ProtocolError,
    Req,
    recv_message,
    send_message,
)

#: where guest RAM appears in the frontend's own address space (as QEMU's 0x7f.. uvas)
UVA_OFFSET = 0x7F00_0000_0000
#: guest bytes per u64 word of the dirty log (QEMU's VHOST_LOG_CHUNK)
LOG_CHUNK = 64 << 12
WANTED_PROTOCOL = (
    1 << PF.MQ
    | 1 << PF.REPLY_ACK
    | 1 << PF.CONFIG
    | 1 << PF.CONFIGURE_MEM_SLOTS
    | 1 << PF.INFLIGHT_SHMFD
    | 1 << PF.RESET_DEVICE
    | 1 << PF.STATUS
    | 1 << PF.DEVICE_STATE
)


class FrontendError(Exception):
    """The backend refused a request (non-zero ack) or answered nonsense."""


class Ring(Protocol):
    """Where a driver laid out one ring in guest memory (guest-physical addresses)."""

    index: int
    size: int
    desc: int
    driver: int
    device: int
    packed: bool


def connect(path: str | os.PathLike, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying while the backend is still starting up."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class VhostUserFrontend:
    def __init__(
        self,
        path: str | os.PathLike,
        mem_size: int = 16 << 20,
        *,
        add_mem_reg: bool | None = None,
        inflight: bool = False,
        timeout: float = 10.0,
        ram: str | os.PathLike = "memfd",
        backend_req: bool = False,
    ) -> None:
        """``add_mem_reg`` shares RAM with ADD_MEM_REG (None: when the backend offers
        CONFIGURE_MEM_SLOTS) instead of SET_MEM_TABLE; ``inflight`` asks for an
        INFLIGHT_SHMFD region at start, as QEMU does when it is offered; ``ram`` is a
        sealable memfd (as QEMU's memory-backend-memfd) or a file path (as UML's RAM);
        ``backend_req`` gives the backend a request channel (SET_BACKEND_REQ_FD, as UML
        does), whose config change notices count as config interrupts."""
        self.sock = connect(path, timeout)
        self.mem = GuestMemory.create(mem_size, backing=ram)
        self.queues: dict[int, Ring] = {}
        self.features = 0
        self.vhost_bits = 0  # PROTOCOL_FEATURES, sent with every SET_FEATURES
        self.protocol = 0
        self.log_fd = -1  # the dirty log's memfd while one was given (SET_LOG_BASE)
        self.log: mmap.mmap | None = None
        self._taken: set[int] = set()  # read from a log since replaced, not yet returned
        self.config_interrupts = 0
        self.add_mem_reg = add_mem_reg
        self.want_inflight = inflight
        self.inflight_fd = -1
        self.inflight_payload = b""
        self._calls: dict[int, int] = {}
        self._kicks: dict[int, int] = {}
        self.want_backend_req = backend_req
        self.backend_req: socket.socket | None = None  # our end of the channel

    # -- messages --

    def request(
        self,
        req: Req,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        ack: bool = True,
    ) -> Message:
        """Send one request; returns its reply (or the ack) after checking its header.

        ``ack=False`` sends it without need_reply, as QEMU sends most of its requests."""
        ack = ack and req not in OWN_REPLY and bool(self.protocol >> PF.REPLY_ACK & 1)
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        send_message(self.sock, Message(req, flags, payload, list(fds or [])))
        if req not in OWN_REPLY and not ack:
            return Message(req)
        answer = recv_message(self.sock)
        if answer.req != req or answer.flags != REPLY_FLAGS:
            answer.close_fds()
            raise ProtocolError(f"{req.name}: reply {answer.req} flags {answer.flags:#x}")
        if ack and U64.unpack(answer.payload) != (0,):
            raise FrontendError(f"backend refused {req.name}: {answer.payload.hex()}")
        return answer

    def get_u64(self, req: Req) -> int:
        return U64.unpack(self.request(req).payload)[0]

    def set_u64(self, req: Req, value: int, fds: list[int] | None = None) -> None:
        self.request(req, U64.pack(value), fds)

    # -- initialisation --

    def init(
        self,
        features: int | None = None,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
    ) -> int:
        """Negotiate and share guest RAM; returns the virtio features accepted."""
        offered = self.get_u64(Req.GET_FEATURES)
        if offered >> F_PROTOCOL_FEATURES & 1:
            wanted = WANTED_PROTOCOL | (1 << PF.BACKEND_REQ if self.want_backend_req else 0)
            self.protocol = self.get_u64(Req.GET_PROTOCOL_FEATURES) & wanted
            self.set_u64(Req.SET_PROTOCOL_FEATURES, self.protocol)
        self.request(Req.SET_OWNER)
        if self.protocol >> PF.BACKEND_REQ & 1 and self.backend_req is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.request(Req.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self.backend_req = ours
        wanted = offered & ~(1 << F_IN_ORDER | 1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL)
        if features is not None:
            wanted = features
        for bit, on in (
            (F_RING_PACKED, packed),
            (F_EVENT_IDX, event_idx),
            (F_INDIRECT_DESC, indirect),
        ):
            wanted = wanted | 1 << bit if on else wanted & ~(1 << bit)
        accepted = wanted & offered & ~(1 << F_PROTOCOL_FEATURES)
        if packed and not accepted >> F_RING_PACKED & 1:
            raise FrontendError("backend does not offer VIRTIO_F_RING_PACKED")
        self.vhost_bits = offered & 1 << F_PROTOCOL_FEATURES
        self.set_u64(Req.SET_FEATURES, accepted | self.vhost_bits)
        self.features = accepted
        if self.want_inflight and self.protocol >> PF.INFLIGHT_SHMFD & 1:
            self._get_inflight()
        self.share_memory()
        return accepted

    def _get_inflight(self, queue_size: int = 128) -> None:
        nq = self.get_u64(Req.GET_QUEUE_NUM) if self.protocol >> PF.MQ & 1 else 1
        answer = self.request(Req.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, nq, queue_size))
        if len(answer.fds) != 1:
            answer.close_fds()
            raise FrontendError("GET_INFLIGHT_FD came back without an fd")
        self.inflight_fd, self.inflight_payload = answer.fds[0], answer.payload
        self.request(Req.SET_INFLIGHT_FD, answer.payload, [self.inflight_fd])

    def region_payload(self, index: int = 0) -> bytes:
        r = self.mem.regions[index]
        return U64.pack(r.gpa) + U64.pack(r.size) + U64.pack(r.gpa + UVA_OFFSET) + U64.pack(0)

    def share_memory(self) -> None:
        add = self.add_mem_reg
        if add is None:
            add = bool(self.protocol >> PF.CONFIGURE_MEM_SLOTS & 1)
        if add:
            for i, r in enumerate(self.mem.regions):
                self.request(Req.ADD_MEM_REG, bytes(8) + self.region_payload(i), [r.fd])
        else:
            n = len(self.mem.regions)
            table = MEM_TABLE_HEAD.pack(n, 0) + b"".join(self.region_payload(i) for i in range(n))
            self.request(Req.SET_MEM_TABLE, table, [r.fd for r in self.mem.regions])

    def setup_vring(self, q: Ring) -> None:
        """Hand the backend a ring the driver laid out: CALL, NUM, BASE, ADDR, as QEMU."""
        self.set_u64(Req.SET_VRING_CALL, q.index, [self._eventfd(self._calls, q.index)])
        self.request(Req.SET_VRING_NUM, VRING_STATE.pack(q.index, q.size))
        # a fresh packed ring starts with both wrap counters set (bits 15 and 31)
        base = 1 << 15 | 1 << 31 if q.packed else 0
        self.request(Req.SET_VRING_BASE, VRING_STATE.pack(q.index, base))
        self.set_vring_addr(q)
        self.queues[q.index] = q

    @staticmethod
    def _eventfd(fds: dict[int, int], index: int) -> int:
        """Ring ``index``'s eventfd in ``fds``, made once and sent again at every start
        (as QEMU re-sends the same kick and call eventfds at ``cont``)."""
        if index not in fds:
            fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fds[index]

    def set_vring_addr(self, q: Ring, log: bool = False, *, ack: bool = True) -> None:
        """``log``: VHOST_VRING_F_LOG, used-ring writes logged at its guest-physical address
        (as QEMU, the address goes with the flag cleared too)."""
        payload = VRING_ADDR.pack(
            q.index,
            VRING_F_LOG if log else 0,
            q.desc + UVA_OFFSET,
            q.device + UVA_OFFSET,
            q.driver + UVA_OFFSET,
            q.device,
        )
        self.request(Req.SET_VRING_ADDR, payload, ack=ack)

    def driver_ok(self) -> None:
        """Start every ring: SET_VRING_KICK then SET_VRING_ENABLE 1, as QEMU does."""
        for index in self.queues:
            self.start_ring(index)

    def start_ring(self, index: int) -> None:
        self.set_u64(Req.SET_VRING_KICK, index, [self._eventfd(self._kicks, index)])
        self.request(Req.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))

    def stop_ring(self, index: int) -> int:
        """QEMU's stop: SET_VRING_ENABLE 0, then GET_VRING_BASE; returns the base."""
        self.request(Req.SET_VRING_ENABLE, VRING_STATE.pack(index, 0))
        answer = self.request(Req.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        got_index, base = VRING_STATE.unpack(answer.payload)
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE answered for vring {got_index}")
        return base

    def restart_ring(self, index: int, base: int) -> None:
        """QEMU's cont: CALL, NUM, BASE, ADDR, KICK, ENABLE with the base from the stop
        (libvhost-user closes the call fd at GET_VRING_BASE, so it is sent again)."""
        q = self.queues[index]
        self.set_u64(Req.SET_VRING_CALL, index, [self._calls[index]])
        self.request(Req.SET_VRING_NUM, VRING_STATE.pack(index, q.size))
        self.request(Req.SET_VRING_BASE, VRING_STATE.pack(index, base))
        self.set_vring_addr(q)
        self.start_ring(index)

    # -- dirty logging: QEMU 7.2's live migration (hw/virtio/vhost.c) on running rings --

    def log_size(self) -> int:
        """QEMU's log size: a bit per page up to the end of guest memory, in u64 words."""
        end = max(r.end for r in self.mem.regions)
        return ((end - 1) // LOG_CHUNK + 1) * 8

    def set_log_base(self, size: int | None = None) -> None:
        """SET_LOG_BASE with a new sealed memfd (QEMU's log, resized or not), which
        replaces the one before; QEMU waits for the answer (LOG_SHMFD)."""
        size = size or self.log_size()
        fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        log = mmap.mmap(fd, size)
        try:
            self.request(Req.SET_LOG_BASE, LOG_BASE.pack(size, 0), [fd])
        except BaseException:
            log.close()
            os.close(fd)
            raise
        old = self.dirty_pages()  # QEMU reads the old log once more after the answer
        self.drop_log()
        self.log_fd, self.log = fd, log
        self._taken |= old

    def start_logging(self, size: int | None = None) -> None:
        """``vhost_log_global_start``: SET_LOG_BASE, SET_FEATURES + LOG_ALL (need_reply),
        then per ring SET_VRING_ADDR with VHOST_VRING_F_LOG (need_reply)."""
        self.set_log_base(size)
        self.set_u64(Req.SET_FEATURES, self.features | 1 << F_LOG_ALL | self.vhost_bits)
        for q in self.queues.values():
            self.set_vring_addr(q, log=True)

    def stop_logging(self) -> None:
        """``vhost_log_global_stop`` (a cancelled or failed migration), and the rollback
        of a refused start: SET_FEATURES without LOG_ALL, SET_VRING_ADDR with the flag
        cleared, neither asking for a reply. The log stays mapped on both sides."""
        self.request(Req.SET_FEATURES, U64.pack(self.features | self.vhost_bits), ack=False)
        for q in self.queues.values():
            self.set_vring_addr(q, ack=False)

    def dirty_pages(self) -> set[int]:
        """QEMU's log sync: the pages logged since the last call (taken atomically, so a
        bit the backend sets meanwhile stays for the next call)."""
        taken, self._taken = self._taken, set()
        if self.log is not None:
            taken |= {int(p) for p in log_take(self.log)}
        return taken

    def drop_log(self) -> None:
        if self.log is not None:
            self.log.close()
            os.close(self.log_fd)
            self.log, self.log_fd = None, -1

    def save_state(self) -> bytes:
        """DEVICE_STATE save of a backend whose rings are stopped (emu.vhost_user.snapshot)."""
        return snapshot.save_state(self)

    def load_state(self, data: bytes) -> None:
        """DEVICE_STATE load, before the rings are restarted (emu.vhost_user.snapshot)."""
        snapshot.load_state(self, data)

    def no_interrupts(self, index: int) -> None:
        self.set_u64(Req.SET_VRING_CALL, index | VRING_NOFD)

    # -- config space --

    def config_read(self, offset: int, size: int) -> int:
        """Reads from offset 0 up to the field's end, as QEMU and UML do: libvhost-user
        backends (qemu-storage-daemon) ignore the offset and copy from the start."""
        end = offset + size
        answer = self.request(Req.GET_CONFIG, CONFIG_HEAD.pack(0, end, 0) + bytes(end))
        if answer.payload[: CONFIG_HEAD.size] != CONFIG_HEAD.pack(0, end, 0):
            raise FrontendError(f"GET_CONFIG answered {answer.payload[:12].hex()}")
        if len(answer.payload) != CONFIG_HEAD.size + end:
            raise FrontendError(f"GET_CONFIG: {len(answer.payload)} bytes for {end}")
        return int.from_bytes(answer.payload[CONFIG_HEAD.size + offset :], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")
        self.request(Req.SET_CONFIG, CONFIG_HEAD.pack(offset, size, 0) + data)

    def backend_requests(self, timeout: float = 0.0) -> list[Message]:
        """What the backend sent on its request channel, waiting up to ``timeout`` for the
        first; config change notices are counted in ``config_interrupts``."""
        got: list[Message] = []
        if self.backend_req is None:
            return got
        while select.select([self.backend_req], [], [], 0 if got else timeout)[0]:
            msg = recv_message(self.backend_req)
            msg.close_fds()
            if msg.req == BackendReq.CONFIG_CHANGE_MSG:
                self.config_interrupts += 1
            got.append(msg)
        return got

    # -- notifications --

    def kick(self, qidx: int) -> None:
        os.eventfd_write(self._kicks[qidx], 1)

    def wait_call(self, qidx: int, timeout: float) -> bool:
        """Sleep until the backend signals ring ``qidx``'s call eventfd (False: timed out)."""
        call = self._calls[qidx]
        if timeout <= 0 or not select.select([call], [], [], timeout)[0]:
            return False
        try:
            os.eventfd_read(call)
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()
        if self.backend_req is not None:
            self.backend_req.close()
        for fd in [*self._calls.values(), *self._kicks.values()]:
            os.close(fd)
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
        self.drop_log()
        self._calls.clear()
        self._kicks.clear()
        self.mem.close()
