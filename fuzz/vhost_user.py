"""vhost-user message dispatch: emu's backend Session against a hostile frontend.

A fresh device and a ``Session`` on one end of a socketpair, as ``VhostUserServer`` runs
it; this target is the frontend on the other end. Each step is one op byte and a fixed
block of parameter bytes, so that all-zero parameters are a sane frontend (the seeds are
QEMU-like start sequences) and nonzero ones twist it: need_reply, raw payloads of any
size, fds of the wrong kind or number (eventfd, sealed or unsealed memfd, files opened
read-only or write-only, sockets, pipes), out-of-range indexes, sizes and addresses,
unknown requests. Besides messages, the frontend acts as the guest: it writes chains into
the shared memory and kicks. Messages travel through the real wire format
(``recv_message``) with real fds (SCM_RIGHTS).

Properties: a message either is handled or ends the connection with ProtocolError (the
server's orderly close); nothing else escapes ``dispatch`` and no device thread catches an
unexpected exception; closing the session raises nothing (the server's ``finally``) and
leaves no fd and no thread behind.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

from emu.ringdefs import DESC_F_AVAIL, DESC_F_WRITE, F_RING_PACKED
from emu.vhost_user import device_state  # noqa: F401  (registers DEVICE_STATE handlers)
from emu.vhost_user.backend import PROTOCOL_FEATURES, VHOST_BITS, Session
from emu.vhost_user.protocol import (
    CONFIG_HEAD,
    FLAG_NEED_REPLY,
    HEADER,
    INFLIGHT,
    MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    ProtocolError,
    Req,
    recv_message,
)
from emu.vhost_user.snapshot import STATE_FD
from fuzz import _devices
from fuzz._draw import Draw
from fuzz._oracle import Finding, Watch

MAX_LEN = 4096
MAX_STEPS = 40
PARAMS = 24  # parameter bytes per step
RAM = 0x10000  # the shared memory: ring i at 0x1000 * (i + 1), buffers from 0x8000
UVA = 0x7F0000000000
_DESC = struct.Struct("<QIHH")

OPS = [
    Req.GET_FEATURES,
    Req.SET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.SET_PROTOCOL_FEATURES,
    Req.SET_OWNER,
    Req.SET_MEM_TABLE,
    Req.SET_VRING_NUM,
    Req.SET_VRING_ADDR,
    Req.SET_VRING_BASE,
    Req.SET_VRING_CALL,
    Req.SET_VRING_KICK,
    Req.SET_VRING_ENABLE,
    Req.GET_VRING_BASE,
    "offer",
    "kick",
    Req.GET_CONFIG,
    Req.SET_CONFIG,
    Req.GET_INFLIGHT_FD,
    Req.SET_INFLIGHT_FD,
    Req.SET_STATUS,
    Req.GET_STATUS,
    Req.RESET_OWNER,
    Req.RESET_DEVICE,
    Req.ADD_MEM_REG,
    Req.REM_MEM_REG,
    Req.SET_VRING_ERR,
    Req.SET_BACKEND_REQ_FD,
    Req.SET_DEVICE_STATE_FD,
    Req.CHECK_DEVICE_STATE,
    Req.GET_QUEUE_NUM,
    Req.GET_MAX_MEM_SLOTS,
    Req.SET_LOG_BASE,
    "raw",
    "poke",
]
FD_KINDS = [
    "default",
    "eventfd",
    "memfd",
    "memfd-unsealed",
    "memfd-small",
    "file",
    "file-wronly",
    "file-rdonly",
    "socket",
    "pipe-r",
    "pipe-w",
    "devnull",
]


class Frontend:
    def __init__(self, d: Draw) -> None:
        how = d.u8()
        self.dev = _devices.make((4, 2, 1, 3)[how % 4], how >> 2 & 3, queue_max_size=16)
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.session = Session(self.dev, theirs)
        self.ram = self._memfd(RAM, sealed=not how & 0x80)
        self.brought: dict[int, str] = {}  # fd number in emu's hands -> the message it came with
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.closed = False
        self.kept: list[int] = []
        self.slot = [0] * 8  # per ring: the driver's next avail index / packed slot
        self.wrap = [True] * 8

    def keep(self, fd: int) -> None:
        """Our end of a save pipe: open while emu writes (a state is far below a pipe's
        buffer, so the transfer never waits for us), closed with the next one."""
        for old in self.kept:
            os.close(old)
        self.kept = [fd]

    # -- fds a frontend may send --

    def _memfd(self, size: int, sealed: bool) -> int:
        fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    def make_fd(self, kind: str, default: str) -> int:
        """A new fd of ``kind`` (ours to close after sending)."""
        kind = default if kind == "default" else kind
        if kind == "ram":
            return os.dup(self.ram)
        if kind == "kick":
            return os.dup(self.kicks[0])
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind.startswith("memfd"):
            return self._memfd(0x1000 if kind == "memfd-small" else RAM, kind == "memfd")
        if kind.startswith("file"):
            mode = {"file": os.O_RDWR, "file-wronly": os.O_WRONLY, "file-rdonly": os.O_RDONLY}
            return os.open(_devices.IMAGE, mode[kind] | os.O_CLOEXEC)
        if kind == "socket":
            a, b = socket.socketpair()
            a.close()
            return b.detach()
        if kind.startswith("pipe"):
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            keep, drop = (r, w) if kind == "pipe-r" else (w, r)
            os.close(drop)
            return keep
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

    # -- one message --

    def send(self, req: int, flags: int, payload: bytes, fds: list[int]) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self.ours.sendmsg([HEADER.pack(req, flags, len(payload)) + payload], anc)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            msg = recv_message(self.session.sock)
        except ProtocolError:
            self.closed = True
            return
        for fd in msg.fds:
            self.brought[fd] = msg.name
        try:
            self.session.dispatch(msg)
        except ProtocolError:
            self.closed = True  # the server closes the connection: an orderly end
        except Exception as e:
            raise Finding(f"{msg.name}: {e!r:.300} escaped dispatch") from e
        self.drain()

    def drain(self) -> None:
        """Read the replies; close any fd that came with them."""
        while True:
            try:
                _, anc, _, _ = self.ours.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 8))
            except BlockingIOError:
                return
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % 4])
                    for fd in fds:
                        os.close(fd)

    def close(self) -> None:
        try:
            self.session.close()
        except Exception as e:
            raise Finding(f"Session.close raised {e!r:.300}: the server thread would die") from e
        finally:
            self.ours.close()
            os.close(self.ram)
            for fd in self.kicks + self.kept:
                os.close(fd)
            self.dev.close()

    # -- the guest's side --

    def offer(self, p: Draw) -> None:
        """A chain of one writable buffer (plus a readable one if asked) on ring ``i``."""
        i = p.below(len(self.dev.queues))
        size = 8 << p.below(2)
        base = 0x1000 * (i + 1)
        buf = 0x8000 + 0x400 * p.below(32)
        segs = [(buf, 512, DESC_F_WRITE)]
        if p.u8() & 1:
            segs.insert(0, (buf + 0x200, 16, 0))
        if self.session.packed:
            for k, (a, n, f) in enumerate(segs):
                slot = (self.slot[i] + k) % size
                flags = f | (1 if k < len(segs) - 1 else 0)
                flags |= DESC_F_AVAIL if self.wrap[i] else 1 << 15
                os.pwrite(self.ram, _DESC.pack(a, n, self.slot[i] % size, flags), base + 16 * slot)
            self.slot[i] += len(segs)
            if self.slot[i] >= size:
                self.slot[i] -= size
                self.wrap[i] = not self.wrap[i]
            return
        head = self.slot[i] % size
        for k, (a, n, f) in enumerate(segs):
            d = (head + k) % size
            flags = f | (1 if k < len(segs) - 1 else 0)
            os.pwrite(self.ram, _DESC.pack(a, n, flags, (d + 1) % size), base + 16 * d)
        self.slot[i] += 1
        os.pwrite(self.ram, struct.pack("<H", head), base + 0x400 + 4 + 2 * (head % size))
        os.pwrite(self.ram, struct.pack("<H", self.slot[i] & 0xFFFF), base + 0x400 + 2)


def _value(p: Draw, sane: int, choices: tuple[int, ...] = ()) -> int:
    """``sane`` for a 0 byte, else one of ``choices`` or any 64-bit value."""
    k = p.u8()
    if k == 0:
        return sane
    if choices and k < 0xF0:
        return choices[k % len(choices)]
    return p.u64()


def _payload(f: Frontend, req: Req, p: Draw) -> tuple[bytes, list[str]]:
    """The payload and fd kinds a sane frontend sends for ``req``, twisted by ``p``."""
    nq = len(f.dev.queues)
    index = p.u8() % (nq + 2) if p.u8() else 0  # twisted: one past the end, or beyond
    if req == Req.SET_FEATURES:
        sane = f.dev.features & ~(1 << 40) | 1 << 30
        if p.u8() & 1:
            sane &= ~(1 << F_RING_PACKED)
        return U64.pack(_value(p, sane, (sane | VHOST_BITS, 0)) & (2**64 - 1)), []
    if req == Req.SET_PROTOCOL_FEATURES:
        sane = f.session.offered_protocol()
        return U64.pack(_value(p, sane, (0, PROTOCOL_FEATURES | 1 << 2))), []
    if req in (Req.SET_MEM_TABLE, Req.ADD_MEM_REG, Req.REM_MEM_REG):
        n = 1 + p.below(3) if req == Req.SET_MEM_TABLE and p.u8() else 1
        regions = b""
        for k in range(n):
            gpa = _value(p, 0x10000 * k, (0x8000, 0x1000, 2**64 - 0x1000))
            size = _value(p, RAM, (0x1000, 0x8000, 0x20000, 0, 2**41))
            uva = _value(p, UVA + 0x10000 * k, (UVA + 0x800, 0))
            off = _value(p, 0, (0x1000, 0x123, RAM))
            regions += MEM_REGION.pack(gpa, size % 2**64, uva % 2**64, off % 2**64)
        head = struct.pack("<II", n, 0) if req == Req.SET_MEM_TABLE else bytes(8)
        return head + regions, ["ram"] * n
    if req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ENABLE, Req.GET_VRING_BASE):
        sane = {Req.SET_VRING_NUM: 8, Req.SET_VRING_ENABLE: 1}.get(req, 0)
        num = _value(p, sane, (16, 0, 1, 7, 256, 0x8000, 0xFFFF, 1 << 15 | 1 << 31))
        return VRING_STATE.pack(index, num & 0xFFFFFFFF), []
    if req == Req.SET_VRING_ADDR:
        base = UVA + 0x1000 * (index + 1)
        desc = _value(p, base, (base + 8, UVA + RAM - 8, 0))
        used = _value(p, base + 0x800, (base + 0x802, UVA + RAM, 0))
        avail = _value(p, base + 0x400, (base + 0x401, 0))
        return VRING_ADDR.pack(index, p.u8() & 1, desc, used, avail, 0), []
    if req in (Req.SET_VRING_CALL, Req.SET_VRING_KICK, Req.SET_VRING_ERR):
        value = index | (VRING_NOFD if p.u8() & 1 else 0)
        kinds = [] if value & VRING_NOFD else ["kick" if req == Req.SET_VRING_KICK else "eventfd"]
        return U64.pack(value), kinds
    if req in (Req.GET_CONFIG, Req.SET_CONFIG):
        offset = _value(p, 0, (4, 6, 255, 256)) & 0xFFFFFFFF
        size = _value(p, 8, (1, 0, 60, 256, 257)) & 0xFFFFFFFF
        data = bytes(min(size, 300)) if req == Req.GET_CONFIG else p.bytes(min(size, 300))
        return CONFIG_HEAD.pack(offset, size, 0) + data, []
    if req in (Req.GET_INFLIGHT_FD, Req.SET_INFLIGHT_FD):
        size = _value(p, 0x1000, (0x2000, 0, 0x10000, RAM + 1))
        offset = _value(p, 0, (0x1000, 0x10, RAM))
        queues = _value(p, nq, (1, 0, nq + 1)) & 0xFFFF
        qsize = _value(p, 16, (8, 0, 0x8000, 0xFFFF)) & 0xFFFF
        kinds = ["memfd"] if req == Req.SET_INFLIGHT_FD else []
        return INFLIGHT.pack(size % 2**64, offset % 2**64, queues, qsize), kinds
    if req == Req.SET_STATUS:
        return U64.pack(_value(p, 0xF, (0, 1, 3, 0xB, 0x40, 0x80, 0xFF, 0x100))), []
    if req == Req.SET_BACKEND_REQ_FD:
        return b"", ["socket"]
    if req == Req.SET_DEVICE_STATE_FD:
        direction, phase = p.u8() & 1 if p.u8() < 0xF0 else p.u8(), p.u8() >> 7
        return STATE_FD.pack(direction, phase), ["pipe-r" if direction == 0 else "pipe-w"]
    if req == Req.SET_LOG_BASE:
        return U64.pack(_value(p, 0x1000)) + U64.pack(_value(p, 0)), ["memfd-small"]
    return b"", []


def _message(f: Frontend, op: object, p: Draw) -> None:
    twist = p.u8()
    if op == "raw":
        req = p.u8() if twist & 1 else p.u32()
        payload, kinds = p.blob(16), [FD_KINDS[p.below(len(FD_KINDS))] for _ in range(p.below(3))]
    else:
        assert isinstance(op, Req)
        req = int(op)
        payload, kinds = _payload(f, op, p)
        if twist & 0x10:  # any payload size
            payload = payload[: p.u8()] + p.bytes(p.below(9))
        if twist & 0x20:  # another kind of fd
            kinds = [FD_KINDS[p.below(len(FD_KINDS))] for _ in kinds] or [FD_KINDS[p.below(12)]]
        if twist & 0x40:  # one more fd
            kinds.append(FD_KINDS[p.below(len(FD_KINDS))])
    flags = VERSION | (FLAG_NEED_REPLY if twist & 2 else 0)
    if twist & 0x80:
        flags = p.u32()
    if req == Req.SET_DEVICE_STATE_FD and kinds:
        return _state_transfer(f, flags, payload, kinds)
    fds = [f.make_fd(k, "eventfd") for k in kinds[:8]]
    f.send(req, flags, payload, fds)


def _state_transfer(f: Frontend, flags: int, payload: bytes, kinds: list[str]) -> None:
    """SET_DEVICE_STATE_FD with a pipe whose other end we feed (a seed state) and close,
    so the transfer ends at once, as a frontend that does its part."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    theirs, ours = (w, r) if kinds[0] == "pipe-r" else (r, w)
    if theirs == r:
        try:
            os.write(ours, _state_for(f))
        except BlockingIOError:
            pass
        os.close(ours)
    else:  # a save: the pipe holds what emu writes until the frontend is done
        f.keep(ours)
    extra = [f.make_fd(k, "eventfd") for k in kinds[1:8]]
    f.send(Req.SET_DEVICE_STATE_FD, flags, payload, [theirs, *extra])


