# cython: language_level=3, boundscheck=False, wraparound=False
"""The request path's writes to one split queue's inflight area, in C.

emu.vhost_user.inflight.SplitInflight documents the layout and the order of the writes;
this does them for a batch of heads with a few stores each instead of a dozen Python
calls (at a queue depth of one, on every request). Every head is checked against
``desc_num`` before anything of the batch is written.
"""

cimport numpy as cnp
from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from emu.memory import GuestMemoryError

cnp.import_array()

cdef enum:
    HEAD_BYTES = 16  # u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx
    DESC_BYTES = 16  # u8 inflight, u8 pad[5], u16 next, u64 counter
    LAST_BATCH_HEAD = 12
    USED_IDX = 14
    NEXT = 6
    COUNTER = 8


cdef class SplitArea:
    """One queue's area, held as a pointer for as long as the object lives (``close``
    gives the buffer back, so the mapping can be closed)."""

    cdef Py_buffer buf
    cdef bint held
    cdef uint8_t *p
    cdef readonly Py_ssize_t desc_num
    #: the next fetch's counter
    cdef public uint64_t counter

    def __cinit__(self, area, Py_ssize_t desc_num):
        PyObject_GetBuffer(area, &self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        self.held = True
        if self.buf.len < HEAD_BYTES + DESC_BYTES * desc_num:
            self.close()
            raise ValueError(f"inflight area of {self.buf.len} bytes, {desc_num} heads need more")
        self.p = <uint8_t *>self.buf.buf
        self.desc_num = desc_num

    def __dealloc__(self):
        self.close()

    def close(self) -> None:
        if self.held:
            self.held = False
            PyBuffer_Release(&self.buf)

    cdef const uint16_t *heads(self, cnp.ndarray a) except NULL:
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(a, 0)
        cdef const uint16_t *h = <const uint16_t *>cnp.PyArray_DATA(a)
        if not self.held:
            raise ValueError("inflight area closed")
        for i in range(n):
            if h[i] >= self.desc_num:
                raise GuestMemoryError(f"inflight head {h[i]} >= desc_num {self.desc_num}")
        return h

    def fetched(self, heads) -> None:
        """Each head's counter, then its inflight flag."""
        cdef cnp.ndarray a = as_u16(heads)
        cdef const uint16_t *h = self.heads(a)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(a, 0)
        cdef uint64_t counter = self.counter
        for i in range(n):
            memcpy(self.p + HEAD_BYTES + DESC_BYTES * h[i] + COUNTER, &counter, 8)
            counter += 1
        for i in range(n):  # after the counters
            self.p[HEAD_BYTES + DESC_BYTES * h[i]] = 1
        self.counter = counter

    def using(self, heads) -> None:
        """Link the batch (each head's ``next`` is the one before it, the first's itself)
        and make its last head ``last_batch_head``: before the used entries go out."""
        cdef cnp.ndarray a = as_u16(heads)
        cdef const uint16_t *h = self.heads(a)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(a, 0)
        cdef uint16_t prev
        if n == 0:
            return
        prev = h[0]
        for i in range(n):
            memcpy(self.p + HEAD_BYTES + DESC_BYTES * h[i] + NEXT, &prev, 2)
            prev = h[i]
        memcpy(self.p + LAST_BATCH_HEAD, &prev, 2)

    def used(self, heads) -> None:
        """Clear the heads' inflight flags and advance ``used_idx``: after they went out."""
        cdef cnp.ndarray a = as_u16(heads)
        cdef const uint16_t *h = self.heads(a)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(a, 0)
        cdef uint16_t used_idx
        for i in range(n):
            self.p[HEAD_BYTES + DESC_BYTES * h[i]] = 0
        memcpy(&used_idx, self.p + USED_IDX, 2)
        used_idx = <uint16_t>(used_idx + n)
        memcpy(self.p + USED_IDX, &used_idx, 2)


cdef cnp.ndarray as_u16(object heads):
    """``heads`` as a 1-D contiguous uint16 array (itself when it already is one)."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(heads):
        a = <cnp.ndarray>heads
        if (cnp.PyArray_TYPE(a) == cnp.NPY_UINT16 and cnp.PyArray_NDIM(a) == 1
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and not cnp.PyArray_ISBYTESWAPPED(a)):
            return a
    values = np.asarray(heads)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise GuestMemoryError(f"inflight head {int(values.max())} out of range")
    return np.ascontiguousarray(values, np.uint16).reshape(-1)
