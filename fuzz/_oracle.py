"""What every target checks besides its own properties, and how a violation is reported.

emu's last lines of defence (the device thread's catch-all, the vhost-user server's) log
the exception with ``log.exception`` and carry on; the process survives, but the input
hit a bug. ``Watch`` turns such a record into a ``Finding``, and checks that an input
leaves no fd and no thread behind.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable


class Finding(AssertionError):
    """A property emu promises did not hold for this input."""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.caught: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.caught.append(f"{record.name}: {record.getMessage()}: {record.exc_info[1]!r}")


_collect = _Collect()


def quiet_emu_logging() -> None:
    """Hostile inputs make emu log a warning per mistake; keep only caught exceptions."""
    emu = logging.getLogger("emu")
    emu.setLevel(logging.ERROR)
    emu.propagate = False
    if _collect not in emu.handlers:
        emu.addHandler(_collect)


def open_fds() -> set[int]:
    """The process's open fds; the one the listing used is closed again by the time its
    link is read, and left out."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        fds.add(int(name))
    return fds


class Watch:
    """``with Watch(fds=True, threads=True):`` around one input's whole life."""

    def __init__(self, fds: bool = False, threads: bool = False) -> None:
        self.fds, self.threads = fds, threads
        #: says what still holds a leaked fd, when a target knows (part of the message)
        self.hint: Callable[[set[int]], str] = lambda leaked: ""

    def __enter__(self) -> Watch:
        quiet_emu_logging()
        _collect.caught.clear()
        self.fd0 = open_fds() if self.fds else set()
        self.th0 = set(threading.enumerate()) if self.threads else set()
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is not None:
            return
        if _collect.caught:
            raise Finding("emu caught an unexpected exception: " + "; ".join(_collect.caught))
        if self.threads:
            left = self._threads_left()
            if left:
                raise Finding(f"threads left running: {[t.name for t in left]}")
        if self.fds:
            leaked = open_fds() - self.fd0
            if leaked:
                what = {fd: _describe(fd) for fd in sorted(leaked)}
                raise Finding(f"fds leaked: {what}{self.hint(leaked)}")

    def _threads_left(self) -> list[threading.Thread]:
        deadline = time.monotonic() + 2.0  # a daemon helper may be on its way out
        while True:
            left = [t for t in threading.enumerate() if t not in self.th0 and t.is_alive()]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.001)


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
