"""A block device image on a host file (or host block device), for virtio-blk.

Everything is a positioned syscall on one fd: guest buffers go to ``preadv``/``pwritev``
as memoryviews over guest RAM, so payload never passes through a Python ``bytes``.
There is no cache in this process: once ``pwritev`` returns, the data is in the host's
page cache (what a reader of the file sees); ``flush`` makes it durable.

Discard and write-zeroes use ``fallocate`` (PUNCH_HOLE / ZERO_RANGE). Filesystems without
one of those modes (tmpfs has no ZERO_RANGE) fall back to the next one, and finally to
writing zeros, so the observable result is the same everywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: errnos meaning "this fallocate mode is not available here", not "the I/O failed"
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

Buffers = Sequence[memoryview]


class BlockFile:
    """An open image: size fixed at open, positioned I/O, flush, discard, zeroing."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        # not st_size: a host block device reports 0 there, lseek finds its end
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._modes = {FALLOC_FL_PUNCH_HOLE: True, FALLOC_FL_ZERO_RANGE: True}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def preadv(self, buffers: Buffers, offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def pwritev(self, buffers: Buffers, offset: int) -> int:
        return os.pwritev(self.fd, buffers, offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Let the host reclaim the range; a no-op where holes cannot be punched."""
        self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make the range read back as zeros; ``unmap`` allows deallocating it."""
        modes = [FALLOC_FL_ZERO_RANGE]
        if unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE)
        for mode in modes:
            if self._try_fallocate(mode, offset, length):
                return
        self._write_zero_bytes(offset, length)

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True if done; False if this file cannot do ``mode`` (remembered)."""
        if length == 0:
            return True
        if not self._modes[mode]:
            return False
        if _fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            self._modes[mode] = False
            return False
        raise OSError(err, os.strerror(err), self.path)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, zeros[: min(end - offset, _ZERO_CHUNK)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing", self.path)
            offset += n
