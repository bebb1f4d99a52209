"""Per-vring state a vhost-user connection builds up before a ring can start.

``Vring`` holds what the SET_VRING_* messages said (size, base, user addresses, enable)
plus the state saved when the ring was stopped; ``Notifier`` is the call or err fd the
device thread signals. The base encodings are the spec's (GET/SET_VRING_BASE).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from emu.ringdefs import InflightChain, RingState
from emu.vhost_user.protocol import U64

log = logging.getLogger(__name__)


class Notifier:
    """An interrupt fd: the frontend's eventfd, or (UML) a socket we write a u64 to.

    ``signal`` runs on the device thread while ``set`` runs on the connection's thread, so
    both hold a lock: an fd is never written after it was closed (its number reused).
    Writes never block: a full socket means the frontend has a notification pending anyway.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._fd = -1
        self._sock: socket.socket | None = None

    def set(self, fd: int, kind: str = "eventfd") -> None:
        """Signal ``fd`` from now on (-1: nothing); takes the fd and closes the old one."""
        sock = socket.socket(fileno=fd) if kind == "socket" else None
        with self._lock:
            self._close()
            self._fd, self._sock = fd, sock

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd, self._sock = -1, None

    def close(self) -> None:
        with self._lock:
            self._close()

    @property
    def active(self) -> bool:
        return self._fd >= 0

    def signal(self) -> None:
        with self._lock:
            try:
                if self._sock is not None:
                    self._sock.send(U64.pack(1), socket.MSG_DONTWAIT)
                elif self._fd >= 0:
                    os.eventfd_write(self._fd, 1)
            except BlockingIOError:
                pass
            except OSError as e:
                log.warning("vhost-user: %s fd write failed: %s", self.what, e)


@dataclass
class Vring:
    index: int
    num: int = 0
    base: int = 0  # as SET_VRING_BASE encoded it
    addr: tuple[int, int, int] | None = None  # user addresses: desc, driver (avail), device
    #: log_guest_addr while VHOST_VRING_F_LOG is set: where the used ring's writes are logged
    log_addr: int | None = None
    kicked: bool = False  # SET_VRING_KICK came: the ring may start
    enabled: bool = False
    started: bool = False
    #: ring state and in-flight chains when the ring stopped (ENABLE 0, GET_VRING_BASE)
    saved: tuple[RingState, list[InflightChain]] | None = None
    call: Notifier = field(init=False)
    err: Notifier = field(init=False)

    def __post_init__(self) -> None:
        self.call = Notifier(f"vring {self.index} call")
        self.err = Notifier(f"vring {self.index} err")

    def close(self) -> None:
        self.call.close()
        self.err.close()


def encode_base(state: RingState, packed: bool) -> int:
    """GET_VRING_BASE: split = next avail index; packed = avail idx|wrap, used idx|wrap."""
    if not packed:
        return state.next_avail & 0xFFFF
    return (
        state.next_avail & 0x7FFF
        | state.avail_wrap << 15
        | (state.next_used & 0x7FFF) << 16
        | state.used_wrap << 31
    )


def decode_base(base: int, packed: bool, used_idx: int) -> RingState:
    """SET_VRING_BASE; a split ring's used index comes from guest memory (``used_idx``)."""
    if not packed:
        return RingState(base & 0xFFFF, used_idx, True, True, used_idx)
    used = base >> 16 & 0x7FFF
    return RingState(base & 0x7FFF, used, bool(base >> 15 & 1), bool(base >> 31), used)
