"""virtio-vsock (device id 19): stream and seqpacket sockets between the guest and host
programs, reached as Unix sockets (``emu.backends.hybrid_vsock``, Firecracker's "hybrid
vsock").

Queues: rx (0: packets to the guest), tx (1: packets from the guest), event (2).
Config: le64 ``guest_cid``. Features offered: STREAM, SEQPACKET, NO_IMPLIED_STREAM; a
guest that negotiates none gets streams (the spec's implied stream).

Every packet is a 44-byte header (``emu.devices.vsock_defs.HDR``) and ``len`` payload
bytes, one packet per chain. The host is CID 2; a guest packet must come from the CID in
config space and go to CID 2.

Connections (``emu.devices.vsock_conn``):

* guest REQUEST to port P: the device connects to ``PATH_P`` (SOCK_SEQPACKET for a
  seqpacket socket) and answers RESPONSE, or RST when nobody listens there, the type is
  not negotiated, or ``max_connections`` host sockets are open.
* a host program's ``CONNECT P``: the device picks a local port (counting up from 2^30),
  sends the guest REQUEST and, on RESPONSE, writes ``OK <local port>`` to the program; an
  RST or no answer within ``CONNECT_TIMEOUT`` closes the program's socket.
* SHUTDOWN from the guest: RCV shuts the host socket's reading side (the program's
  writes fail), SEND its writing side once the bytes waiting for it are written. When the
  guest is done both ways (or sent SEND after the program's EOF) the device answers RST
  and closes the host socket after the bytes still waiting for it (at most ``LINGER``).
* the program's EOF: SHUTDOWN(SEND) to the guest; the program gone altogether (its
  socket hung up, or a write failed): RST. Either way after every byte it sent.
* RST from the guest: the host socket is closed, waiting bytes are dropped.

Flow control (the spec's credit): the device advertises ``buf_alloc`` per connection and
counts in ``fwd_cnt`` what it wrote to the host socket, sending CREDIT_UPDATE when the
guest's view of the free space falls below 64 KiB and the program took a quarter of
``buf_alloc`` since the last one, or all emu held (and on CREDIT_REQUEST). Bytes the
program is slow to take wait in the connection, at most ``buf_alloc`` of them: the guest
stops for want of credit, and goes on as the program drains them. The other way the
device reads the host socket only when a receive buffer is in hand and the guest has
credit, and at most that much: a slow guest leaves the bytes in the program's socket (its
writes block), never in emu. A guest that claims more buffer than it has only fills its
own receive queue.

Replies (RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE, REQUEST) wait for receive buffers in a
queue of at most ``REPLY_LIMIT``; past it the tx queue waits until the guest takes them,
which is the "additional resources" the spec's virtqueue flow control allows, and host
programs' ``CONNECT`` are refused.

Hostile guest: a tx chain with a device-writable buffer or shorter than a header, an rx
chain with a readable buffer or no room for a header, an event chain with no room for an
event: the device needs a reset. Everything else is answered with RST (and the
connection it names, if any, is closed): a wrong source or destination CID, a type not
negotiated or not the connection's, a ``len`` beyond the chain or 64 KiB, data beyond
the credit the device gave, an operation out of range or out of place (RW before
RESPONSE, a second REQUEST). RSTs are never answered. The device carries on with the
next packet. An rx buffer with room for a header only carries control packets (a
CREDIT_UPDATE when data is waiting for the guest), never data.

Stop and snapshot: a report stop withholds used entries; a packet already written into
an rx chain whose used entry did not go out is sent again (rebuilt, same payload) after
resume, and a tx packet already acted upon is completed without acting again, so no byte
is lost or doubled. Connections cannot move with the device (their host sockets belong
to this process): a snapshot keeps the guest CID and the next local port, and describes
the connections it drops; a restored device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
(the guest resets its connections, keeps its listeners, re-reads the CID) and answers
packets of old connections with RST. The host's listening socket is the restoring
device's own ``uds``. A restore in place (``load_state`` into this stopped device) drops
its live connections the same way. See ``save_state`` and ``load_state``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass

from emu.backends.hybrid_vsock import GONE, IN, OUT, HybridVsock, peer_closed
from emu.devices._chain import (
    Chain,
    ChainReader,
    ChainWriter,
    Unpublished,
    abandoning,
    chains,
    inflight_heads,
    serve_output,
)
from emu.devices.base import DeviceError, RunState, VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register
from emu.devices.vsock_conn import FIRST_LOCAL_PORT, MASK32, Conn, ConnTable, State
from emu.devices.vsock_defs import (
    EVENT_MSG,
    EVENT_TRANSPORT_RESET,
    EVENTQ,
    F_NO_IMPLIED_STREAM,
    F_SEQPACKET,
    F_STREAM,
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RESERVED_CIDS,
    RX,
    SEQ_EOM,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TX,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Header,
)
from emu.queue import Virtqueue
from emu.state.format import StateError
from emu.state.schema import Bool, Int, List, Obj, Schema, Str

log = logging.getLogger(__name__)

OFFERED = 1 << F_STREAM | 1 << F_SEQPACKET | 1 << F_NO_IMPLIED_STREAM
#: receive buffer space the device advertises per connection (Linux's default too)
BUF_ALLOC = 256 * 1024
#: payload of one packet at most, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PAYLOAD = 64 * 1024
#: a CREDIT_UPDATE goes out once the guest sees less free space than this
CREDIT_LOW = 64 * 1024
#: replies waiting for rx buffers before the tx queue waits too
REPLY_LIMIT = 256
#: host sockets open at once (connections, and closed ones still flushing)
MAX_CONNECTIONS = 256
#: host programs whose CONNECT the device has not taken yet (beyond: refused)
MAX_PENDING_CONNECTS = 64
#: seconds the guest has to answer a host program's REQUEST
CONNECT_TIMEOUT = 5.0
#: seconds a connection the guest closed may take to flush its bytes to the host
LINGER = 10.0
BATCH = 64
#: rx buffers popped ahead per connection with data to send
RX_AHEAD = 16
#: bytes read from a stream's host socket in one system call, into that many rx
#: buffers' payload room (16 of Linux's 4 KiB ones)
STREAM_BURST = 64 * 1024
#: payload segments of one rx buffer filled at most (recvmsg_into's iovecs stay <= 512)
MAX_PIECES = 8
#: a Unix SOCK_SEQPACKET send takes at most its send buffer less this (EMSGSIZE beyond):
#: a seqpacket connection advertises no more, so a Linux guest refuses bigger messages
SEQPACKET_SLACK = 64
#: recv flags that size the next message without taking it (an int once: OR-ing the
#: socket module's IntFlag members runs Python code, per message)
_PEEK_SIZE = int(socket.MSG_PEEK | socket.MSG_TRUNC)


@dataclass(slots=True)
class _Reply:
    """A packet waiting for an rx buffer, built when one is in hand (so its credit fields
    are current): a control packet of ``conn``, an RST to a packet of no connection
    (``hdr``, addresses swapped), or RW payload a report stop gave back."""

    conn: Conn | None
    op: int
    flags: int = 0
    hdr: Header | None = None
    payload: bytes = b""


@dataclass(slots=True)
class _Sent:
    """What went into an rx chain: enough to send it again if a stop withholds it (the
    payload is read back from the chain then, not kept)."""

    reply: _Reply
    chain: Chain
    length: int


#: an rx buffer a stream's bytes are read into: the chain, where the header goes, where
#: the payload goes (gpa, length pieces) and how many bytes that is
_Room = tuple[Chain, list[tuple[int, int]], list[tuple[int, int]], int]


@dataclass
class VsockStats:
    """Counters (device thread only)."""

    bad_packets: int = 0  # answered with RST: wrong CID, type, op, length or credit
    refused: int = 0  # connections refused: nobody listening, too many, wrong type
    resets: int = 0  # RSTs sent to the guest
    held_peak: int = 0  # most guest bytes held for one host socket that was slow to take them


def check_cid(cid: int) -> int:
    if not 0 <= cid <= MASK32 or cid in RESERVED_CIDS:
        raise ValueError(f"guest CID {cid} is reserved or out of range (3..{MASK32 - 1})")
    return cid


_U32 = Int(0, MASK32)
#: the device part of a snapshot: what is kept (CID, next local port) and, for the
#: record, the connections a restore drops
STATE = Schema(
    "vsock state",
    1,
    0,
    {
        "guest_cid": Int(3, MASK32 - 1),
        "uds": Str(4096),
        "buf_alloc": Int(1, MASK32),
        "next_port": Int(FIRST_LOCAL_PORT, MASK32 - 1),
        "dropped": List(
            Obj(
                {
                    "local_port": _U32,
                    "peer_port": _U32,
                    "type": Str(16),
                    "state": Str(16),
                    "by_guest": Bool(),
                    "tx_cnt": _U32,
                    "rx_cnt": _U32,
                    "fwd_cnt": _U32,
                    "held_bytes": Int(0, 2**40),
                }
            ),
            1 << 16,
        ),
    },
)


class VsockDevice(VirtioDevice):
    device_id = 19
    name = "vsock"
    state_schema = STATE

    def __init__(
        self,
        cid: int,
        host: HybridVsock,
        *,
        buf_alloc: int = BUF_ALLOC,
        max_connections: int = MAX_CONNECTIONS,
        queue_max_size: int | None = None,
    ) -> None:
        check_cid(cid)
        if not 0 < buf_alloc <= MASK32:
            raise ValueError(f"buf_alloc {buf_alloc} not in 1..{MASK32}")
        super().__init__(3, OFFERED, queue_max_size)
        self.cid = cid
        self.buf_alloc = buf_alloc
        self.host = host
        self.conns = ConnTable(max_connections)
        self.stats = VsockStats()
        self._replies: deque[_Reply] = deque()
        #: connections with something to send and credit for it, served in turn
        self._ready: dict[int, Conn] = {}
        #: connections with a deadline (connecting, or flushing after the guest closed)
        self._timed: set[Conn] = set()
        self._rx_held: deque[Chain] = deque()
        # what went into chains whose used entries may not be out yet (forget_inflight)
        self._rx_out: Unpublished[_Sent] = Unpublished()
        self._tx_out: Unpublished[int] = Unpublished()
        self._ev_out: Unpublished[bool] = Unpublished()
        #: in-flight tx heads acted upon before a stop: complete, do not act again
        self._tx_sent: set[int] = set()
        self._tx_paused = False
        #: a TRANSPORT_RESET is owed to the driver (after a restore)
        self._reset_due = False
        # handed over by the backend's thread
        self._connects: deque[tuple[socket.socket, int]] = deque()
        self._events: deque[tuple[int, int]] = deque()
        host.attach(self)

    # -- config space --

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def _type_ok(self, type_: int) -> bool:
        if type_ == TYPE_STREAM:
            return self.has(F_STREAM) or not self.has(F_NO_IMPLIED_STREAM)
        return type_ == TYPE_SEQPACKET and self.has(F_SEQPACKET)

    # -- the backend's thread hands things over --

    def host_connect(self, sock: socket.socket, port: int) -> None:
        # no driver to ask (none yet, or the device needs a reset): refuse now, as the
        # answer timeout would only start once the device runs again
        idle = self.run_state in (RunState.IDLE, RunState.BROKEN)
        if idle or len(self._connects) >= MAX_PENDING_CONNECTS:
            sock.close()
            return
        self._connects.append((sock, port))
        self.wake()

    def host_ready(self, fd: int, events: int) -> None:
        self._events.append((fd, events))
        self.wake()

    def host_timer(self) -> None:
        self.wake()

    # -- lifecycle --

    def on_reset(self) -> None:
        """The driver's connections are gone with it: so are their host sockets."""
        self._drop_connections()
        self._replies.clear()
        self._ready.clear()
        self._rx_held.clear()
        for out in (self._rx_out, self._tx_out, self._ev_out):
            out.clear()
        self._tx_sent.clear()
        self._tx_paused = False
        self._reset_due = False
        while self._connects:  # programs that asked the driver just reset: refused
            self._connects.popleft()[0].close()

    def _drop_connections(self) -> None:
        """Close every host socket, with the packets still owed for them and the
        readiness reported for them (a new socket may get the same fd)."""
        for conn in list(self.conns.by_fd.values()):
            self._close(conn)
        self._replies = deque(r for r in self._replies if r.conn is None)
        self._events.clear()

    def close(self) -> None:
        self.host.stop()  # first: its thread calls host_ready() and so wake()
        super().close()
        while self._connects:
            self._connects.popleft()[0].close()
        self.host.close()

    # -- device thread: the host side --

    def on_wake(self) -> None:
        while self._connects:
            self._host_connect(*self._connects.popleft())
        while self._events:
            fd, events = self._events.popleft()
            conn = self.conns.by_fd.get(fd)
            if conn is not None:
                self._host_event(conn, events)
        if self._timed:
            self._expire()

    def wants_poll(self, q: Virtqueue) -> bool:
        if q.index == RX:
            return bool(self._replies or self._ready)
        if q.index == TX:
            return self._tx_paused and len(self._replies) < REPLY_LIMIT
        return q.index == EVENTQ and self._reset_due

    def _host_connect(self, sock: socket.socket, port: int) -> None:
        # a guest that takes no packets stops host programs too: each would add a REQUEST
        # (and, once it leaves, an RST) to a reply queue nothing else bounds
        busy = len(self._replies) >= REPLY_LIMIT
        if busy or self.conns.full() or not self._type_ok(TYPE_STREAM):
            log.info("vsock: host connection to guest port %d refused", port)
            self.stats.refused += 1
            sock.close()
            return
        local = self.conns.local_port_for(port)
        conn = Conn(local, port, TYPE_STREAM, sock, State.CONNECTING, False, self.buf_alloc)
        self.conns.add(conn)
        self._reply(conn, OP_REQUEST)
        self._deadline(conn, CONNECT_TIMEOUT)
        self._arm(conn)

    def _host_event(self, conn: Conn, events: int) -> None:
        conn.armed = None  # one-shot: it fired, nothing is armed now
        if events & GONE and not peer_closed(conn.sock):
            # reported for a socket closed since, whose fd number this one took over
            events &= ~GONE
        if events & GONE:
            conn.hung_up = True
        if conn.has_out() and events & (OUT | GONE):
            self._flush(conn)
            if not self._alive(conn):
                return
        if conn.closing:
            self._arm(conn)
            return
        if conn.wants_read and events & (IN | GONE):
            conn.readable = True
            self._schedule(conn)
        elif events & GONE and not conn.readable:
            # gone while nothing was being read from it: the guest must hear of it now
            self._abort(conn, "the host program closed its socket")
            return
        self._arm(conn)

    def _arm(self, conn: Conn) -> None:
        """Ask the backend for the next event the connection waits for."""
        events = 0
        if conn.wants_read and not conn.readable:
            events |= IN
        if conn.has_out():
            events |= OUT
        if not events and conn.hung_up:
            return  # a hang-up is reported again at once: wait for what the guest does
        if conn.armed != events:
            self.host.arm(conn.fd, events)
            conn.armed = events

    def _deadline(self, conn: Conn, seconds: float | None) -> None:
        conn.deadline = None if seconds is None else time.monotonic() + seconds
        if seconds is None:
            self._timed.discard(conn)
        else:
            self._timed.add(conn)
        self.host.wake_at(min((c.deadline for c in self._timed), default=None))

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._timed if c.deadline is not None and c.deadline <= now]:
            if conn.closing:
                log.info("vsock: port %d: host program took too long, closed", conn.local_port)
                self._close(conn)
            else:
                self._abort(conn, "the guest did not answer the host's REQUEST")
        self.host.wake_at(min((c.deadline for c in self._timed), default=None))

    def _flush(self, conn: Conn) -> None:
        """Write what waits for the host socket; close or reset as the state says."""
        try:
            while conn.out:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
                conn.fwd_cnt = (conn.fwd_cnt + n) & MASK32
            while conn.msgs_out:
                msg = conn.msgs_out[0]
                conn.sock.send(msg)  # SOCK_SEQPACKET: all of it or EAGAIN
                conn.msgs_out.popleft()
                conn.fwd_cnt = (conn.fwd_cnt + len(msg)) & MASK32
        except BlockingIOError:
            pass
        except OSError as e:
            if conn.closing:
                self._close(conn)
            else:
                self._abort(conn, f"writing to the host program: {e.strerror}")
            return
        if conn.has_out():
            self._credit_check(conn)  # the program took some: the guest may go on
            return
        if conn.closing:
            self._close(conn)
            return
        if conn.shut_wr_due:
            conn.shut_wr_due = False
            self._shutdown(conn, socket.SHUT_WR)
        if conn.guest_shut & SHUTDOWN_SEND and conn.host_eof:
            self._abort(conn, None)  # both ways done: RST is the clean end
            return
        self._credit_check(conn)

    def _credit_check(self, conn: Conn) -> None:
        """CREDIT_UPDATE once the guest sees less than CREDIT_LOW free and the program
        took bytes it was not told of: a quarter of ``buf_alloc`` of them, or all emu
        held. So a program slower than the guest gets its bytes in big steps, without
        an update per read."""
        freed = (conn.fwd_cnt - conn.last_fwd_sent) & MASK32
        if not freed or not conn.established or conn.closing:
            return
        seen_free = conn.buf_alloc - ((conn.rx_cnt - conn.last_fwd_sent) & MASK32)
        if seen_free < CREDIT_LOW and (freed >= conn.buf_alloc // 4 or not conn.has_out()):
            self._credit_update(conn)

    def _credit_update(self, conn: Conn) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._reply(conn, OP_CREDIT_UPDATE)

    def _host_eof(self, conn: Conn) -> None:
        """The program will send no more; gone altogether, or both ways done: RST."""
        conn.host_eof = True
        conn.readable = False
        self._ready.pop(conn.id, None)
        both = conn.guest_shut & SHUTDOWN_SEND and not conn.has_out()
        if conn.hung_up or both or peer_closed(conn.sock):
            self._abort(conn, None)
            return
        self._reply(conn, OP_SHUTDOWN, SHUTDOWN_SEND)
        self._arm(conn)

    def _shutdown(self, conn: Conn, how: int) -> None:
        try:
            conn.sock.shutdown(how)
        except OSError:
            pass  # not connected any more: the next read or write tells

    # -- connections: table changes --

    def _alive(self, conn: Conn) -> bool:
        return self.conns.by_fd.get(conn.fd) is conn

    def _live(self, conn: Conn) -> bool:
        """In the port table: packets of it still mean something to the guest."""
        return self.conns.by_key.get(conn.key) is conn

    def _schedule(self, conn: Conn) -> None:
        if self._can_send(conn):
            self._ready[conn.id] = conn

    def _can_send(self, conn: Conn) -> bool:
        return (
            not conn.closing
            and conn.wants_read
            and (conn.readable or conn.msg_off < len(conn.msg_out))
            and conn.credit() > 0
            and self._live(conn)
        )

    def _reply(self, conn: Conn, op: int, flags: int = 0) -> None:
        self._replies.append(_Reply(conn, op, flags))

    def _abort(self, conn: Conn, why: str | None) -> None:
        """RST to the guest and close the host socket (``why``: logged, None for a
        regular end)."""
        if why is not None:
            log.info("vsock: port %d <-> guest port %d reset: %s", *conn.key, why)
        self._reply(conn, OP_RST)
        self.stats.resets += 1
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        self.host.forget(conn.fd)
        conn.sock.close()
        self.conns.remove(conn)
        self._ready.pop(conn.id, None)
        self._timed.discard(conn)

    def _guest_closed(self, conn: Conn) -> None:
        """The guest is done with the connection: RST it now (the guest may reuse its
        port), and close the host socket once what waits for it is written."""
        self._reply(conn, OP_RST)
        self.stats.resets += 1
        if not conn.has_out():
            self._close(conn)
            return
        self.conns.detach(conn)
        conn.closing = True
        self._ready.pop(conn.id, None)
        self._deadline(conn, LINGER)
        self._arm(conn)

    # -- device thread: the queues --

    def handle_queue(self, q: Virtqueue) -> None:
        if q.index == RX:
            self._serve_rx(q)
        elif q.index == TX:
            self._serve_tx(q)
        else:
            self._serve_event(q)

    def _serve_tx(self, q: Virtqueue) -> None:
        self._tx_paused = self._replies_full()
        if self._tx_paused:
            return  # a kick changes nothing: the guest must take replies first
        self._tx_paused = serve_output(  # paused: the guest takes replies first (wants_poll)
            q, BATCH, self._tx_out, self._tx_sent, self._transmit, self._replies_full
        )
        if self._replies or self._ready:
            self.wake()  # the rx queue has something to send

    def _replies_full(self) -> bool:
        return len(self._replies) >= REPLY_LIMIT

    def _transmit(self, c: Chain) -> None:
        if c.writable:
            raise DeviceError(f"vsock: tx chain {c.head} has a device-writable buffer")
        r = ChainReader(self.mem, c)
        if r.left < HDR.size:
            raise DeviceError(f"vsock: tx chain {c.head} holds {r.left} bytes, no header")
        hdr = Header.unpack(r.read(HDR.size))
        if hdr.len > MAX_PAYLOAD or hdr.len > r.left:
            self._bad(hdr, f"len {hdr.len} with {r.left} payload bytes", self._named(hdr))
            return
        payload = r.read(hdr.len) if hdr.op == OP_RW else b""
        self._packet(hdr, payload)

    def _packet(self, hdr: Header, payload: bytes) -> None:
        if hdr.src_cid != self.cid or hdr.dst_cid != HOST_CID:
            self._bad(hdr, f"from CID {hdr.src_cid} to CID {hdr.dst_cid}")
            return
        conn = self._named(hdr)
        if not self._type_ok(hdr.type) or (conn is not None and hdr.type != conn.type):
            self._bad(hdr, f"type {hdr.type}", conn)
            return
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != OP_RST:
                self._refuse(hdr)  # no such connection
            return
        conn.peer_credit(hdr)
        op = hdr.op
        if op == OP_RW:
            self._guest_data(conn, hdr, payload)
        elif op == OP_CREDIT_REQUEST:
            self._credit_update(conn)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags & SHUTDOWN_BOTH)
        elif op == OP_RST:
            self._close(conn)
        elif op == OP_RESPONSE and conn.state is State.CONNECTING:
            self._established(conn)
        elif op != OP_CREDIT_UPDATE:
            self._bad(hdr, f"on a {conn.state.value} connection", conn)
        if self._live(conn):
            self._schedule(conn)  # the guest's credit may have grown

    def _named(self, hdr: Header) -> Conn | None:
        """The connection a guest packet belongs to, if it is addressed right."""
        if hdr.src_cid != self.cid or hdr.dst_cid != HOST_CID:
            return None
        return self.conns.get(hdr.dst_port, hdr.src_port)

    def _bad(self, hdr: Header, why: str, conn: Conn | None = None) -> None:
        self.stats.bad_packets += 1
        log.info("vsock: bad packet %s: %s", hdr.describe(), why)
        if conn is not None:
            self._abort(conn, "after a bad packet")
        else:
            self._refuse(hdr)

    def _refuse(self, hdr: Header) -> None:
        """RST in answer to a packet of no connection (never to an RST)."""
        if hdr.op != OP_RST:
            self._replies.append(_Reply(None, OP_RST, hdr=hdr))
            self.stats.resets += 1

    def _guest_connect(self, hdr: Header) -> None:
        seqpacket = hdr.type == TYPE_SEQPACKET
        if self.conns.full():
            log.info("vsock: guest connect to port %d refused: too many", hdr.dst_port)
            sock = None
        else:
            try:
                sock = self.host.connect(hdr.dst_port, seqpacket)
            except OSError as e:
                log.info("vsock: guest connect to port %d refused: %s", hdr.dst_port, e)
                sock = None
        if sock is None:
            self.stats.refused += 1
            self._refuse(hdr)
            return
        buf_alloc = self.buf_alloc
        if seqpacket:  # a message must fit the Unix socket's send buffer in one piece
            room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - SEQPACKET_SLACK
            buf_alloc = max(1, min(buf_alloc, room))
        conn = Conn(hdr.dst_port, hdr.src_port, hdr.type, sock, State.ESTABLISHED, True, buf_alloc)
        conn.peer_credit(hdr)
        self.conns.add(conn)
        self._reply(conn, OP_RESPONSE)
        self._arm(conn)

    def _established(self, conn: Conn) -> None:
        """The guest accepted a host program's connection: tell the program."""
        conn.state = State.ESTABLISHED
        self._deadline(conn, None)
        line = b"OK %d\n" % conn.local_port
        try:
            sent = conn.sock.send(line)  # the first bytes on the socket: room is certain
        except OSError:
            sent = 0
        if sent != len(line):
            self._abort(conn, "the host program left before OK")
            return
        self._arm(conn)

    def _guest_data(self, conn: Conn, hdr: Header, payload: bytes) -> None:
        if not conn.established or conn.guest_shut & SHUTDOWN_SEND:
            self._bad(hdr, "data on a connection not open for it", conn)
            return
        if conn.unforwarded() + len(payload) > conn.buf_alloc:
            self._bad(hdr, f"{len(payload)} bytes beyond the credit given", conn)
            return
        conn.rx_cnt = (conn.rx_cnt + len(payload)) & MASK32
        if conn.seqpacket:
            conn.msg_in += payload
            # an empty message is dropped: the program would read it as EOF, and it takes
            # no credit, so a slow program would let them pile up without bound
            if hdr.flags & SEQ_EOM and conn.msg_in:
                conn.msgs_out.append(bytes(conn.msg_in))
                conn.msg_in.clear()
        else:
            conn.out += payload
            self.stats.held_peak = max(self.stats.held_peak, len(conn.out))
        if conn.has_out():
            self._flush(conn)
        else:  # part of a message: the guest may need room freed earlier to finish it
            self._credit_check(conn)
        if self._alive(conn):
            self._arm(conn)

    def _guest_shutdown(self, conn: Conn, flags: int) -> None:
        conn.guest_shut |= flags
        if flags & SHUTDOWN_RCV:
            self._ready.pop(conn.id, None)
            conn.readable = False  # nothing waits to be read: a hang-up is the end now
            conn.msg_out, conn.msg_off = b"", 0
            self._shutdown(conn, socket.SHUT_RD)  # the program's writes fail from now on
        if flags & SHUTDOWN_SEND:
            conn.msg_in.clear()  # a message without its end is never sent
            if conn.has_out():
                conn.shut_wr_due = True
            else:
                self._shutdown(conn, socket.SHUT_WR)
        if conn.guest_shut == SHUTDOWN_BOTH or (conn.guest_shut & SHUTDOWN_SEND and conn.host_eof):
            self._guest_closed(conn)
        elif conn.hung_up and not (conn.wants_read or conn.has_out()):
            self._abort(conn, "the host program closed its socket")  # its hang-up was seen
        else:
            self._arm(conn)

    # -- rx: packets to the guest --

    def _serve_rx(self, q: Virtqueue) -> None:
        heads: list[int] = []
        lengths: list[int] = []
        while (self._replies or self._ready) and q.open:
            chain = self._rx_chain(q)
            if chain is None:
                break
            room = min(chain.in_len - HDR.size, MAX_PAYLOAD)
            got = self._next_reply(room)
            if got is None:
                conn = self._next_turn()
                if conn is None:
                    break
                if not room:  # a buffer with room for a header only: data cannot use it
                    got = self._header(conn, OP_CREDIT_UPDATE, 0), _Reply(conn, OP_CREDIT_UPDATE)
                elif conn.seqpacket:
                    got = self._data(conn, room)
                else:
                    self._stream(q, conn, heads, lengths)  # into this chain and the next
                if self._can_send(conn):
                    self._ready[conn.id] = conn  # to the back: connections take turns
                if got is None:
                    continue
            pkt, item = got
            self._rx_held.popleft()
            ChainWriter(self.mem, chain).write(pkt)
            self._rx_out.record([chain.head], _Sent(item, chain, len(pkt)))
            heads.append(chain.head)
            lengths.append(len(pkt))
        if heads:
            q.push(heads, lengths)
        if self._tx_paused and len(self._replies) < REPLY_LIMIT:
            self.wake()  # the tx queue may go on

    def _rx_chain(self, q: Virtqueue) -> Chain | None:
        """The next receive buffer (held, or popped), or None when the ring is empty."""
        return self._rx_held[0] if self._hold(q, 1) else None

    def _hold(self, q: Virtqueue, n: int, ahead: int = 0) -> bool:
        """At least ``n`` receive buffers held (popped as needed, ``ahead`` more for a
        connection being served); False when the ring has too few.

        Only about as many are popped as packets are waiting (a reply each, a few per
        ready connection): buffers the device holds are in flight at a stop."""
        while len(self._rx_held) < n:
            want = len(self._replies) + RX_AHEAD * len(self._ready) + ahead
            batch = q.pop(min(BATCH, max(want, n - len(self._rx_held))))
            if not len(batch):
                if q.set_kicks(True):
                    continue
                return False
            self._rx_out.popped(batch.heads.tolist())
            for c in chains(batch):
                if c.readable or c.in_len < HDR.size:
                    raise DeviceError(
                        f"vsock: rx chain {c.head} has {c.in_len} writable bytes"
                        + (" and a device-readable buffer" if c.readable else "")
                    )
                self._rx_held.append(c)
        return True

    def _next_reply(self, room: int) -> tuple[bytes, _Reply] | None:
        """The next reply packet for a buffer with ``room`` payload bytes (None: none
        left that still means something)."""
        while self._replies:
            got = self._build(self._replies.popleft(), room)
            if got is not None:
                return got
        return None

    def _next_turn(self) -> Conn | None:
        """The next connection with data to send and credit for it (taken out of the
        turn; the caller puts it back at the end if it still can send)."""
        while self._ready:
            conn = self._ready.pop(next(iter(self._ready)))
            if self._can_send(conn):
                return conn
        return None

    def _build(self, r: _Reply, room: int) -> tuple[bytes, _Reply] | None:
        conn = r.conn
        if conn is None:
            h = r.hdr
            assert h is not None
            rst = Header(h.dst_cid, h.src_cid, h.dst_port, h.src_port, 0, h.type, OP_RST, 0, 0, 0)
            return rst.pack(), r
        if r.op == OP_CREDIT_UPDATE:
            conn.credit_update_queued = False
        if r.op != OP_RST and not self._live(conn):
            return None  # the connection ended meanwhile
        if r.op != OP_RW:
            return self._header(conn, r.op, 0, r.flags), r
        piece, flags = r.payload[:room], r.flags
        if len(piece) < len(r.payload):  # given back by a stop; this buffer is smaller
            self._replies.appendleft(_Reply(conn, OP_RW, flags, payload=r.payload[room:]))
            flags = 0
        return self._header(conn, OP_RW, len(piece), flags) + piece, _Reply(conn, OP_RW, flags)

    def _stream(self, q: Virtqueue, conn: Conn, heads: list[int], lengths: list[int]) -> None:
        """RW packets of what a stream's host program sent, read from its socket straight
        into the payload room of the receive buffers held (popping more as needed): one
        ``recvmsg_into`` for up to STREAM_BURST bytes, as far as the guest's credit
        goes, and no copy in emu. Buffers left empty stay held; EOF and errors are dealt
        with here."""
        bufs = self._stream_buffers(q, min(conn.credit(), STREAM_BURST))
        views: list[memoryview] = []
        try:
            for _, _, pieces, _ in bufs:
                views += [self.mem.view(a, n, write=True) for a, n in pieces]
            got = conn.sock.recvmsg_into(views)[0]
        except BlockingIOError:
            conn.readable = False
            self._arm(conn)
            return
        except OSError as e:
            self._abort(conn, f"reading from the host program: {e.strerror}")
            return
        finally:
            for v in views:
                v.release()  # guest RAM is not pinned past this
        if not got:
            self._host_eof(conn)
            return
        conn.tx_cnt = (conn.tx_cnt + got) & MASK32
        for chain, at, _, room in bufs:
            n = min(room, got)
            if not n:
                break
            got -= n
            hdr = self._header(conn, OP_RW, n)
            if len(at) == 1:
                self.mem.write(at[0][0], hdr)
            else:  # a header across buffers
                off = 0
                for a, k in at:
                    self.mem.write(a, hdr[off : off + k])
                    off += k
            self._rx_held.popleft()
            self._rx_out.record([chain.head], _Sent(_Reply(conn, OP_RW), chain, HDR.size + n))
            heads.append(chain.head)
            lengths.append(HDR.size + n)

    def _stream_buffers(self, q: Virtqueue, budget: int) -> list[_Room]:
        """The receive buffers held (popping more as needed) whose payload room takes up
        to ``budget`` bytes, in order; stops at a header-only one (it is for the next
        control packet)."""
        bufs: list[_Room] = []
        held = self._rx_held
        while budget > 0 and len(bufs) < BATCH:
            if len(bufs) == len(held) and not self._hold(q, len(bufs) + 1, RX_AHEAD):
                break
            chain = held[len(bufs)]
            at, pieces, room = _layout(chain.writable, min(budget, MAX_PAYLOAD))
            if not room:
                break
            bufs.append((chain, at, pieces, room))
            budget -= room
        return bufs

    def _data(self, conn: Conn, room: int) -> tuple[bytes, _Reply] | None:
        """SEQPACKET: an RW packet of the host's message being sent, as much as credit
        and ``room`` allow; None when there was nothing (EOF and errors are dealt with
        here)."""
        n = min(conn.credit(), room)
        if n <= 0:
            return None
        try:
            if conn.msg_off >= len(conn.msg_out) and not self._next_message(conn):
                return None
        except BlockingIOError:
            conn.readable = False
            self._arm(conn)
            return None
        except OSError as e:
            self._abort(conn, f"reading from the host program: {e.strerror}")
            return None
        data = conn.msg_out[conn.msg_off : conn.msg_off + n]
        conn.msg_off += len(data)
        flags = 0
        if conn.msg_off == len(conn.msg_out):
            flags = SEQ_EOM
            conn.msg_out, conn.msg_off = b"", 0
        conn.tx_cnt = (conn.tx_cnt + len(data)) & MASK32
        return self._header(conn, OP_RW, len(data), flags) + data, _Reply(conn, OP_RW, flags)

    def _next_message(self, conn: Conn) -> bool:
        """SEQPACKET: read the host's next message whole; False when there is none (EOF
        and a message the guest could never hold are dealt with here)."""
        size = conn.sock.recv_into(bytearray(1), 1, _PEEK_SIZE)
        if size == 0:  # an empty message reads as EOF too; Linux guests cannot send one
            self._host_eof(conn)
            return False
        if size > min(conn.peer_buf_alloc, self.buf_alloc):
            self._abort(conn, f"a host message of {size} bytes, beyond the guest's buffer")
            return False
        conn.msg_out, conn.msg_off = conn.sock.recv(size), 0
        return True

    def _header(self, conn: Conn, op: int, length: int, flags: int = 0) -> bytes:
        conn.last_fwd_sent = conn.fwd_cnt
        return HDR.pack(
            HOST_CID,
            self.cid,
            conn.local_port,
            conn.peer_port,
            length,
            conn.type,
            op,
            flags,
            conn.buf_alloc,
            conn.fwd_cnt,
        )

    # -- the event queue --

    def _serve_event(self, q: Virtqueue) -> None:
        while self._reset_due and not abandoning(q):
            batch = q.pop(1)
            if not len(batch):
                if q.set_kicks(True):
                    continue
                return
            self._ev_out.popped(batch.heads.tolist())
            (c,) = chains(batch)
            if c.readable or c.in_len < EVENT_MSG.size:
                raise DeviceError(f"vsock: event chain {c.head} has no room for an event")
            ChainWriter(self.mem, c).write(EVENT_MSG.pack(EVENT_TRANSPORT_RESET))
            self._ev_out.record([c.head], True)
            self._reset_due = False
            q.push([c.head], [EVENT_MSG.size])

    # -- stop and snapshot --

    def on_queue_reset(self, index: int) -> None:
        if index == TX:
            self._tx_sent.clear()  # the heads come back as new packets

    def forget_inflight(self, queues: set[int]) -> None:
        """Hand held rx buffers back; settle what went into chains left in flight."""
        rxq, txq, evq = self.queues
        if rxq.started and RX in queues:
            self._rx_held.clear()
            back = self._rx_out.settle(inflight_heads(rxq))
            for sent in back:
                if sent.reply.op == OP_RW:
                    pkt = ChainReader(self.mem, Chain(0, sent.chain.writable, [])).read(sent.length)
                    sent.reply.payload = pkt[HDR.size :]
            self._replies.extendleft(reversed([sent.reply for sent in back]))
        if txq.started and TX in queues:
            self._tx_sent.update(self._tx_out.settle(inflight_heads(txq)))
        if evq.started and EVENTQ in queues and self._ev_out.settle(inflight_heads(evq)):
            self._reset_due = True

    def save_state(self) -> dict:
        """What a restore keeps: the guest's CID and the next local port (so no port of
        this session is handed out again while the guest may still hold it). What it
        drops: every connection (host sockets cannot move), listed for the record with
        its counters and the bytes emu held for it."""
        return {
            "guest_cid": self.cid,
            "uds": self.host.path,
            "buf_alloc": self.buf_alloc,
            "next_port": self.conns.next_port,
            "dropped": [c.describe() for c in self.conns.by_fd.values()],
        }

    def load_state(self, state: dict) -> None:
        """Keep the CID (the saved one wins over this device's own) and the port counter;
        the saved connections are gone, and the guest is told with TRANSPORT_RESET.

        A fresh device has no connections. One stopped under a running guest (a restore
        in place: the only kind a VMM that cannot swap the device has, and a real guest
        here) drops its own as a swap would: host sockets closed, the bytes it held for
        them and the packets it owed for them gone. Called on a stopped (or never
        started) device, like ``save_state``."""
        s = STATE.check(state)
        try:
            cid = check_cid(s["guest_cid"])
        except ValueError as e:
            raise StateError(f"vsock state: {e}") from None
        if self.run_state in (RunState.RUNNING, RunState.STOPPING):
            now = self.run_state.value
            raise StateError(f"vsock: stop the device before loading a state (it is {now})")
        if self.conns:
            log.info("vsock: restore in place: %d live connections dropped", len(self.conns))
            self._drop_connections()
        if cid != self.cid:
            log.warning("vsock: the restored guest CID %d replaces this device's %d", cid, self.cid)
        self.cid = cid
        self.conns.next_port = s["next_port"]
        self._reset_due = True
        if s["dropped"]:
            log.info(
                "vsock: %d connections of the saved state are dropped (TRANSPORT_RESET)",
                len(s["dropped"]),
            )


