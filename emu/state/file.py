"""Snapshot files on disk: written atomically, read with a size and a time limit."""

from __future__ import annotations

import os
import select
import stat
from pathlib import Path

from emu.state.format import MAX_STATE_BYTES, DeviceState, StateError, decode, encode

#: seconds a FIFO (or device) may keep a reader waiting for its first bytes
PIPE_WAIT = 10.0


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """temp file in the same directory + fsync + rename + fsync(dir): all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(path: str | os.PathLike, state: DeviceState) -> None:
    write_atomic(path, encode(state))


def load(path: str | os.PathLike) -> DeviceState:
    try:
        data = _read(path)
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from e
    try:
        return decode(data)
    except StateError as e:
        raise StateError(f"{path}: {e}") from e


def _read(path: str | os.PathLike) -> bytes:
    """The file's bytes, up to one more than a state may have. A FIFO or device is waited
    on for PIPE_WAIT seconds at most: a FIFO nobody writes to would block a plain open
    and read for ever (``emu state show <(cmd)`` has its writer and reads as usual)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            ready, _, _ = select.select([fd], [], [], PIPE_WAIT)
            if not ready:
                raise StateError(
                    f"{path}: nothing to read after {PIPE_WAIT:g} s (a FIFO without a writer?)"
                )
        os.set_blocking(fd, True)
        return f.read(MAX_STATE_BYTES + 1)
