"""Snapshot files on disk: written atomically, read with a size limit."""

from __future__ import annotations

import os
from pathlib import Path

from emu.state.format import MAX_STATE_BYTES, DeviceState, StateError, decode, encode


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
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from e
    try:
        return decode(data)
    except StateError as e:
        raise StateError(f"{path}: {e}") from e
