"""The host side of a vsock device as Unix sockets: Firecracker's "hybrid vsock".

* A guest that connects to the host (CID 2) port P reaches the program listening on the
  Unix socket ``PATH_P`` (``connect``: the device asks, the connection is made at once).
* A host program connects to ``PATH`` and writes ``CONNECT P\\n``; the device asks the
  guest's listener on port P and, once it accepts, writes ``OK <local port>\\n``; from
  then on the socket carries the byte stream to and from the guest.

This module is plumbing only. It owns the listening socket and reads the ``CONNECT``
line (only that line: bytes the program sends right after it stay in the socket for the
guest), then hands the socket to the device. A watcher thread tells the device which of
its connection sockets turned readable or writable, through one-shot epoll: a socket is
reported once per ``arm``, so one the device cannot serve now (no credit from the guest)
costs nothing until the device asks again. The device thread does every read and write
itself, non-blocking, so a slow or stuck program never holds it, and bytes are read
from a socket only when they can go straight to the guest.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import socket
import stat
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

#: a ``CONNECT`` line longer than this is refused (``CONNECT 4294967295\n`` is 19)
LINE_MAX = 32
_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
#: seconds a program has to send its ``CONNECT`` line
HANDSHAKE_TIMEOUT = 5.0
#: programs connected to PATH that have not sent their line yet, at most
MAX_HANDSHAKES = 64
#: seconds the listening socket is left alone after an accept failed (EMFILE and the
#: like): it stays readable, so retrying at once would spin
ACCEPT_BACKOFF = 0.5

IN = select.EPOLLIN | select.EPOLLRDHUP
OUT = select.EPOLLOUT
#: the peer closed or failed: epoll reports these on every armed socket
GONE = select.EPOLLHUP | select.EPOLLERR


class HostListener(Protocol):
    """What the backend calls, on its watcher thread; each must only queue and wake."""

    def host_connect(self, sock: socket.socket, port: int) -> None:
        """A program asked for the guest's port ``port``; the device owns ``sock`` now."""

    def host_ready(self, fd: int, events: int) -> None:
        """Connection socket ``fd`` (armed with ``arm``) has ``events`` (epoll bits)."""

    def host_timer(self) -> None:
        """The time asked for with ``wake_at`` has come."""


