"""Guest side of virtio-vsock over the reference driver: a small vsock stack.

Enough of Linux's virtio transport to connect, listen and accept, move bytes both ways
under credit flow control, shut down and close, plus raw packets and chains for hostile
tests. Receive buffers are a 44-byte header buffer and a 4 KiB payload buffer, as Linux
6.1 posts them, so the device has to write a packet across descriptors.

Single-threaded: nothing happens unless the caller pumps (``pump``, or any call that
waits: connect, accept, recv, send waiting for credit). A slow guest is one that does not
read: its socket's ``fwd_cnt`` stays put and the device runs out of credit.

Bookkeeping the tests look at: ``GuestVsock.seen`` (every packet's header, in order),
``unmatched`` (packets for no socket, e.g. the device's RSTs), ``bad_lengths`` (used
lengths that do not match the header), and per socket ``overruns`` (payload beyond the
credit this side gave: a device bug).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from emu.backends.hybrid_vsock import HybridVsock
from emu.devices.vsock import VsockDevice
from emu.devices.vsock_defs import (
    EVENT_MSG,
    EVENT_TRANSPORT_RESET,
    EVENTQ,
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX,
    SEQ_EOM,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TX,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Header,
)
from emu.testing.driver import VirtioMmioDriver
from emu.testing.driver_queue import QueueFullError
from emu.testing.inprocess import attached, rings

MASK32 = 0xFFFFFFFF
#: a CREDIT_UPDATE goes out once the device sees less free space than this (as Linux)
CREDIT_LOW = 64 * 1024
FIRST_PORT = 49152


class VsockError(Exception):
    """The connection was refused or reset."""


@dataclass(eq=False)
class GuestSocket:
    stack: GuestVsock
    local_port: int
    peer_port: int
    type: int = TYPE_STREAM
    state: str = "connecting"  # established, closing (SHUTDOWN both sent), closed
    reset: bool = False  # closed by an RST or a TRANSPORT_RESET, not by a clean close
    buf_alloc: int = 256 * 1024
    rx: bytearray = field(default_factory=bytearray)
    msgs: deque[bytes] = field(default_factory=deque)  # SEQPACKET: whole messages
    partial: bytearray = field(default_factory=bytearray)
    peer_shut: int = 0
    rx_cnt: int = 0  # payload bytes received
    fwd_cnt: int = 0  # of those, read by the application
    last_fwd_sent: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    overruns: int = 0
    #: send CREDIT_UPDATE as the application reads (False: only on CREDIT_REQUEST)
    auto_credit: bool = True

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & MASK32))

    def unread(self) -> int:
        return (self.rx_cnt - self.fwd_cnt) & MASK32

    @property
    def eof(self) -> bool:
        return bool(self.peer_shut & SHUTDOWN_SEND) or self.state == "closed"

    # -- the application's side --

    def send(self, data: bytes, timeout: float = 10.0, eor: bool = False) -> None:
        """All of ``data``, in packets of at most ``max_packet`` bytes as credit allows
        (one message on a SEQPACKET socket: SEQ_EOM on its last packet)."""
        view = memoryview(data)
        if self.type == TYPE_SEQPACKET and len(view) > self.peer_buf_alloc:
            raise VsockError(
                f"a {len(view)}-byte message: the device takes at most "
                f"{self.peer_buf_alloc} (EMSGSIZE, as Linux)"
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.state != "established":
                raise VsockError(f"port {self.local_port}: connection {self.state}")
            n = min(self.credit(), self.stack.max_packet, len(view))
            if n or not view:
                last = n == len(view)
                flags = SEQ_EOM if self.type == TYPE_SEQPACKET and last else 0
                self.stack.send_packet(self, OP_RW, bytes(view[:n]), flags)
                self.tx_cnt = (self.tx_cnt + n) & MASK32
                view = view[n:]
                if last:
                    return
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"port {self.local_port}: no credit, {len(view)} unsent")
            self.stack.pump(min(left, 0.05))

    def recv(self, n: int, timeout: float = 10.0) -> bytes:
        """Up to ``n`` bytes; b"" at EOF (TimeoutError if nothing came)."""
        self.stack.pump_until(lambda: bool(self.rx) or self.eof, timeout)
        data = bytes(self.rx[:n])
        del self.rx[:n]
        self._consumed(len(data))
        return data

    def recv_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = bytearray()
        while len(out) < n:
            chunk = self.recv(n - len(out), max(0.0, deadline - time.monotonic()))
            if not chunk:
                raise VsockError(f"port {self.local_port}: EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_msg(self, timeout: float = 10.0) -> bytes | None:
        """SEQPACKET: the next whole message (None at EOF)."""
        self.stack.pump_until(lambda: bool(self.msgs) or self.eof, timeout)
        if not self.msgs:
            return None
        msg = self.msgs.popleft()
        self._consumed(len(msg))
        return msg

    def _consumed(self, n: int) -> None:
        """As Linux: CREDIT_UPDATE once the device sees little room, and after every
        seqpacket message (the device may be halfway through the next one, out of credit,
        and a partial message is never read, so waiting for little room could stall)."""
        self.fwd_cnt = (self.fwd_cnt + n) & MASK32
        seen_free = self.buf_alloc - ((self.rx_cnt - self.last_fwd_sent) & MASK32)
        low = seen_free < CREDIT_LOW or self.type == TYPE_SEQPACKET
        if self.auto_credit and n and self.state == "established" and low:
            self.stack.send_packet(self, OP_CREDIT_UPDATE)

    def credit_request(self) -> None:
        self.stack.send_packet(self, OP_CREDIT_REQUEST)

    def credit_update(self) -> None:
        self.stack.send_packet(self, OP_CREDIT_UPDATE)

    def shutdown(self, flags: int) -> None:
        self.stack.send_packet(self, OP_SHUTDOWN, flags=flags)

    def close(self, timeout: float = 5.0) -> None:
        """As Linux: RST at once if the device shut both ways, else SHUTDOWN both and wait
        for its RST."""
        if self.state == "closed":
            return
        if self.peer_shut == SHUTDOWN_BOTH:
            self.stack.send_packet(self, OP_RST)
        else:
            self.shutdown(SHUTDOWN_BOTH)
            self.state = "closing"  # the device's RST now is the clean end
            self.stack.pump_until(lambda: self.state == "closed", timeout)
        self.state = "closed"
        self.stack.socks.pop(self.key, None)


class GuestVsock:
    def __init__(
        self,
        drv: VirtioMmioDriver,
        *,
        features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = 64,
        rx_buffers: int = 32,
        rx_buf_size: int = 4096,
        rx_layout: list[int] | None = None,
        event_buffers: int = 4,
        event_queue: bool = True,
        max_packet: int = 64 * 1024,
        buf_alloc: int = 256 * 1024,
    ) -> None:
        """``event_queue=False`` leaves the event queue to someone else, as QEMU's
        vhost-user-vsock-device does (it sends TRANSPORT_RESET itself). ``rx_layout``:
        the buffer sizes of each rx chain, instead of a header and ``rx_buf_size``."""
        self.drv = drv
        self.features = drv.init(features, packed=packed, event_idx=event_idx, indirect=indirect)
        for i in (RX, TX, EVENTQ) if event_queue else (RX, TX):
            drv.setup_queue(i, queue_size)
        drv.driver_ok()
        self.cid = drv.config_read(0, 8)
        self.rx_layout = rx_layout or ([HDR.size, rx_buf_size] if rx_buf_size else [HDR.size])
        self.max_packet = max_packet
        self.buf_alloc = buf_alloc
        self.socks: dict[tuple[int, int], GuestSocket] = {}
        self.listeners: dict[int, tuple[int, deque[GuestSocket]]] = {}
        self.unmatched: list[Header] = []
        self.seen: deque[Header] = deque(maxlen=100_000)  # every packet received, in order
        self.bad_lengths = 0
        self.transport_resets = 0
        self._next_port = FIRST_PORT
        self.post(RX, rx_buffers)
        if event_queue:
            self.post(EVENTQ, event_buffers)

    @property
    def rx_buf_size(self) -> int:
        """Payload room of the rx buffers posted now."""
        return sum(self.rx_layout) - HDR.size

    def post(self, qidx: int, count: int) -> None:
        q = self.drv.queues[qidx]
        for _ in range(count):
            if qidx == EVENTQ:
                q.add([], [EVENT_MSG.size])
            else:
                q.add([], self.rx_layout)
        if count and q.kick_needed():
            self.drv.kick(qidx)

    # -- connections --

    def _port(self) -> int:
        while True:
            port, self._next_port = self._next_port, self._next_port + 1
            if port not in self.listeners:
                return port

    def connect(self, port: int, type_: int = TYPE_STREAM, timeout: float = 5.0) -> GuestSocket:
        """Connect to the host's ``port`` (the program on ``PATH_port``)."""
        sock = GuestSocket(self, self._port(), port, type_, buf_alloc=self.buf_alloc)
        self.socks[sock.key] = sock
        self.send_packet(sock, OP_REQUEST)
        self.pump_until(lambda: sock.state != "connecting", timeout)
        if sock.state != "established":
            self.socks.pop(sock.key, None)
            raise VsockError(f"connect to host port {port} refused")
        return sock

    def listen(self, port: int, type_: int = TYPE_STREAM) -> None:
        self.listeners[port] = (type_, deque())

    def accept(self, port: int, timeout: float = 5.0) -> GuestSocket:
        waiting = self.listeners[port][1]
        self.pump_until(lambda: bool(waiting), timeout)
        return waiting.popleft()

    # -- packets --

    def header(self, sock: GuestSocket, op: int, length: int = 0, flags: int = 0) -> Header:
        sock.last_fwd_sent = sock.fwd_cnt
        return Header(
            self.cid,
            HOST_CID,
            sock.local_port,
            sock.peer_port,
            length,
            sock.type,
            op,
            flags,
            sock.buf_alloc,
            sock.fwd_cnt,
        )

    def send_packet(self, sock: GuestSocket, op: int, payload: bytes = b"", flags: int = 0):
        hdr = self.header(sock, op, len(payload), flags)
        self.send_raw([hdr.pack(), payload] if payload else [hdr.pack()])

    def send_raw(self, out: list[bytes], in_sizes: list[int] | None = None) -> None:
        """One chain on the tx queue, as given (hostile tests build their own)."""
        q = self.drv.queues[TX]
        deadline = time.monotonic() + 10
        while True:
            try:
                q.add(out, in_sizes or [])
                break
            except QueueFullError:
                if time.monotonic() > deadline:
                    raise
                self.pump(0.05)
        if q.kick_needed():
            self.drv.kick(TX)

    def pump(self, timeout: float = 0.0) -> int:
        """Take what the device used on every queue; wait up to ``timeout`` for something
        when nothing is there yet. Returns the packets and events received."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._take()
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            self.drv.sleep(RX, min(left, 0.05))

    def pump_until(self, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("vsock: the device did not answer in time")
            self.pump(min(left, 0.05))

    def _take(self) -> int:
        self.drv.queues[TX].poll()  # free the descriptors of packets the device took
        got = 0
        for c in self.drv.queues[RX].poll():
            got += 1
            hdr = Header.unpack(c.data)
            if c.length != HDR.size + hdr.len or hdr.len > self.rx_buf_size:
                self.bad_lengths += 1
            else:
                self.seen.append(hdr)
                self._receive(hdr, c.data[HDR.size : HDR.size + hdr.len])
        if got:
            self.post(RX, got)
        events = self.drv.queues[EVENTQ].poll() if EVENTQ in self.drv.queues else []
        for c in events:
            if c.length == EVENT_MSG.size and EVENT_MSG.unpack_from(c.data)[0] == (
                EVENT_TRANSPORT_RESET
            ):
                self._transport_reset()
        if events:
            self.post(EVENTQ, len(events))
        return got + len(events)

    def _transport_reset(self) -> None:
        """As Linux: connections reset, listeners kept, the CID read again."""
        self.transport_resets += 1
        self.cid = self.drv.config_read(0, 8)
        for sock in self.socks.values():
            sock.state, sock.reset = "closed", True
        self.socks.clear()

    def _receive(self, hdr: Header, payload: bytes) -> None:
        sock = self.socks.get((hdr.dst_port, hdr.src_port))
        mine = hdr.dst_cid == self.cid and hdr.src_cid == HOST_CID
        if sock is None or not mine:
            self._no_socket(hdr, mine)
            return
        sock.peer_buf_alloc, sock.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == OP_RESPONSE and sock.state == "connecting":
            sock.state = "established"
        elif hdr.op == OP_RST:
            sock.reset = sock.state not in ("closing", "closed")
            sock.state = "closed"
            self.socks.pop(sock.key, None)
        elif hdr.op == OP_SHUTDOWN:
            sock.peer_shut |= hdr.flags & SHUTDOWN_BOTH
        elif hdr.op == OP_RW:
            self._data(sock, hdr, payload)
        elif hdr.op == OP_CREDIT_REQUEST:
            self.send_packet(sock, OP_CREDIT_UPDATE)
        elif hdr.op != OP_CREDIT_UPDATE:
            self.unmatched.append(hdr)

    def _data(self, sock: GuestSocket, hdr: Header, payload: bytes) -> None:
        if sock.unread() + len(payload) > sock.buf_alloc:
            sock.overruns += 1  # the device sent beyond the credit it was given
            return
        sock.rx_cnt = (sock.rx_cnt + len(payload)) & MASK32
        if sock.type == TYPE_SEQPACKET:
            sock.partial += payload
            if hdr.flags & SEQ_EOM:
                sock.msgs.append(bytes(sock.partial))
                sock.partial.clear()
        else:
            sock.rx += payload

    def _no_socket(self, hdr: Header, mine: bool) -> None:
        listener = self.listeners.get(hdr.dst_port)
        if mine and hdr.op == OP_REQUEST and listener is not None and listener[0] == hdr.type:
            sock = GuestSocket(self, hdr.dst_port, hdr.src_port, hdr.type, "established")
            sock.buf_alloc = self.buf_alloc
            sock.peer_buf_alloc, sock.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            self.socks[sock.key] = sock
            listener[1].append(sock)
            self.send_packet(sock, OP_RESPONSE)
            return
        self.unmatched.append(hdr)
        if hdr.op != OP_RST:  # as Linux: RST to what no socket takes
            rst = Header(
                hdr.dst_cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, OP_RST, 0, 0, 0
            )
            self.send_raw([rst.pack()])


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process vsock``: a connection each way through hybrid vsock."""
    with tempfile.TemporaryDirectory(prefix="emu-vsock-") as tmp:
        path = os.path.join(tmp, "v.sock")
        with attached(VsockDevice(3, HybridVsock(path))) as drv:
            guest = GuestVsock(drv, **opts)
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(f"{path}_5000")
                server.listen()
                s = guest.connect(5000)
                program, _ = server.accept()
                with program:
                    s.send(b"guest says hi\n")
                    program.sendall(b"host says hi\n")
                    got = program.recv(64)
                    say(f"vsock ({rings(guest.features)}): guest CID {guest.cid} -> host port 5000")
                    say(f"  guest -> host {got!r}, host -> guest {s.recv(64)!r}")
            guest.listen(1234)
            with socket.socket(socket.AF_UNIX) as program:
                program.connect(path)
                program.sendall(b"CONNECT 1234\n")
                g = guest.accept(1234)
                line = program.recv(64)
                g.send(b"hello from the guest's port 1234\n")
                say(f"  host CONNECT 1234 -> {line!r}")
                say(f"  guest port 1234 -> host {program.recv(64)!r}")
