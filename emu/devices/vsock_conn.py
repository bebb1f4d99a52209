"""One vsock connection as the device sees it, and the table of them.

A connection joins a guest socket (the peer, on the guest's CID) and a host Unix socket
(``emu.backends.hybrid_vsock``). Its counters are the spec's credit flow control, in
free-running 32-bit arithmetic:

* guest -> host: the device advertises ``buf_alloc`` and ``fwd_cnt`` (payload bytes it
  wrote to the host socket). The guest may have at most ``buf_alloc`` bytes that are not
  forwarded yet, so ``out`` (bytes the host socket would not take yet) never holds more
  than ``buf_alloc``; a packet beyond that is a guest that ignores credit.
* host -> guest: the guest advertises its ``buf_alloc`` and ``fwd_cnt``; the device sends
  at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` more payload bytes, and reads the
  host socket only as far as that (and the receive buffer in hand) allows. A guest whose
  ``fwd_cnt`` runs ahead of what it was sent gets no credit, as in Linux.

SEQPACKET connections keep message boundaries: a message from the guest (RW packets up
to one with SEQ_EOM) goes to the host socket in one ``send``, so such a connection
advertises no more ``buf_alloc`` than that socket's send buffer takes in one message (a
Linux guest refuses a longer message with EMSGSIZE); a message from the host is read
whole (at most what the guest could buffer) and sent as RW packets, the last with
SEQ_EOM.
"""

from __future__ import annotations

import itertools
import socket
from collections import deque
from enum import Enum

from emu.devices.vsock_defs import TYPE_SEQPACKET, Header

MASK32 = 0xFFFFFFFF
#: ports the device gives host-initiated connections, counting up from here (as
#: Firecracker does); a restore keeps counting so no port of the old session is reused
FIRST_LOCAL_PORT = 1 << 30


class State(Enum):
    CONNECTING = "connecting"  # a host program asked, REQUEST sent, the guest has not answered
    ESTABLISHED = "established"


#: checked per packet (``Conn.established``): a plain name, not an Enum member lookup
_ESTABLISHED = State.ESTABLISHED


class Conn:
    """A connection: ``local_port`` is the host side's (the port the guest connected to,
    or the one the device chose), ``peer_port`` the guest socket's."""

    _ids = itertools.count(1)

    def __init__(
        self,
        local_port: int,
        peer_port: int,
        type_: int,
        sock: socket.socket,
        state: State,
        by_guest: bool,
        buf_alloc: int,
    ) -> None:
        self.id = next(self._ids)
        self.local_port = local_port
        self.peer_port = peer_port
        self.type = type_
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.by_guest = by_guest
        self.deadline: float | None = None  # CONNECTING, or closing while still flushing
        # -- credit --
        self.buf_alloc = buf_alloc  # what the device advertises for this connection
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # of those, written to the host socket
        self.last_fwd_sent = 0  # fwd_cnt in the last header the guest was sent
        # -- guest -> host --
        self.out = bytearray()  # stream bytes the host socket has not taken yet
        self.msg_in = bytearray()  # SEQPACKET: the message being received
        self.msgs_out: deque[bytes] = deque()  # SEQPACKET: whole messages not sent yet
        # -- host -> guest --
        self.msg_out = b""  # SEQPACKET: the host's message being sent to the guest
        self.msg_off = 0
        # -- shutdown and readiness --
        self.guest_shut = 0  # SHUTDOWN flags the guest sent
        self.host_eof = False  # the host program shut its writing side
        self.shut_wr_due = False  # the guest will send no more: SHUT_WR once ``out`` is flushed
        self.readable = False  # the host socket has data (or EOF) not read yet
        self.hung_up = False  # epoll saw HUP/ERR: arming again would only repeat it
        self.armed: int | None = None  # events the backend watches for now (None: none)
        self.credit_update_queued = False
        self.closing = False  # detached from the table, flushing ``out`` before close

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    @property
    def seqpacket(self) -> bool:
        return self.type == TYPE_SEQPACKET

    @property
    def established(self) -> bool:
        return self.state is _ESTABLISHED

    def peer_credit(self, hdr: Header) -> None:
        """Every packet from the guest carries its current buffer space."""
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt

    def credit(self) -> int:
        """Payload bytes the guest has room for."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & MASK32
        return max(0, self.peer_buf_alloc - in_flight)

    def unforwarded(self) -> int:
        """Guest bytes received and not written to the host socket yet."""
        return (self.rx_cnt - self.fwd_cnt) & MASK32

    def has_out(self) -> bool:
        return bool(self.out or self.msgs_out)

    @property
    def wants_read(self) -> bool:
        """Should the host socket be read (when the guest has credit)?"""
        return self.established and not self.host_eof and not self.guest_shut & 1

    def held_bytes(self) -> int:
        """Bytes emu holds for this connection (what a restore drops)."""
        queued = sum(len(m) for m in self.msgs_out)
        return len(self.out) + len(self.msg_in) + queued + len(self.msg_out) - self.msg_off

    def describe(self) -> dict:
        """The connection in a saved state: what a restore drops, for the record."""
        return {
            "local_port": self.local_port,
            "peer_port": self.peer_port,
            "type": "seqpacket" if self.seqpacket else "stream",
            "state": "closing" if self.closing else self.state.value,
            "by_guest": self.by_guest,
            "tx_cnt": self.tx_cnt,
            "rx_cnt": self.rx_cnt,
            "fwd_cnt": self.fwd_cnt,
            "held_bytes": self.held_bytes(),
        }


class ConnTable:
    """Connections by (local port, peer port) and by host socket fd.

    A connection the guest closed while bytes for the host were still waiting leaves the
    port table (the guest may reuse its port) but keeps its fd until they are written.
    Both kinds count against ``limit``: each holds a host socket.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_key: dict[tuple[int, int], Conn] = {}
        self.by_fd: dict[int, Conn] = {}
        self.next_port = FIRST_LOCAL_PORT

    def __len__(self) -> int:
        return len(self.by_fd)

    def full(self) -> bool:
        return len(self.by_fd) >= self.limit

    def get(self, local_port: int, peer_port: int) -> Conn | None:
        return self.by_key.get((local_port, peer_port))

    def add(self, conn: Conn) -> None:
        self.by_key[conn.key] = conn
        self.by_fd[conn.fd] = conn

    def detach(self, conn: Conn) -> None:
        """Out of the port table only (closing, still flushing to the host)."""
        if self.by_key.get(conn.key) is conn:
            del self.by_key[conn.key]

    def remove(self, conn: Conn) -> None:
        self.detach(conn)
        if self.by_fd.get(conn.fd) is conn:
            del self.by_fd[conn.fd]

    def local_port_for(self, peer_port: int) -> int:
        """A port for a host-initiated connection to the guest's ``peer_port``."""
        while True:
            port = self.next_port
            self.next_port = port + 1 if port < MASK32 - 1 else FIRST_LOCAL_PORT
            if (port, peer_port) not in self.by_key:
                return port
