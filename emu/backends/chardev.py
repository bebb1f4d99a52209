"""Character backends for console ports: stdio, pty, unix socket, in-memory.

Input is pulled: a backend buffers what arrives (bounded) and calls the ``wake`` it was
attached to; the device thread then ``read``s only as much as it can queue for the guest.
When the buffer is full the reader thread stops reading, so the kernel's buffers fill and
the writer on the other side blocks: input is throttled, never dropped.

Output (guest -> outside) never blocks the device thread: what the other side is not
ready to take (no client, full pty) is dropped and counted in ``dropped``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import tty
from collections.abc import Callable

INPUT_LIMIT = 64 * 1024


class CharBackend:
    """Byte stream for one port. ``connected``: someone is at the other end (PORT_OPEN)."""

    def __init__(self, limit: int = INPUT_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self._input = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._wake: Callable[[], None] = lambda: None

    @property
    def connected(self) -> bool:
        return True

    def attach(self, wake: Callable[[], None]) -> None:
        """``wake`` is called (any thread) on new input or a change of ``connected``."""
        self._wake = wake
        if self.pending():
            wake()

    def pending(self) -> int:
        with self._cond:
            return len(self._input)

    def read(self, n: int) -> bytes:
        """Up to ``n`` buffered input bytes, without blocking."""
        with self._cond:
            data = bytes(self._input[:n])
            del self._input[:n]
            self._cond.notify_all()
        return data

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _room(self) -> int:
        """Block until the input buffer has room; 0 once closed (reader threads)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or len(self._input) < self.limit)
            return 0 if self._closed else self.limit - len(self._input)

    def _received(self, data: bytes) -> None:
        with self._cond:
            self._input += data
        self._wake()


class BufferChar(CharBackend):
    """In memory: tests and the demo feed input and look at output."""

    def __init__(self, limit: int = INPUT_LIMIT) -> None:
        super().__init__(limit)
        self.output = bytearray()

    def feed(self, data: bytes) -> None:
        """Input for the guest; the test's own memory, so not bounded here."""
        self._received(data)

    def write(self, data: bytes) -> None:
        with self._cond:
            self.output += data
            self._cond.notify_all()

    def wait_output(self, n: int, timeout: float = 5.0) -> bytes:
        """Take the first ``n`` output bytes once they are there (TimeoutError if not)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.output) >= n, timeout):
                raise TimeoutError(f"{len(self.output)} of {n} output bytes")
            data = bytes(self.output[:n])
            del self.output[:n]
        return data


class _FdChar(CharBackend):
    """A reader thread that moves bytes from ``rfd`` into the input buffer."""

    def __init__(self, rfd: int, wfd: int, limit: int) -> None:
        super().__init__(limit)
        self.rfd, self.wfd = rfd, wfd
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._reader, name="emu-char", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        poller.register(self.rfd, select.POLLIN)
        while room := self._room():
            if any(fd == self._stop for fd, _ in poller.poll()):
                return
            try:
                data = os.read(self.rfd, room)
            except BlockingIOError:
                continue
            except OSError as e:  # EIO: the pty's other side went away
                if e.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                poller.unregister(self.rfd)
                continue
            self._received(data)

    def write(self, data: bytes) -> None:
        try:
            n = os.write(self.wfd, data)
        except (BlockingIOError, BrokenPipeError):
            n = 0
        self.dropped += len(data) - n

    def close(self) -> None:
        super().close()
        os.eventfd_write(self._stop, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._stop)


class StdioChar(_FdChar):
    """The emulator's own stdin/stdout (left in whatever mode the terminal is in)."""

    def __init__(self, limit: int = INPUT_LIMIT) -> None:
        super().__init__(0, 1, limit)


class PtyChar(_FdChar):
    """A pseudo-terminal; connect with ``screen <path>`` or open ``path`` in a test.

    The slave side is kept open (so reads do not fail with EIO while nobody is attached)
    and put in raw mode: no echo, no newline translation, bytes pass unchanged.
    """

    def __init__(self, limit: int = INPUT_LIMIT) -> None:
        master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(master, False)
        self.path = os.ttyname(self._slave)
        super().__init__(master, master, limit)

    def close(self) -> None:
        super().close()
        os.close(self.rfd)
        os.close(self._slave)


class SocketChar(CharBackend):
    """A unix stream socket server at ``path``; one client at a time, others are refused."""

    def __init__(self, path: str | os.PathLike, limit: int = INPUT_LIMIT) -> None:
        super().__init__(limit)
        self.path = os.fspath(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(1)
        self._client: socket.socket | None = None
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="emu-char-sock", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        poller.register(self._server, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop:
                    return
                if fd == self._server.fileno():
                    self._accept(poller)
                elif not self._client_input(poller):
                    return

    def _accept(self, poller: select.poll) -> None:
        conn, _ = self._server.accept()
        if self._client is not None:
            conn.close()
            return
        conn.setblocking(False)
        self._client = conn
        poller.register(conn, select.POLLIN)
        self._wake()

    def _client_input(self, poller: select.poll) -> bool:
        """Read from the client; False once closed."""
        client = self._client
        room = self._room()
        if not room or client is None:
            return False
        try:
            data = client.recv(room)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if data:
            self._received(data)
            return True
        poller.unregister(client)
        self._client = None
        client.close()
        self._wake()
        return True

    def write(self, data: bytes) -> None:
        client = self._client
        n = 0
        if client is not None:
            try:
                n = client.send(data)
            except OSError:
                n = 0
        self.dropped += len(data) - n

    def close(self) -> None:
        super().close()
        os.eventfd_write(self._stop, 1)
        self._thread.join()
        os.close(self._stop)
        if self._client is not None:
            self._client.close()
        self._server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
