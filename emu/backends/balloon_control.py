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

Commands from all clients are answered one at a time by one thread; a line longer than
MAX_LINE or more than MAX_CLIENTS clients at once are refused, so a client cannot make
the server buffer without bound.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_LINE = 1024
MAX_CLIENTS = 16
STATS_WAIT = 1.0
MIB_PAGES = 256  # 4 KiB pages per MiB
USAGE = "target [MIB], stats, info"


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


class ControlServer:
    """Listens at once (a bad path fails when the device is made); serves once attached."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path) and stat.S_ISSOCK(os.stat(self.path).st_mode):
            os.unlink(self.path)  # a stale socket from an earlier run
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(4)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._clients: dict[socket.socket, bytearray] = {}
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
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.fileobj is not self._wake:
                        self._read(sel, key.fileobj)  # type: ignore[arg-type]
        except Exception:  # the device goes on without its control
            log.exception("balloon control on %s failed", self.path)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of fds: the client waits in the backlog
            log.warning("balloon control: accept failed: %s", e)
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._send(conn, {"ok": False, "error": f"more than {MAX_CLIENTS} clients"})
            conn.close()
            return
        conn.setblocking(False)
        self._clients[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = self._clients[conn]
        buf += data
        while (end := buf.find(b"\n")) >= 0:
            line, buf[:] = bytes(buf[:end]), buf[end + 1 :]
            self._command(conn, line)
        if not data or len(buf) > MAX_LINE:
            if data:
                self._send(conn, {"ok": False, "error": f"line longer than {MAX_LINE} bytes"})
            self._drop(sel, conn)

    def _command(self, conn: socket.socket, line: bytes) -> None:
        assert self._balloon is not None
        if len(line) > MAX_LINE:
            reply: dict[str, Any] = {"ok": False, "error": f"line longer than {MAX_LINE} bytes"}
        else:
            try:
                reply = answer(self._balloon, line.decode("utf-8", "replace"))
            except Exception as e:  # a device problem is the client's answer, not our end
                log.exception("balloon control: %r failed", line[:64])
                reply = {"ok": False, "error": f"internal error: {e!r}"}
        self._send(conn, reply)

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
        """Answers are short; a client that does not read them loses them."""
        try:
            conn.send(json.dumps(reply).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        del self._clients[conn]
        conn.close()
