"""Where a blk device's disk lives: a host path (file or block device) or an NBD URI.

The native data plane needs an asynchronous engine (emu.backends.engine): io_uring for a
path, libnbd for ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``. The
Python reference path runs one request at a time: a path through BlockFile's syscalls,
an NBD export through the engine's blocking Python face. A native module that is not
built is a clear error, never a quiet switch to another way of doing I/O.
"""

from __future__ import annotations

import os
from typing import Any

NBD_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")


def is_nbd(target: str | os.PathLike) -> bool:
    return isinstance(target, str) and target.startswith(NBD_SCHEMES)


def open_engine(target: str | os.PathLike, readonly: bool, depth: int) -> Any:
    """An Engine with up to ``depth`` requests outstanding on ``target``."""
    if is_nbd(target):
        try:
            from emu.backends._nbd import NbdEngine
        except ImportError as e:
            raise RuntimeError(
                "NBD storage needs emu.backends._nbd, which is not built (it needs "
                "libnbd-dev; ./emu.sh installs it, then `pip install -e .`)"
            ) from e
        return NbdEngine(target, readonly=readonly, depth=depth)
    try:
        from emu.backends._uring import UringEngine
    except ImportError as e:
        raise RuntimeError(
            "the native blk plane needs emu.backends._uring, which is not built (it needs "
            "liburing-dev; ./emu.sh installs it), or use plane='python' (EMU_BLK_PLANE=python)"
        ) from e
    return UringEngine(target, readonly=readonly, depth=depth)


def open_sync(target: str | os.PathLike, readonly: bool) -> Any:
    """Storage for the Python path: preadv / pwritev / flush / discard / write_zeroes."""
    if is_nbd(target):
        return open_engine(target, readonly, 1)
    from emu.backends.file import BlockFile

    return BlockFile(target, readonly=readonly)