def _state_for(f: Frontend) -> bytes:
    from emu.state.format import encode

    try:
        return encode(device_state.build(f.session))
    except Exception:
        return b"EMUSTATE"


def one_input(data: bytes) -> None:
    d = Draw(data)
    with Watch(fds=True, threads=True) as watch:
        f = Frontend(d)
        watch.hint = lambda leaked: _holder(f, leaked)
        try:
            for _ in range(MAX_STEPS):
                if not d.left or f.closed:
                    break
                op = OPS[d.below(len(OPS))]
                p = Draw(d.bytes(PARAMS))
                if op == "offer":
                    f.offer(p)
                elif op == "kick":
                    os.eventfd_write(f.kicks[0], 1)
                elif op == "poke":
                    os.pwrite(f.ram, p.bytes(16), p.u16() % (RAM - 16))
                else:
                    _message(f, op, p)
        finally:
            f.close()


def _holder(f: Frontend, leaked: set[int]) -> str:
    """Who keeps a leaked fd open, where the target can tell."""
    from emu.vhost_user import dirty_log

    if f.session in getattr(dirty_log, "_logs", {}):
        return " (the dirty log is still mapped after Session.close)"
    came = sorted({f.brought[fd] for fd in leaked if fd in f.brought})
    return f" (came with {', '.join(came)})" if came else ""


