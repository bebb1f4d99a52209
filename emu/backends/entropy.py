"""Where virtio-rng's bytes come from: os.urandom, a host file, or a callable (tests).

A file source (``/dev/urandom``, ``/dev/hwrng``, a fixed file for reproducible runs) is
read with ``readv`` straight into guest memory. A file that reaches its end is exhausted:
``fill`` then returns 0 and the device reports that it cannot go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

Source = str | os.PathLike | Callable[[int], bytes] | None


class EntropySource:
    def __init__(self, source: Source = None) -> None:
        self._fd = -1
        self._func: Callable[[int], bytes] = os.urandom
        if callable(source):
            self._func = source
        elif source is not None:
            self._fd = os.open(os.fspath(source), os.O_RDONLY | os.O_CLOEXEC)

    def fill(self, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` in order as far as the source gives; bytes written (0 = dry)."""
        if self._fd >= 0:
            return os.readv(self._fd, buffers)
        done = 0
        for buf in buffers:
            data = self._func(len(buf))[: len(buf)]
            buf[: len(data)] = data
            done += len(data)
            if len(data) < len(buf):
                break
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