def _layout(
    segs: list[tuple[int, int]], room: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """Where a packet goes in an rx buffer's writable segments (gpa, length): the
    header's pieces, then at most MAX_PIECES pieces for at most ``room`` payload bytes,
    and how many bytes those pieces hold. (ChainWriter's work, without its generality,
    for the one loop that runs per packet.)"""
    at: list[tuple[int, int]] = []
    pieces: list[tuple[int, int]] = []
    need, got = HDR.size, 0
    for gpa, n in segs:
        if need:
            k = min(n, need)
            at.append((gpa, k))
            need -= k
            gpa, n = gpa + k, n - k
        if n and got < room:
            k = min(n, room - got)
            pieces.append((gpa, k))
            got += k
        if not need and (got == room or len(pieces) == MAX_PIECES):
            break
    return at, pieces, got


# -- the device type: ``vsock:CID=N,uds=PATH`` --


def _from_spec(spec: Spec, build: Build) -> VsockDevice:
    """``CID`` may also be written ``cid``, and given as an option (``vsock,cid=3,...``)."""
    opts = spec.options
    cids = [v for k, v in opts.items() if k in ("cid", "CID")]
    if spec.arg:
        name, eq, value = spec.arg.partition("=")
        if name not in ("CID", "cid") or not eq:
            raise SpecError(f"{spec.arg!r}: CID=N")
        cids.append(value)
    if len(cids) != 1:
        raise SpecError("the guest's CID, once (CID=N)")
    (cid,) = cids
    if not (cid.isascii() and cid.isdigit()):
        raise SpecError(f"CID={cid!r}: a number")
    uds = opts.get("uds")
    if not uds:
        raise SpecError("the host's Unix socket (uds=PATH)")
    try:
        check_cid(int(cid))
    except ValueError as e:
        raise SpecError(str(e)) from e
    host = HybridVsock(uds)
    build.say(f"vsock: guest CID {cid}; host programs connect to {uds}")
    return VsockDevice(int(cid), host, queue_max_size=build.queue_max)


register(
    DeviceType(
        VsockDevice,
        "vsock:CID=N,uds=PATH",
        _from_spec,
        "emu.testing.vsock",
        options=("cid", "CID", "uds"),
    )
)