def _step(op: object, params: bytes = b"") -> bytes:
    return bytes([OPS.index(op)]) + params.ljust(PARAMS, b"\0")


def seeds() -> dict[str, bytes]:
    """QEMU's start sequence for each device, a request, a stop, a state save."""
    out = {}
    for how in range(16):
        dev = _devices.make((4, 2, 1, 3)[how % 4], how >> 2 & 3, queue_max_size=16)
        nq = len(dev.queues)
        dev.close()
        for packed in (0, 1):
            s = bytes([how])
            s += _step(Req.GET_FEATURES) + _step(Req.GET_PROTOCOL_FEATURES)
            s += _step(Req.SET_PROTOCOL_FEATURES) + _step(Req.SET_OWNER)
            s += _step(Req.SET_FEATURES, bytes([0, 0, 1 - packed]))
            s += _step(Req.SET_MEM_TABLE)
            for i in range(nq):
                twisted = bytes([0, 1, i]) if i else b""  # index i: twist 0, index byte
                s += _step(Req.SET_VRING_NUM, twisted) + _step(Req.SET_VRING_ADDR, twisted)
                s += _step(Req.SET_VRING_BASE, twisted) + _step(Req.SET_VRING_CALL, twisted)
                s += _step(Req.SET_VRING_KICK, twisted) + _step(Req.SET_VRING_ENABLE, twisted)
            s += _step("offer") + _step("kick") + _step("offer", bytes([0, 1])) + _step("kick")
            for i in range(nq):
                s += _step(Req.GET_VRING_BASE, bytes([0, 1, i]) if i else b"")
            s += _step(Req.SET_DEVICE_STATE_FD)
            s += _step(Req.CHECK_DEVICE_STATE) + _step(Req.GET_STATUS)
            out[f"{how:02x}-{'packed' if packed else 'split'}"] = s
    return out
