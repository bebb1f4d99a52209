# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Engine base class (see engine.pxd) and its blocking Python face.

Concrete engines (emu.backends._uring, emu.backends._nbd) implement the ``cdef`` calls.
The Python methods here run one request at a time on top of them, with the same names and
meaning as ``emu.backends.file.BlockFile``: that is what blk's Python reference path and
the tests use, so both paths can run on the same engine.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EBUSY, EIO, ENOSYS
from libc.stdlib cimport free, malloc
from posix.uio cimport iovec

import os


cdef class Engine:
    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.timeout = 5.0

    cdef int submit(self, int op, uint64_t tag, const iovec *iov, int niov,
                    uint64_t offset, uint64_t length, int flags) noexcept nogil:
        return -ENOSYS

    cdef int kick(self) noexcept nogil:
        return 0

    cdef unsigned ready(self) noexcept nogil:
        return 0

    cdef int reap(self, Done *out, int max) noexcept nogil:
        return 0

    cdef int wait(self, Done *out, int max) noexcept nogil:
        return 0

    cdef int cancel_reads(self) noexcept nogil:
        return 0

    cdef int fence(self) noexcept nogil:
        return 0

    def close(self) -> None:
        """Release the backend; subclasses close their own resources first."""

    # -- blocking Python face: one request at a time --

    cdef int64_t _run(self, int op, const iovec *iov, int niov, uint64_t offset,
                      uint64_t length, int flags) except? -1:
        cdef Done d
        cdef int rc
        if self.outstanding:
            raise OSError(EBUSY, "engine has requests outstanding from the native plane")
        with nogil:
            rc = self.submit(op, 0, iov, niov, offset, length, flags)
            if rc == 0:
                rc = self.kick()
            if rc == 0:
                rc = self.wait(&d, 1)
                rc = 0 if rc == 1 else -EIO
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        if d.result < 0:
            raise OSError(<int>-d.result, os.strerror(<int>-d.result))
        return d.result

    cdef int64_t _vectored(self, int op, buffers, uint64_t offset) except? -1:
        cdef Py_ssize_t n = len(buffers), i, got = 0
        cdef Py_buffer *views = <Py_buffer *>malloc(max(n, 1) * sizeof(Py_buffer))
        cdef iovec *iov = <iovec *>malloc(max(n, 1) * sizeof(iovec))
        cdef uint64_t total = 0
        cdef int want = PyBUF_WRITABLE if op == OP_READ else PyBUF_SIMPLE
        if views == NULL or iov == NULL:
            free(views)
            free(iov)
            raise MemoryError()
        try:
            for i in range(n):
                PyObject_GetBuffer(buffers[i], &views[i], want)
                got += 1
                iov[i].iov_base = views[i].buf
                iov[i].iov_len = views[i].len
                total += views[i].len
            return self._run(op, iov, <int>n, offset, total, 0)
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            free(views)
            free(iov)

    def preadv(self, buffers, offset: int) -> int:
        """Fill ``buffers`` (writable buffers) from ``offset``; bytes read."""
        return self._vectored(OP_READ, buffers, offset)

    def pwritev(self, buffers, offset: int) -> int:
        return self._vectored(OP_WRITE, buffers, offset)

    def flush(self) -> None:
        self._run(OP_FLUSH, NULL, 0, 0, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        if length:
            self._run(OP_DISCARD, NULL, 0, offset, length, 0)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        if length:
            self._run(OP_WRITE_ZEROES, NULL, 0, offset, length, F_MAY_UNMAP if unmap else 0)
