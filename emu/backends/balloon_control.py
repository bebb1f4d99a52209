"""The host's hand on a balloon: a small line protocol on a Unix socket.

``emu serve --socket S balloon,control=PATH`` listens on PATH; ``emu balloon --control
PATH ...`` (or ``socat - UNIX-CONNECT:PATH``) speaks it. One command per line, one
answer per command: a line of JSON with ``"ok": true`` and the result, or ``"ok": false``
and ``"error"``.

    target MIB      make the balloon MIB MiB: what the guest is asked to give back
                    (Firecracker's amount_mib), not the memory it keeps (QEMU's balloon)
    target          the current target and what the guest reports
    stats           fresh memory statistics from the guest (waits up to STATS_WAIT s;
                    "fresh": false and the last figures when none came)
    info            target, actual, features, RAM, the backing's allocated bytes and the
                    device's counters

Each client's commands are answered in order, one at a time, on a worker thread: a
``stats`` waiting for the guest holds only the client that asked, never the others nor
the server thread. A client is not read while its command runs (its next lines wait in
the kernel), a line longer than MAX_LINE or more than MAX_CLIENTS clients at once are
refused, so a client cannot make the server buffer or work without bound.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_LINE = 1024
MAX_CLIENTS = 16
STATS_WAIT = 1.0
#: seconds between attempts when accept fails (no free fd): the client waits in the backlog
ACCEPT_RETRY = 0.1
MIB_PAGES = 256  # 4 KiB pages per MiB
USAGE = "target [MIB], stats, info"
LONG = f"line longer than {MAX_LINE} bytes"


class Balloon(Protocol):
    """What the control needs of the device (emu.devices.balloon.BalloonDevice)."""

    num_pages: int
    actual: int

    def set_target(self, pages: int) -> None: ...
    def stats(self, refresh: bool = False, timeout: float = 1.0) -> dict[str, Any]: ...
    def info(self) -> dict[str, Any]: ...


def answer(balloon: Balloon, line: str) -> dict[str, Any]:
    """The answer to one command line (also the protocol's reference, for tests)."""
    words = line.split()
    if not words:
        return {"ok": False, "error": f"empty command ({USAGE})"}
    cmd, args = words[0], words[1:]
    try:
        if cmd == "target" and len(args) <= 1:
            if args:
                mib = int(args[0])
                if mib < 0:
                    raise ValueError("a target is 0 MiB or more")
                balloon.set_target(mib * MIB_PAGES)
            return {
                "ok": True,
                "target_mib": balloon.num_pages / MIB_PAGES,
                "actual_mib": balloon.actual / MIB_PAGES,
            }
        if cmd == "stats" and not args:
            return {"ok": True, **balloon.stats(refresh=True, timeout=STATS_WAIT)}
        if cmd == "info" and not args:
            return {"ok": True, **balloon.info()}
    except ValueError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": False, "error": f"unknown command {line.strip()[:64]!r} ({USAGE})"}


@dataclass(eq=False)
class _Client:
    conn: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    busy: bool = False  # a command of its is being answered (it is not read meanwhile)
    eof: bool = False  # it has sent all it will send


class ControlServer:
    """Listens at once (a bad path fails when the device is made); serves once attached."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path) and stat.S_ISSOCK(os.stat(self.path).st_mode):
            os.unlink(self.path)  # a stale socket from an earlier run
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(MAX_CLIENTS)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._clients: dict[socket.socket, _Client] = {}
        #: answers the workers have ready, for the server thread to send
        self._answers: deque[tuple[_Client, dict[str, Any]]] = deque()
        self._workers = ThreadPoolExecutor(MAX_CLIENTS, "emu-balloon-command")
        self._accept_at: float | None = None  # when to try accept again after it failed
        self._balloon: Balloon | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def attach(self, balloon: Balloon) -> None:
        self._balloon = balloon
        self._thread = threading.Thread(target=self._run, name="emu-balloon-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
        self._workers.shutdown(wait=True)  # a stats wait ends within STATS_WAIT
        for conn in self._clients:
            conn.close()
        self._clients.clear()
        self._listener.close()
        os.close(self._wake)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake, selectors.EVENT_READ)
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._closed:
                timeout = None
                if self._accept_at is not None:
                    timeout = max(0.0, self._accept_at - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.fileobj is self._wake:
                        self._answered(sel)
                    else:
                        self._read(sel, key.data)
                if self._accept_at is not None and time.monotonic() >= self._accept_at:
                    self._accept_at = None
                    sel.register(self._listener, selectors.EVENT_READ)
        except Exception:  # the device goes on without its control
            log.exception("balloon control on %s failed", self.path)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of fds: the client waits in the backlog meanwhile
            log.warning("balloon control: accept failed (again in %s s): %s", ACCEPT_RETRY, e)
            sel.unregister(self._listener)
            self._accept_at = time.monotonic() + ACCEPT_RETRY
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._send(conn, {"ok": False, "error": f"more than {MAX_CLIENTS} clients"})
            conn.close()
            return
        conn.setblocking(False)
        client = self._clients[conn] = _Client(conn)
        sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, sel: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        client.buf += data
        if not data:
            client.eof = True
            sel.unregister(client.conn)
        self._next(sel, client)

    def _next(self, sel: selectors.BaseSelector, client: _Client) -> None:
        """Hand the client's next whole line to a worker, or drop the client once it has
        none left after its end or holds more than MAX_LINE bytes without one."""
        while not client.busy:
            end = client.buf.find(b"\n")
            if end < 0:
                if len(client.buf) > MAX_LINE:
                    self._send(client.conn, {"ok": False, "error": LONG})
                    self._drop(sel, client)
                elif client.eof:
                    self._drop(sel, client)
                return
            line = bytes(client.buf[:end])
            del client.buf[: end + 1]
            if len(line) > MAX_LINE:
                self._send(client.conn, {"ok": False, "error": LONG})
                continue
            client.busy = True
            if not client.eof:
                sel.unregister(client.conn)  # its next lines wait in the kernel meanwhile
            self._workers.submit(self._command, client, line)

    def _command(self, client: _Client, line: bytes) -> None:
        """A worker thread: the answer to one line, handed back to the server thread."""
        assert self._balloon is not None
        try:
            reply = answer(self._balloon, line.decode("utf-8", "replace"))
        except Exception as e:  # a device problem is the client's answer, not our end
            log.exception("balloon control: %r failed", line[:64])
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        self._answers.append((client, reply))
        os.eventfd_write(self._wake, 1)

    def _answered(self, sel: selectors.BaseSelector) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._answers:
            client, reply = self._answers.popleft()
            client.busy = False
            self._send(client.conn, reply)
            if not client.eof:
                sel.register(client.conn, selectors.EVENT_READ, client)
            self._next(sel, client)

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
        """Answers are short; a client that does not read them loses them."""
        try:
            conn.send(json.dumps(reply).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _drop(self, sel: selectors.BaseSelector, client: _Client) -> None:
        """Only an idle client (no command running) is dropped."""
        if not client.eof:
            sel.unregister(client.conn)
        del self._clients[client.conn]
        client.conn.close()
