"""vhost-user wire format: message numbers, payload layouts, and framed I/O with fds.

Both ends (emu's backend and its test frontend) use this module. Reading is strict because
the peer is not trusted: a header announcing more than ``MAX_PAYLOAD`` bytes, a short read,
or fds cut off by the kernel (MSG_CTRUNC) end the connection with ``ProtocolError``.
Fds received with a message are owned by the caller (``Message.close_fds`` when unused).
"""

from __future__ import annotations

import array
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct("<III")  # request, flags, payload size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEM_REGION = struct.Struct("<QQQQ")  # gpa, size, uva, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags
INFLIGHT = struct.Struct("<QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size

VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: replies carry exactly these flags; QEMU and UML refuse anything else
REPLY_FLAGS = VERSION | FLAG_REPLY

#: virtio feature bit saying the backend speaks GET/SET_PROTOCOL_FEATURES
F_PROTOCOL_FEATURES = 30
#: SET_VRING_KICK/CALL/ERR: no fd comes with the message
VRING_NOFD = 1 << 8
VRING_IDX_MASK = 0xFF
#: SET_VRING_ADDR flags: VHOST_VRING_F_LOG
VRING_F_LOG = 1

MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most any message carries
MAX_REGIONS = 8
MAX_CONFIG = 256
MAX_PAYLOAD = 4096


class Req(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


#: requests answered with a payload of their own, never with a bare ack. SET_LOG_BASE has
#: one when LOG_SHMFD is negotiated (QEMU waits for it); emu's backend always answers it.
OWN_REPLY = frozenset(
    {
        Req.GET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.GET_VRING_BASE,
        Req.GET_QUEUE_NUM,
        Req.GET_CONFIG,
        Req.GET_INFLIGHT_FD,
        Req.GET_MAX_MEM_SLOTS,
        Req.GET_STATUS,
        Req.SET_LOG_BASE,
        Req.SET_DEVICE_STATE_FD,
        Req.CHECK_DEVICE_STATE,
    }
)


class BackendReq(IntEnum):
    """Requests the backend sends on the backend request channel (SET_BACKEND_REQ_FD)."""

    CONFIG_CHANGE_MSG = 2


class PF(IntEnum):
    """Protocol feature bits."""

    MQ = 0
    LOG_SHMFD = 1
    REPLY_ACK = 3
    BACKEND_REQ = 5
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    DEVICE_STATE = 19


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (between messages: an orderly end)."""


@dataclass
class Message:
    req: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Req(self.req).name
        except ValueError:
            return f"request {self.req}"

    def pack(self) -> bytes:
        return HEADER.pack(self.req, self.flags, len(self.payload)) + self.payload

    def take_fds(self) -> list[int]:
        """The fds, now the caller's to close."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """``n`` bytes, collecting any fds that come along; ProtocolError on EOF or MSG_CTRUNC."""
    buf = bytearray()
    while len(buf) < n:
        data, anc, msg_flags, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * MAX_FDS))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {MAX_FDS} fds with one message (control data cut)")
        if not data:
            if not buf:
                raise PeerClosed("peer closed the connection")
            raise ProtocolError(f"connection closed {len(buf)} bytes into a {n}-byte read")
        buf += data
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """One message; on any error the fds received so far are closed before raising."""
    fds: list[int] = []
    try:
        req, flags, size = HEADER.unpack(_recv_exact(sock, HEADER.size, fds))
        if flags & 3 != VERSION:
            raise ProtocolError(f"message {req}: version {flags & 3}, expected {VERSION}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"message {req}: payload of {size} bytes (limit {MAX_PAYLOAD})")
        payload = _recv_exact(sock, size, fds) if size else b""
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"message {req}: {len(fds)} fds (limit {MAX_FDS})")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(req, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    """Header, payload and fds in one sendmsg (fds ride on the first byte)."""
    anc = []
    if msg.fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
    data = msg.pack()
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def reply(msg: Message, payload: bytes, fds: list[int] | None = None) -> Message:
    return Message(msg.req, REPLY_FLAGS, payload, fds or [])


def fd_kind(fd: int) -> str:
    """ "eventfd", "socket", "file", "memfd" or something else: what a peer sent us."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "unknown"
    if target == "anon_inode:[eventfd]":
        return "eventfd"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("/memfd:"):
        return "memfd"
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return "file"
    return target
