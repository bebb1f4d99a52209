"""The host's end of a real guest's vsock streams, through emu's hybrid vsock.

Firecracker's convention, which emu's vsock device follows (`vsock:CID=N,uds=PATH`): a
guest's connect to CID 2 port P reaches the Unix socket `PATH_P` a host program listens
on (`listen`, `EchoServer`, `sink`); a host program reaches a guest listener on port P by
connecting to `PATH` and writing `CONNECT P\\n`, answered `OK <port>\\n` before the byte
stream starts (`connect`). Used by the real-guest tests and bench/vsock_io.py; the guest
side is /init's `vsock` workload (init_vsock.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 16


class HybridError(ConnectionError):
    """The hybrid vsock never accepted `CONNECT P` (no guest listener on P in time)."""


def port_path(uds: str | os.PathLike, port: int) -> Path:
    """Where the host listens for the guest's connections to CID 2 port `port`."""
    return Path(f"{os.fspath(uds)}_{port}")


def _line(sock: socket.socket, limit: int = 64) -> bytes:
    """One answer line, read a byte at a time: nothing of the stream after it is taken."""
    out = b""
    while not out.endswith(b"\n") and len(out) < limit:
        b = sock.recv(1)
        if not b:
            break
        out += b
    return out


def connect(uds: str | os.PathLike, port: int, timeout: float = 30.0) -> socket.socket:
    """A stream to the guest's listener on `port`, retried until the guest listens.

    A refused CONNECT (no listener yet: the guest answers RST, emu closes the socket) is
    tried again every 0.1 s until `timeout`, then HybridError with the last answer.
    """
    deadline = time.monotonic() + timeout
    last = "nothing"
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(1.0, timeout))
        try:
            s.connect(os.fspath(uds))
            s.sendall(b"CONNECT %d\n" % port)
            answer = _line(s)
            if answer.startswith(b"OK ") and answer.endswith(b"\n"):
                s.settimeout(None)
                return s
            last = repr(answer)
        except OSError as e:
            last = str(e)
        s.close()
        if time.monotonic() > deadline:
            raise HybridError(f"CONNECT {port} on {uds}: {last} after {timeout:g} s")
        time.sleep(0.1)


def listen(uds: str | os.PathLike, port: int) -> socket.socket:
    """A listening socket at `PATH_port` for the guest's connections to CID 2 `port`."""
    path = port_path(uds, port)
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.listen(64)
    return s


def accept(listener: socket.socket, timeout: float = 60.0) -> socket.socket:
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    conn.settimeout(None)
    return conn


def read_all(sock: socket.socket) -> tuple[int, str]:
    """(bytes, sha256) of everything until EOF."""
    h, n = hashlib.sha256(), 0
    while chunk := sock.recv(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


@dataclass
class Received:
    """One connection an EchoServer served."""

    nbytes: int = 0
    sha256: str = ""
    error: str | None = None  # how it ended if not by EOF (e.g. a reset)
    done: bool = False


class EchoServer:
    """Echoes every connection the guest makes to CID 2 `port`, one thread each, and
    records what each brought (`received`, in accept order)."""

    def __init__(self, uds: str | os.PathLike, port: int) -> None:
        self.path = port_path(uds, port)
        self.listener = listen(uds, port)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="vsock-echo", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            rec = Received()
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.received.append(rec)
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn, rec), daemon=True).start()

    def _echo(self, conn: socket.socket, rec: Received) -> None:
        h = hashlib.sha256()
        try:
            while chunk := conn.recv(CHUNK):
                h.update(chunk)
                rec.nbytes += len(chunk)
                rec.sha256 = h.hexdigest()
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            rec.error = e.strerror or str(e)
        finally:
            rec.sha256 = h.hexdigest()
            rec.done = True
            conn.close()

    def wait(self, cond, what: str, timeout: float = 60.0) -> None:
        """Until `cond(self.received)` holds (TimeoutError naming `what`)."""
        deadline = time.monotonic() + timeout
        while not cond(self.received):
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo server: {what} not after {timeout:g} s")
            time.sleep(0.02)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