class HybridVsock:
    """Listens on ``path``; guest connections go to ``path`` + ``_PORT``."""

    def __init__(self, path: str | os.PathLike, *, handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.path = os.fspath(path)
        self.handshake_timeout = handshake_timeout
        self.refused = 0  # host programs turned away (bad line, too many, too slow)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            _bind(server, self.path)
            server.listen(128)
        except OSError:
            server.close()
            raise
        self._server = server
        self._epoll = select.epoll()
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._stop, select.EPOLLIN)
        self._epoll.register(server, select.EPOLLIN)
        #: sockets waiting for their CONNECT line: fd -> (socket, deadline); watcher only
        self._handshakes: dict[int, tuple[socket.socket, float]] = {}
        self._timer: float | None = None
        self._accept_again: float | None = None  # accepting paused until then (watcher)
        self._closing = False
        self._listener: HostListener | None = None
        self._thread: threading.Thread | None = None

    def attach(self, listener: HostListener) -> None:
        self._listener = listener
        self._thread = threading.Thread(target=self._watch, name="emu-vsock-host", daemon=True)
        self._thread.start()

    # -- for the device thread --

    def port_path(self, port: int) -> str:
        return f"{self.path}_{port}"

    def connect(self, port: int, seqpacket: bool = False) -> socket.socket:
        """A non-blocking socket connected to ``PATH_port`` (OSError if nobody listens
        there, or its backlog is full: a Unix connect never waits)."""
        kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self.port_path(port))
        except OSError:
            sock.close()
            raise
        return sock

    def arm(self, fd: int, events: int) -> None:
        """Report ``events`` on ``fd`` once (hang-ups and errors are always reported)."""
        flags = events | select.EPOLLONESHOT
        if self._epoll.closed:
            return
        try:
            self._epoll.modify(fd, flags)
        except FileNotFoundError:
            self._epoll.register(fd, flags)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (before the device closes it)."""
        try:
            self._epoll.unregister(fd)
        except (FileNotFoundError, ValueError, OSError):
            pass

    def wake_at(self, when: float | None) -> None:
        """Call ``host_timer`` at ``when`` (time.monotonic; None: never)."""
        self._timer = when
        if not self._epoll.closed:
            os.eventfd_write(self._stop, 1)  # the watcher recomputes its timeout

    def stop(self) -> None:
        """No more callbacks and no more host programs: the watcher ends, the listening
        socket closes. The device may still ``arm``/``forget``/``wake_at`` (no-ops now)
        while it closes its connections; ``close`` then releases the rest."""
        if self._thread is not None:
            self._closing = True
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        for sock, _ in self._handshakes.values():
            sock.close()
        self._handshakes.clear()
        if self._server.fileno() >= 0:
            self._server.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.stop()
        if not self._epoll.closed:
            self._epoll.close()
            os.close(self._stop)

    # -- the watcher thread --

    def _watch(self) -> None:
        server_fd = self._server.fileno()
        while True:
            events = self._epoll.poll(self._timeout())
            for fd, ev in events:
                if fd == self._stop:
                    os.eventfd_read(self._stop)
                    if self._closing:
                        return
                elif fd == server_fd:
                    self._accept()
                elif fd in self._handshakes:
                    self._handshake(fd)
                elif self._listener is not None:
                    self._listener.host_ready(fd, ev)
            self._expire()

    def _timeout(self) -> float:
        deadlines = [d for _, d in self._handshakes.values()]
        for when in (self._timer, self._accept_again):
            if when is not None:
                deadlines.append(when)
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        if self._accept_again is not None and self._accept_again <= now:
            self._accept_again = None
            self._epoll.modify(self._server, select.EPOLLIN)
        for fd, (sock, deadline) in list(self._handshakes.items()):
            if deadline <= now:
                log.info("vsock: host connection sent no CONNECT line in time, closed")
                self._refuse(fd, sock)
        timer = self._timer
        if timer is not None and timer <= now:
            self._timer = None
            if self._listener is not None:
                self._listener.host_timer()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the program waits in the backlog
                log.warning("vsock: cannot accept a host connection: %s", e)
                self._epoll.modify(self._server, 0)
                self._accept_again = time.monotonic() + ACCEPT_BACKOFF
                return
            sock.setblocking(False)
            if len(self._handshakes) >= MAX_HANDSHAKES:
                self.refused += 1
                sock.close()
                continue
            deadline = time.monotonic() + self.handshake_timeout
            self._handshakes[sock.fileno()] = (sock, deadline)
            self._epoll.register(sock, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def _handshake(self, fd: int) -> None:
        """Read the CONNECT line once it is whole; only the line is taken from the socket."""
        sock, _ = self._handshakes[fd]
        try:
            seen = sock.recv(LINE_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            seen = b""
        end = seen.find(b"\n")
        if end < 0:
            if not seen or len(seen) >= LINE_MAX:
                self._refuse(fd, sock)
            return  # wait for the rest of the line (edge-triggered: new bytes wake us)
        line = sock.recv(end + 1)
        m = _LINE.fullmatch(line)
        port = int(m.group(1)) if m else -1
        if not 0 <= port <= 0xFFFFFFFF:
            log.info("vsock: host connection sent %r, not CONNECT <port>", line[:LINE_MAX])
            self._refuse(fd, sock)
            return
        del self._handshakes[fd]
        self._epoll.unregister(fd)
        if self._listener is None:
            sock.close()
        else:
            self._listener.host_connect(sock, port)

    def _refuse(self, fd: int, sock: socket.socket) -> None:
        self.refused += 1
        self._handshakes.pop(fd, None)
        self.forget(fd)
        sock.close()


def _bind(server: socket.socket, path: str) -> None:
    """Bind ``path``; a socket file left there by an emu that did not close (nobody
    listens on it) is replaced, anything else is an error."""
    try:
        server.bind(path)
        return
    except OSError as e:
        if e.errno != errno.EADDRINUSE or not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another program listens there")
    server.bind(path)


def peer_closed(sock: socket.socket) -> bool:
    """Has the other end closed the socket entirely (not only shut its writing side)?"""
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
