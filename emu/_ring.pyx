# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native ring core: the same SplitRing / PackedRing as ``emu.pyring``, without Python in the loop.

The rules (which error for which guest mistake, and in which order they are checked) are
documented in ``emu.pyring``; this file must match it exactly, which the differential test
checks. What is different here is only how memory is reached:

* The guest's regions are copied into a C table at construction (gpa, size, host pointer,
  dirty map) and every guest address is checked against it in C; the Python objects are
  kept referenced so the mappings outlive the ring. Regions added later are not seen.
* The ring areas are translated once, at construction.
* ``pop`` fills malloc'd scratch arrays and copies them into exactly-sized numpy arrays at
  the end, so a returned Batch is the caller's to keep (it is not overwritten by the next
  pop) and no Python object is created per descriptor.
* Every guest write marks its pages in the region's dirty map, exactly as GuestMemory does.
* Guest memory is shared with the driver: each descriptor is read once into locals, the
  avail index / head flags are read before the entries they publish (acquire), used entries
  are written before the index / head flags that publish them (release), and a full barrier
  separates publishing from reading the driver's suppression fields (store -> load).
  tests/test_ring_order.py reads this file to keep those fences where they are.
* The descriptor budget of ``pop`` counts reads in ``count_desc``, the one place both walks
  call before reading a descriptor.
"""

import os
import sys

import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EINTR, EINVAL, errno
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t
from libc.string cimport strerror
from posix.uio cimport iovec, preadv, pwritev

from emu.ringdefs import (
    MAX_PACKED_SIZE,
    MAX_SPLIT_SIZE,
    AvailIndexError,
    Batch,
    BufferIdError,
    ChainLengthError,
    ChainLoopError,
    DescriptorIndexError,
    DescriptorOrderError,
    IndirectError,
    RingAddressError,
    RingAlignmentError,
    RingState,
)

from emu.memory import GuestMemoryError

cnp.import_array()

#: buffers one preadv / pwritev takes (the kernel's UIO_MAXIOV)
cdef int IOV_MAX = os.sysconf("SC_IOV_MAX")

cdef type _Batch = Batch

if sys.byteorder != "little":
    raise ImportError("emu._ring reads guest memory as little-endian; use EMU_RING=python")

cdef extern from *:
    """
    #include <string.h>
    static inline uint16_t ring_ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline uint32_t ring_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline uint64_t ring_ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
    static inline void ring_st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline void ring_st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
    #define ring_acquire() __atomic_thread_fence(__ATOMIC_ACQUIRE)
    #define ring_release() __atomic_thread_fence(__ATOMIC_RELEASE)
    #define ring_full_barrier() __atomic_thread_fence(__ATOMIC_SEQ_CST)
    """
    uint16_t ring_ld16(const uint8_t *p) noexcept nogil
    uint32_t ring_ld32(const uint8_t *p) noexcept nogil
    uint64_t ring_ld64(const uint8_t *p) noexcept nogil
    void ring_st16(uint8_t *p, uint16_t v) noexcept nogil
    void ring_st32(uint8_t *p, uint32_t v) noexcept nogil
    void ring_acquire() noexcept nogil
    void ring_release() noexcept nogil
    void ring_full_barrier() noexcept nogil

cdef extern from "Python.h":
    object PyType_GenericAlloc(type t, Py_ssize_t nitems)

cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    F_AVAIL = 1 << 7
    F_USED = 1 << 15
    NO_INTERRUPT = 1
    NO_NOTIFY = 1
    EV_ENABLE = 0
    EV_DISABLE = 1
    EV_DESC = 2
    PAGE_SHIFT = 12
    PUSHING = 1 << 31  # temporary mark on nd[head] while a push is being validated

#: held_n of a chain restored in flight whose segments were not given (``remember``)
cdef uint32_t UNKNOWN = 0xFFFFFFFF
cdef uint64_t MAX_CHAIN_LEN = 0xFFFFFFFF  # typed: a bare literal would be compared as a Python int


cdef enum Err:
    E_OK = 0
    E_AVAIL_JUMP  # AvailIndexError
    E_HEAD  # DescriptorIndexError: head >= size
    E_NEXT  # DescriptorIndexError: NEXT index past the table
    E_HEAD_INFLIGHT  # BufferIdError
    E_ID  # BufferIdError: packed id >= size
    E_ID_INFLIGHT  # BufferIdError
    E_LOOP  # ChainLoopError
    E_NESTED  # IndirectError ...
    E_NOT_NEGOTIATED
    E_INDIRECT_NEXT
    E_TABLE_LEN
    E_TABLE_ADDR  # RingAddressError
    E_BUF_ADDR  # RingAddressError
    E_ORDER  # DescriptorOrderError
    E_LENGTH  # ChainLengthError
    E_NOMEM  # MemoryError growing the scratch arrays
    E_BUDGET  # not an error: the pop's descriptor budget ran out inside a later chain


cdef inline bint need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef inline void mark(Area *a, uint64_t at, uint64_t n) noexcept nogil:
    """GuestMemory._mark for a write of n (<= one page) bytes at offset ``at`` of the area."""
    a.dirty[(a.off + at) >> PAGE_SHIFT] = 1
    a.dirty[(a.off + at + n - 1) >> PAGE_SHIFT] = 1


cdef inline int find(_Ring r, uint64_t addr, uint64_t length) noexcept:
    """Index of the region holding [addr, addr+length) entirely, or -1 (GuestMemory.translate)."""
    cdef int k
    cdef uint64_t off
    if length > UINT64_MAX - addr:
        return -1
    for k in range(r.nregions):
        if addr >= r.regions[k].gpa:
            off = addr - r.regions[k].gpa
            if off <= r.regions[k].size and length <= r.regions[k].size - off:
                return k
    return -1


cdef inline int fail(_Ring r, int err, uint64_t a, uint64_t b) noexcept:
    """Record what went wrong for raise_error; returns the error code."""
    r.err_a, r.err_b = a, b
    return err


cdef int raise_error(_Ring r, int err) except -1:
    """Turn a walk's error code into the RingError that pyring raises for the same input."""
    a, b = r.err_a, r.err_b
    if err == E_AVAIL_JUMP:
        raise AvailIndexError(f"avail idx moved by {a} > queue size {r.size}")
    if err == E_HEAD:
        raise DescriptorIndexError(f"head {a} >= queue size {r.size}")
    if err == E_NEXT:
        raise DescriptorIndexError(f"next index {a} >= {b}")
    if err == E_HEAD_INFLIGHT:
        raise BufferIdError(f"head {a} is already in flight")
    if err == E_ID:
        raise BufferIdError(f"buffer id {a} >= queue size {r.size}")
    if err == E_ID_INFLIGHT:
        raise BufferIdError(f"buffer id {a} is already in flight")
    if err == E_LOOP:
        raise ChainLoopError(f"chain has more than {a} descriptors")
    if err == E_NESTED:
        raise IndirectError("indirect descriptor inside an indirect table")
    if err == E_NOT_NEGOTIATED:
        raise IndirectError("INDIRECT_DESC was not negotiated")
    if err == E_INDIRECT_NEXT:
        raise IndirectError("descriptor has both INDIRECT and NEXT")
    if err == E_TABLE_LEN:
        raise IndirectError(f"bad indirect table length {b}")
    if err == E_TABLE_ADDR:
        raise RingAddressError(f"indirect table {a:#x}+{b:#x} outside RAM")
    if err == E_BUF_ADDR:
        raise RingAddressError(f"buffer {a:#x}+{b:#x} is outside guest RAM")
    if err == E_ORDER:
        raise DescriptorOrderError(f"readable buffer {a:#x} after a writable one")
    if err == E_LENGTH:
        raise ChainLengthError("chain is longer than 2^32 - 1 bytes")
    if err == E_NOMEM:
        raise MemoryError()
    raise AssertionError(f"unknown ring error {err}")


cdef inline int add_seg(_Ring r, uint64_t addr, uint32_t length, uint16_t flags) noexcept:
    """Check one buffer (order, bounds, total length) and append it to the scratch arrays."""
    cdef bint w = (flags & F_WRITE) != 0
    if r.c_wrote and not w:
        return fail(r, E_ORDER, addr, 0)
    if find(r, addr, length) < 0:
        return fail(r, E_BUF_ADDR, addr, length)
    r.c_total += length
    if r.c_total > MAX_CHAIN_LEN:
        return fail(r, E_LENGTH, 0, 0)
    if r.nseg == r.cap_segs and r.grow_segs() < 0:
        return E_NOMEM
    r.o_addr[r.nseg] = addr
    r.o_len[r.nseg] = length
    r.o_wr[r.nseg] = w
    r.nseg += 1
    r.c_wrote = r.c_wrote or w
    return E_OK


cdef int check_indirect(
    _Ring r, uint64_t addr, uint32_t length, uint16_t flags, bint nested, const uint8_t **table
) noexcept:
    """Set ``table`` to the host address of a valid indirect table (pyring._check_indirect)."""
    cdef int k
    if nested:
        return fail(r, E_NESTED, 0, 0)
    if not r.indirect:
        return fail(r, E_NOT_NEGOTIATED, 0, 0)
    if flags & F_NEXT:
        return fail(r, E_INDIRECT_NEXT, 0, 0)
    if length == 0 or length % 16 or length // 16 > r.size:
        return fail(r, E_TABLE_LEN, addr, length)
    k = find(r, addr, length)
    if k < 0:
        return fail(r, E_TABLE_ADDR, addr, length)
    table[0] = r.regions[k].data + (addr - r.regions[k].gpa)
    return E_OK


cdef inline bint budget_spent(_Ring r) noexcept:
    """The batch holds a chain and the budget is used up: start or read nothing more."""
    return r.nchains > 0 and r.walked >= r.budget


cdef inline int count_desc(_Ring r) noexcept:
    """One more descriptor is about to be read (pyring _Segments.count)."""
    if budget_spent(r):
        return E_BUDGET
    r.walked += 1
    return E_OK


cdef inline void begin_chain(_Ring r) noexcept:
    r.c_total = 0
    r.c_wrote = False


cdef inline int fetched(_Ring r, uint16_t head, uint32_t ndesc) noexcept:
    """The chain just walked is in flight: in the batch, and held with its segments."""
    cdef uint32_t first = r.o_starts[r.nchains]
    if r.keep(head, first, r.nseg - first) < 0:
        return E_NOMEM
    r.o_heads[r.nchains] = head
    r.nchains += 1
    r.o_starts[r.nchains] = r.nseg
    r.nd[head] = ndesc
    r.seq[head] = r.nfetched
    r.nfetched += 1
    r.ninflight += 1
    return E_OK


cdef cnp.ndarray copy_out(const void *src, cnp.npy_intp n, int typenum, size_t item):
    cdef cnp.ndarray a = cnp.PyArray_EMPTY(1, &n, typenum, 0)
    if n:
        memcpy(cnp.PyArray_DATA(a), src, n * item)
    return a


cdef cnp.ndarray as_1d(object values, int typenum):
    """The caller's array when it already is 1-D contiguous native ``typenum``, else a copy."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(values):
        a = <cnp.ndarray>values
        if (cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_NDIM(a) == 1
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and not cnp.PyArray_ISBYTESWAPPED(a)):
            return a
    a = np.ascontiguousarray(values, cnp.PyArray_DescrFromType(typenum))
    if a.ndim != 1:
        raise ValueError("push takes one-dimensional arrays")
    return a


def split_chains(batch, chain_type):
    """``emu.devices._chain.chains`` in C: for each chain of ``batch`` a ``chain_type`` (a
    tuple subclass) of its head, its readable (gpa, length) pairs and its writable ones,
    in chain order. None when the arrays are not the ones a pop or Batch.from_chains
    makes (the caller then splits in Python)."""
    cdef cnp.ndarray hs = batch.heads, st = batch.chain_start, ad = batch.addr
    cdef cnp.ndarray ln = batch.length, wr = batch.writable
    if not (_plain(hs, cnp.NPY_UINT16) and _plain(st, cnp.NPY_UINT32)
            and _plain(ad, cnp.NPY_UINT64) and _plain(ln, cnp.NPY_UINT32)
            and _plain(wr, cnp.NPY_UINT8)):
        return None
    cdef Py_ssize_t n = cnp.PyArray_DIM(hs, 0), nseg = cnp.PyArray_DIM(ad, 0)
    if (cnp.PyArray_DIM(st, 0) != n + 1 or cnp.PyArray_DIM(ln, 0) != nseg
            or cnp.PyArray_DIM(wr, 0) != nseg):
        return None
    cdef const uint16_t *h = <const uint16_t *>cnp.PyArray_DATA(hs)
    cdef const uint32_t *s = <const uint32_t *>cnp.PyArray_DATA(st)
    cdef const uint64_t *a = <const uint64_t *>cnp.PyArray_DATA(ad)
    cdef const uint32_t *l = <const uint32_t *>cnp.PyArray_DATA(ln)
    cdef const uint8_t *w = <const uint8_t *>cnp.PyArray_DATA(wr)
    cdef Py_ssize_t i, j
    cdef list out = [], readable, writable
    for i in range(n):
        if s[i] > s[i + 1] or s[i + 1] > nseg:
            return None
        readable, writable = [], []
        for j in range(s[i], s[i + 1]):
            (writable if w[j] else readable).append((a[j], l[j]))
        out.append(tuple.__new__(chain_type, (h[i], readable, writable)))
    return out


cdef bint _plain(cnp.ndarray x, int typenum):
    return (cnp.PyArray_TYPE(x) == typenum and cnp.PyArray_NDIM(x) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(x) and not cnp.PyArray_ISBYTESWAPPED(x))


cdef int lists_in(list heads, list lengths, Py_ssize_t n, uint16_t *h, uint32_t *ln) except -1:
    """Copy a push's heads and lengths out of lists of ints: 1, or 0 (the numpy path, as
    before) when an item is not an int. A value out of range is the OverflowError numpy's
    conversion would raise; nothing is taken before every item is checked."""
    cdef Py_ssize_t i
    cdef object x, y
    for i in range(n):
        x, y = heads[i], lengths[i]
        if type(x) is not int or type(y) is not int:
            return 0
        if not 0 <= x <= 0xFFFF:
            raise OverflowError(f"Python integer {x} out of bounds for uint16")
        if not 0 <= y <= 0xFFFFFFFF:
            raise OverflowError(f"Python integer {y} out of bounds for uint32")
        h[i] = x
        ln[i] = y
    return 1


# -- the split ring's hot path --


cdef int split_walk(_Ring r, uint16_t head) noexcept:
    """Follow one chain into the scratch arrays and record it as fetched."""
    cdef const uint8_t *table = r.desc.p
    cdef const uint8_t *d
    cdef uint32_t limit = r.size, i = head, steps = 0, ndesc = 0, length
    cdef uint64_t addr
    cdef uint16_t flags
    cdef bint nested = False
    cdef int err
    begin_chain(r)
    while True:
        steps += 1
        if steps > limit:
            return fail(r, E_LOOP, limit, 0)
        if count_desc(r):
            return E_BUDGET
        d = table + 16 * i
        addr = ring_ld64(d)
        length = ring_ld32(d + 8)
        flags = ring_ld16(d + 12)
        if not nested:
            ndesc += 1
        if flags & F_INDIRECT:
            err = check_indirect(r, addr, length, flags, nested, &table)
            if err:
                return err
            limit, i, steps, nested = length // 16, 0, 0, True
            continue
        err = add_seg(r, addr, length, flags)
        if err:
            return err
        if not flags & F_NEXT:
            return fetched(r, head, ndesc)
        i = ring_ld16(d + 14)
        if i >= limit:
            return fail(r, E_NEXT, i, limit)


cdef inline void drop_partial(_Ring r) noexcept:
    """Forget the segments of a chain cut by the budget (it stays available)."""
    r.nseg = r.o_starts[r.nchains]


cdef int split_pop(_Ring r, Py_ssize_t max_chains) noexcept:
    cdef uint16_t avail, head
    cdef uint32_t k, count
    cdef int err
    avail = ring_ld16(r.drv.p + 2) - r.next_avail
    ring_acquire()
    if avail > r.size:
        return fail(r, E_AVAIL_JUMP, avail, 0)
    count = avail if avail < max_chains else max_chains
    for k in range(count):
        if budget_spent(r):
            break
        head = ring_ld16(r.drv.p + 4 + 2 * (r.next_avail & (r.size - 1)))
        if head >= r.size:
            return fail(r, E_HEAD, head, 0)
        if r.nd[head]:
            return fail(r, E_HEAD_INFLIGHT, head, 0)
        err = split_walk(r, head)
        if err == E_BUDGET:
            drop_partial(r)
            break
        if err:
            return err
        r.next_avail += 1
    return E_OK


# -- the packed ring's hot path --


cdef inline bint packed_avail(_Ring r) noexcept:
    cdef uint16_t flags = ring_ld16(r.desc.p + 16 * r.next_avail + 14)
    return (((flags & F_AVAIL) != 0) == r.avail_wrap
            and ((flags & F_USED) != 0) != r.avail_wrap)


cdef int packed_walk(_Ring r) noexcept:
    """Follow the chain at next_avail through consecutive slots into the scratch arrays."""
    cdef uint32_t slot = r.next_avail, steps = 0, k, length
    cdef bint wrap = r.avail_wrap
    cdef const uint8_t *d
    cdef const uint8_t *t
    cdef uint64_t addr
    cdef uint16_t flags, buf_id, t_flags
    cdef int err
    begin_chain(r)
    while True:
        steps += 1
        if steps > r.size:
            return fail(r, E_LOOP, r.size, 0)
        if count_desc(r):
            return E_BUDGET
        d = r.desc.p + 16 * slot
        addr = ring_ld64(d)
        length = ring_ld32(d + 8)
        buf_id = ring_ld16(d + 12)
        flags = ring_ld16(d + 14)
        if flags & F_INDIRECT:
            err = check_indirect(r, addr, length, flags, False, &t)
            if err:
                return err
            for k in range(length // 16):
                if count_desc(r):
                    return E_BUDGET
                t_flags = ring_ld16(t + 16 * k + 14)
                if t_flags & F_INDIRECT:
                    return fail(r, E_NESTED, 0, 0)
                err = add_seg(r, ring_ld64(t + 16 * k), ring_ld32(t + 16 * k + 8), t_flags)
                if err:
                    return err
        else:
            err = add_seg(r, addr, length, flags)
            if err:
                return err
        slot += 1
        if slot == r.size:
            slot, wrap = 0, not wrap
        if not flags & F_NEXT:
            break
    if buf_id >= r.size:
        return fail(r, E_ID, buf_id, 0)
    if r.nd[buf_id]:
        return fail(r, E_ID_INFLIGHT, buf_id, 0)
    err = fetched(r, buf_id, steps)
    if err:
        return err
    r.next_avail, r.avail_wrap = slot, wrap
    return E_OK


cdef int packed_pop(_Ring r, Py_ssize_t max_chains) noexcept:
    cdef int err
    while r.nchains < max_chains and not budget_spent(r) and packed_avail(r):
        ring_acquire()
        err = packed_walk(r)
        if err == E_BUDGET:
            drop_partial(r)
            break
        if err:
            return err
    return E_OK


cdef class _Ring:
    """Construction, in-flight bookkeeping, scratch output and state for both formats."""

    def __dealloc__(self):
        cdef uint32_t k
        if self.held != NULL:
            for k in range(self.size):
                free(self.held[k])
        free(self.held)
        free(self.held_n)
        free(self.held_cap)
        free(self.regions)
        free(self.nd)
        free(self.seq)
        free(self.p_heads)
        free(self.p_lens)
        free(self.o_heads)
        free(self.o_starts)
        free(self.o_addr)
        free(self.o_len)
        free(self.o_wr)

    cdef _setup(self, mem, size, tuple areas, tuple aligns, tuple lengths, features):
        cdef int k
        for addr, align in zip(areas, aligns):
            if addr % align:
                raise RingAlignmentError(f"ring area {addr:#x} is not {align}-byte aligned")
        regions = list(mem.regions)
        self.regions = <Region *>malloc(max(len(regions), 1) * sizeof(Region))
        if self.regions == NULL:
            raise MemoryError()
        self._keep = [(r.array, r.dirty) for r in regions]
        for k, r in enumerate(regions):
            self.regions[k].gpa = r.gpa
            self.regions[k].size = r.size
            self.regions[k].data = <uint8_t *>cnp.PyArray_DATA(r.array)
            self.regions[k].dirty = <uint8_t *>cnp.PyArray_DATA(r.dirty)
        self.nregions = len(regions)
        cdef Area *dst[3]
        dst[0], dst[1], dst[2] = &self.desc, &self.drv, &self.dev
        for k in range(3):
            addr, length = areas[k], lengths[k]
            if not 0 <= addr < 2**64:
                raise RingAddressError(f"ring area {addr:#x}+{length:#x} outside RAM")
            i = find(self, addr, length)
            if i < 0:
                raise RingAddressError(f"ring area {addr:#x}+{length:#x} outside RAM")
            dst[k].off = addr - self.regions[i].gpa
            dst[k].p = self.regions[i].data + dst[k].off
            dst[k].dirty = self.regions[i].dirty
        self.size = size
        self.indirect = features >> 28 & 1
        self.event_idx = features >> 29 & 1
        self.in_order = features >> 35 & 1
        self.avail_wrap = self.used_wrap = True
        self.nd = <uint32_t *>malloc(self.size * sizeof(uint32_t))
        self.seq = <uint64_t *>malloc(self.size * sizeof(uint64_t))
        self.p_heads = <uint16_t *>malloc(self.size * sizeof(uint16_t))
        self.p_lens = <uint32_t *>malloc(self.size * sizeof(uint32_t))
        self.o_heads = <uint16_t *>malloc(self.size * sizeof(uint16_t))
        self.o_starts = <uint32_t *>malloc((self.size + 1) * sizeof(uint32_t))
        self.cap_segs = max(256, 2 * self.size)
        self.o_addr = <uint64_t *>malloc(self.cap_segs * sizeof(uint64_t))
        self.o_len = <uint32_t *>malloc(self.cap_segs * sizeof(uint32_t))
        self.o_wr = <uint8_t *>malloc(self.cap_segs)
        self.held = <HeldSeg **>calloc(self.size, sizeof(HeldSeg *))
        self.held_n = <uint32_t *>calloc(self.size, sizeof(uint32_t))
        self.held_cap = <uint32_t *>calloc(self.size, sizeof(uint32_t))
        if not (self.nd and self.seq and self.p_heads and self.p_lens and self.o_heads
                and self.o_starts and self.o_addr and self.o_len and self.o_wr
                and self.held and self.held_n and self.held_cap):
            raise MemoryError()
        for k in range(self.size):
            self.nd[k] = 0
        self.o_starts[0] = 0

    cdef int grow_segs(self) noexcept:
        """Double the segment scratch arrays; -1 when out of memory."""
        cdef size_t cap = 2 * self.cap_segs
        cdef void *p = realloc(self.o_addr, cap * sizeof(uint64_t))
        if p == NULL:
            return -1
        self.o_addr = <uint64_t *>p
        p = realloc(self.o_len, cap * sizeof(uint32_t))
        if p == NULL:
            return -1
        self.o_len = <uint32_t *>p
        p = realloc(self.o_wr, cap)
        if p == NULL:
            return -1
        self.o_wr = <uint8_t *>p
        self.cap_segs = cap
        return 0

    cdef int keep(self, uint16_t head, uint32_t first, uint32_t n) noexcept:
        """Hold scratch segments ``first:first+n`` as the chain at ``head``; -1: no memory."""
        cdef HeldSeg *p = self.held[head]
        cdef uint32_t k
        if n > self.held_cap[head]:
            p = <HeldSeg *>realloc(p, n * sizeof(HeldSeg))
            if p == NULL:
                return -1
            self.held[head], self.held_cap[head] = p, n
        for k in range(n):
            p[k].addr = self.o_addr[first + k]
            p[k].length = self.o_len[first + k]
            p[k].writable = self.o_wr[first + k]
        self.held_n[head] = n
        return 0

    def segments(self, uint32_t head):
        """The (gpa, length, writable) segments of the chain in flight at ``head`` as it
        was popped; None when nothing is in flight there, or a restored chain's are not
        known (``remember``)."""
        cdef HeldSeg *p
        cdef uint32_t k
        if head >= self.size or not self.nd[head] or self.held_n[head] == UNKNOWN:
            return None
        p = self.held[head]
        return [(p[k].addr, p[k].length, p[k].writable) for k in range(self.held_n[head])]

    def remember(self, uint32_t head, list segments):
        """The segments of a chain restored in flight (``set_state``) at ``head``."""
        cdef Py_ssize_t k, n = len(segments)
        cdef HeldSeg *p
        if head >= self.size or not self.nd[head]:
            raise ValueError(f"head {head} is not in flight")
        if n >= UNKNOWN:
            raise ValueError(f"chain at head {head} has too many segments")
        # straight into a buffer of its own, not through the pop's scratch (which holds
        # what one pop walks, and may hold fewer than a restored chain has, any length
        # as for emu.pyring); the chain's old segments stay until every item converted
        p = <HeldSeg *>malloc(max(n, 1) * sizeof(HeldSeg))
        if p == NULL:
            raise MemoryError()
        try:
            for k in range(n):  # indexed: the list cannot grow past ``p`` meanwhile
                addr, length, writable = segments[k]
                if not (0 <= addr < 2**64 and 0 <= length < 2**32):
                    raise ValueError(
                        f"chain at head {head}: segment ({addr:#x}, {length:#x}) out of range"
                    )
                p[k].addr, p[k].length, p[k].writable = addr, length, bool(writable)
        except BaseException:
            free(p)
            raise
        free(self.held[head])
        self.held[head], self.held_cap[head], self.held_n[head] = p, <uint32_t>n, <uint32_t>n

    cdef int pop_into(self, Py_ssize_t max_chains) noexcept:
        """The format's pop into the scratch arrays: an error code (Err)."""
        return E_OK

    def pop(self, Py_ssize_t max_chains, max_descs=None):
        self.begin_pop(max_descs)
        self.fill(max_chains)
        return self.batch()

    cdef int pop_c(self, Py_ssize_t max_chains, uint64_t max_descs) except -1:
        self.budget = max_descs
        return self.fill(max_chains)

    cdef int fill(self, Py_ssize_t max_chains) except -1:
        """Empty scratch, then this pop's chains into it (the budget is set)."""
        cdef int err
        self.nchains = self.nseg = 0
        self.walked = 0
        if max_chains > 0:
            err = self.pop_into(max_chains)
            if err:
                raise_error(self, err)
        return 0

    cdef bint push_c(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1:
        if n == 0:
            return False
        self.take(h, n)
        return self.publish(h, ln, n)

    def push(self, heads, lengths):
        """Mark chains used in this order and publish them; True: notify the driver.

        Lists of ints (what a device serving chains one by one builds) are read directly;
        anything else goes through numpy, as do lists holding anything but ints."""
        cdef Py_ssize_t k
        if type(heads) is list and type(lengths) is list:
            k = len(<list>heads)
            if len(<list>lengths) != k:
                raise ValueError("heads and lengths differ in length")
            if k <= self.size and lists_in(heads, lengths, k, self.p_heads, self.p_lens):
                if k == 0:
                    return False
                self.take(self.p_heads, k)
                return self.publish(self.p_heads, self.p_lens, k)
        cdef cnp.ndarray ha = as_1d(heads, cnp.NPY_UINT16)
        cdef cnp.ndarray la = as_1d(lengths, cnp.NPY_UINT32)
        cdef Py_ssize_t n = cnp.PyArray_DIM(ha, 0)
        cdef const uint16_t *h = <const uint16_t *>cnp.PyArray_DATA(ha)
        if cnp.PyArray_DIM(la, 0) != n:
            raise ValueError("heads and lengths differ in length")
        if n == 0:
            return False
        self.take(h, n)
        return self.publish(h, <const uint32_t *>cnp.PyArray_DATA(la), n)

    cdef bint publish(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1:
        """Write the used entries of chains already taken out of flight (per format)."""
        raise NotImplementedError

    cdef object batch(self):
        """Copy this pop's scratch into a Batch the caller owns."""
        b = PyType_GenericAlloc(_Batch, 0)  # Batch.__new__ without the attribute lookups
        b.heads = copy_out(self.o_heads, self.nchains, cnp.NPY_UINT16, 2)
        b.chain_start = copy_out(self.o_starts, self.nchains + 1, cnp.NPY_UINT32, 4)
        b.addr = copy_out(self.o_addr, self.nseg, cnp.NPY_UINT64, 8)
        b.length = copy_out(self.o_len, self.nseg, cnp.NPY_UINT32, 4)
        b.writable = copy_out(self.o_wr, self.nseg, cnp.NPY_UINT8, 1)
        b.walked = self.walked
        return b

    cdef int begin_pop(self, object max_descs) except -1:
        """The budget of this pop (pyring._budget)."""
        if max_descs is None:
            self.budget = UINT64_MAX
        elif max_descs < 0:
            raise ValueError(f"max_descs {max_descs} is negative")
        else:
            self.budget = min(max_descs, UINT64_MAX)
        return 0

    cdef int take(self, const uint16_t *h, Py_ssize_t n) except -1:
        """Validate a push (all heads in flight, once, in order with IN_ORDER) before writing."""
        cdef Py_ssize_t i, j
        cdef uint16_t x
        cdef uint64_t first = self.nfetched - self.ninflight
        for i in range(n):
            x = h[i]
            if (x >= self.size or self.nd[x] == 0 or self.nd[x] & PUSHING
                    or (self.in_order and self.seq[x] != first + <uint64_t>i)):
                for j in range(i):
                    self.nd[h[j]] &= ~PUSHING
                if self.in_order:
                    raise ValueError("IN_ORDER: chains must be pushed in fetch order")
                raise ValueError("pushing a head that is not in flight")
            self.nd[x] |= PUSHING
        return 0

    cdef uint32_t release(self, uint16_t head) noexcept:
        cdef uint32_t n = self.nd[head] & ~PUSHING
        self.nd[head] = 0
        self.ninflight -= 1
        return n

    def gather(self, list segments, Py_ssize_t limit):
        """The bytes of ``segments`` ((gpa, length) pairs: a popped chain's readable
        buffers) joined, and their count; (None, count) when that is over ``limit``,
        nothing read. GuestMemoryError for a segment outside the guest's RAM.

        For a device that reads a small request whole: one C copy instead of a Python
        read per buffer (pyring's ``gather`` is the reference)."""
        cdef Py_ssize_t i, n = len(segments)
        cdef uint64_t total = 0, gpa, length
        cdef char *p
        for i in range(n):
            total += <uint64_t>segments[i][1]
        if total > <uint64_t>limit:
            return None, total
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        for i in range(n):
            gpa, length = segments[i]
            if length:
                memcpy(p, self.host(gpa, length, False), length)
                p += length
        return out, total

    def scatter(self, list segments, bytes data):
        """``data`` into ``segments`` ((gpa, length) pairs: a popped chain's writable
        buffers) front to back, marking the pages written dirty as GuestMemory.write does;
        ValueError (nothing written) when they hold less. pyring's is the reference."""
        cdef Py_ssize_t i, n = len(segments)
        cdef uint64_t size = len(data), room = 0, off = 0, gpa, length
        cdef const char *src = PyBytes_AS_STRING(data)
        for i in range(n):
            room += <uint64_t>segments[i][1]
        if size > room:
            raise ValueError(f"{size} bytes for {room} of room")
        for i in range(n):
            if off >= size:
                break
            gpa, length = segments[i]
            length = min(length, size - off)
            if length:
                memcpy(self.host(gpa, length, True), src + off, length)
                off += length

    def readv(self, int fd, list segments, uint64_t start, uint64_t limit, int64_t offset):
        """preadv(2) from ``fd`` at ``offset`` straight into ``segments`` ((gpa, length)
        pairs: a chain's writable buffers) from their byte ``start`` on, at most ``limit``
        bytes and IOV_MAX buffers (a shorter read is the answer); the count read. The
        pages it may write are marked dirty first, as GuestMemory.view(write=True) does;
        OSError as os.preadv raises it, EINVAL for a negative offset. pyring's ``readv`` is
        the reference."""
        cdef int count
        cdef ssize_t n
        if offset < 0:  # (os.preadv would take -1 as "the file position": refused here)
            raise OSError(EINVAL, strerror(EINVAL))
        cdef iovec *iov = self.iovecs(segments, start, limit, IOV_MAX, True, &count)
        try:
            if count == 0:
                return 0
            with nogil:
                n = preadv(fd, iov, count, offset)
                while n < 0 and errno == EINTR:
                    n = preadv(fd, iov, count, offset)
            if n < 0:
                raise OSError(errno, strerror(errno))
            return n
        finally:
            free(iov)

    def writev(self, int fd, list segments, uint64_t start, uint64_t size, int64_t offset):
        """pwritev(2) of ``size`` bytes of ``segments`` ((gpa, length) pairs: a chain's
        readable buffers) from their byte ``start`` on to ``fd`` at ``offset``, IOV_MAX
        buffers a call, until done or a short write; the count written. OSError as
        os.pwritev raises it, EINVAL for a negative offset. pyring's ``writev`` is the
        reference."""
        cdef int count, k = 0, part, i
        cdef ssize_t n
        cdef uint64_t done = 0, want
        if offset < 0:
            raise OSError(EINVAL, strerror(EINVAL))
        cdef iovec *iov = self.iovecs(segments, start, size, INT_MAX, False, &count)
        try:
            while k < count:
                part = min(count - k, IOV_MAX)
                want = 0
                for i in range(k, k + part):
                    want += iov[i].iov_len
                with nogil:
                    n = pwritev(fd, iov + k, part, offset + done)
                    while n < 0 and errno == EINTR:
                        n = pwritev(fd, iov + k, part, offset + done)
                if n < 0:
                    raise OSError(errno, strerror(errno))
                done += n
                if <uint64_t>n < want:
                    break
                k += part
            return done
        finally:
            free(iov)

    cdef uint8_t *host(self, uint64_t gpa, uint64_t length, bint dirty) except NULL:
        """Where ``length`` (> 0) bytes of guest RAM at ``gpa`` are in this process;
        ``dirty``: mark their pages, as GuestMemory.write does. GuestMemoryError when they
        are not all inside one region of RAM."""
        cdef uint64_t at, page
        cdef Region *r
        cdef int k = find(self, gpa, length)
        if k < 0:
            raise GuestMemoryError(f"access gpa {gpa:#x} len {length:#x} is outside guest RAM")
        r = &self.regions[k]
        at = gpa - r.gpa
        if dirty:
            for page in range(at >> PAGE_SHIFT, ((at + length - 1) >> PAGE_SHIFT) + 1):
                r.dirty[page] = 1
        return r.data + at

    cdef iovec *iovecs(self, list segments, uint64_t start, uint64_t n, int most,
                       bint dirty, int *count) except? NULL:
        """Host iovecs for ``n`` bytes of ``segments`` from byte ``start`` on (fewer when
        the segments hold fewer), at most ``most`` of them; ``dirty``: mark their pages.
        The caller frees the array; GuestMemoryError for a segment outside RAM."""
        cdef Py_ssize_t i
        cdef uint64_t gpa, length
        cdef iovec *iov = <iovec *>malloc(max(len(segments), 1) * sizeof(iovec))
        if iov == NULL:
            raise MemoryError()
        count[0] = 0
        try:
            for i in range(len(segments)):
                if n == 0 or count[0] == most:
                    break
                gpa, length = segments[i]
                if start >= length:
                    start -= length
                    continue
                gpa += start
                length = min(length - start, n)
                start = 0
                iov[count[0]].iov_base = self.host(gpa, length, dirty)
                iov[count[0]].iov_len = length
                count[0] += 1
                n -= length
        except BaseException:
            free(iov)
            raise
        return iov

    def inflight(self):
        return [h for h, _ in self._inflight_pairs()]

    cdef list _inflight_pairs(self):
        cdef uint32_t h
        found = [(self.seq[h], h, self.nd[h]) for h in range(self.size) if self.nd[h]]
        found.sort()
        return [(h, n) for _, h, n in found]

    def state(self):
        return RingState(
            self.next_avail,
            self.next_used,
            self.avail_wrap,
            self.used_wrap,
            self.signalled_used,
            self._inflight_pairs(),
        )

    cdef object _index_limit(self):
        return 1 << 16

    def set_state(self, state):
        """Restore device-private state (migration); refuses values that cannot be real."""
        cdef uint32_t k
        limit = self._index_limit()
        for v in (state.next_avail, state.next_used, state.signalled_used):
            if not 0 <= v < limit:
                raise ValueError(f"ring index {v} out of range")
        heads = [h for h, _ in state.inflight]
        if len(set(heads)) != len(heads):
            raise ValueError("duplicate in-flight head")
        for h, n in state.inflight:
            if not (0 <= h < self.size and 1 <= n <= self.size):
                raise ValueError(f"bad in-flight entry ({h}, {n})")
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self.avail_wrap, self.used_wrap = bool(state.avail_wrap), bool(state.used_wrap)
        self.signalled_used = state.signalled_used
        for k in range(self.size):
            self.nd[k] = 0
        for k, (h, n) in enumerate(state.inflight):
            self.nd[h] = n
            self.seq[h] = k
            self.held_n[h] = UNKNOWN
        self.nfetched = self.ninflight = len(state.inflight)


cdef class SplitRing(_Ring):
    """Split virtqueue: descriptor table, avail ring (driver area), used ring (device area)."""

    def __init__(self, mem, size, desc, driver, device, features):
        if not (1 <= size <= MAX_SPLIT_SIZE and size & (size - 1) == 0):
            raise RingAlignmentError(f"invalid queue size {size}")
        self._setup(mem, size, (desc, driver, device), (16, 2, 4),
                    (16 * size, 6 + 2 * size, 6 + 8 * size), features)

    def pending(self):
        return ring_ld16(self.drv.p + 2) != self.next_avail

    cdef int pop_into(self, Py_ssize_t max_chains) noexcept:
        return split_pop(self, max_chains)

    cdef bint publish(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        cdef uint32_t slot, mask = self.size - 1
        cdef uint16_t old
        for i in range(n):
            self.release(h[i])
            slot = 4 + 8 * (self.next_used & mask)
            ring_st32(self.dev.p + slot, h[i])
            ring_st32(self.dev.p + slot + 4, ln[i])
            mark(&self.dev, slot, 8)
            self.next_used += 1
        ring_release()
        ring_st16(self.dev.p + 2, self.next_used)
        mark(&self.dev, 2, 2)
        ring_full_barrier()
        old, self.signalled_used = self.signalled_used, self.next_used
        if self.event_idx:
            return need_event(ring_ld16(self.drv.p + 4 + 2 * self.size), self.next_used, old)
        return not ring_ld16(self.drv.p) & NO_INTERRUPT

    def set_notify(self, bint enabled):
        cdef uint32_t at
        if self.event_idx:
            if enabled:
                at = 4 + 8 * self.size
                ring_st16(self.dev.p + at, self.next_avail)
                mark(&self.dev, at, 2)
        else:
            ring_st16(self.dev.p, 0 if enabled else NO_NOTIFY)
            mark(&self.dev, 0, 2)
        ring_full_barrier()
        return self.pending()


cdef class PackedRing(_Ring):
    """Packed virtqueue: one descriptor ring plus driver and device event suppression areas."""

    def __init__(self, mem, size, desc, driver, device, features):
        if not 1 <= size <= MAX_PACKED_SIZE:
            raise RingAlignmentError(f"invalid queue size {size}")
        self._setup(mem, size, (desc, driver, device), (16, 4, 4), (16 * size, 4, 4), features)

    cdef object _index_limit(self):
        return self.size

    def pending(self):
        return packed_avail(self)

    cdef int pop_into(self, Py_ssize_t max_chains) noexcept:
        return packed_pop(self, max_chains)

    cdef bint publish(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        cdef uint32_t at, first_at = 0, used = self.next_used
        cdef uint16_t flags, first_flags = 0
        for i in range(n):
            at = 16 * used
            flags = (F_AVAIL | F_USED if self.used_wrap else 0) | (F_WRITE if ln[i] else 0)
            ring_st32(self.desc.p + at + 8, ln[i])
            ring_st16(self.desc.p + at + 12, h[i])
            mark(&self.desc, at + 8, 6)
            if i == 0:
                first_at, first_flags = at, flags
            else:
                ring_st16(self.desc.p + at + 14, flags)
                mark(&self.desc, at + 14, 2)
            used += self.release(h[i])
            if used >= self.size:
                used -= self.size
                self.used_wrap = not self.used_wrap
        self.next_used = used
        ring_release()
        ring_st16(self.desc.p + first_at + 14, first_flags)  # publishes the whole batch
        mark(&self.desc, first_at + 14, 2)
        ring_full_barrier()
        return self.should_notify()

    cdef bint should_notify(self) noexcept:
        """Driver event suppression, as Linux's virtqueue_kick_prepare_packed mirrored."""
        cdef uint16_t new = self.next_used, off_wrap, flags, event
        cdef uint16_t advanced = (new + self.size - self.signalled_used) % self.size
        if advanced == 0:
            advanced = self.size
        self.signalled_used = new
        flags = ring_ld16(self.drv.p + 2) & 3
        if flags == EV_DISABLE:
            return False
        if flags != EV_DESC or not self.event_idx:
            return True  # ENABLE, or a mode we cannot honour: a spurious interrupt is safe
        off_wrap = ring_ld16(self.drv.p)
        event = off_wrap & 0x7FFF
        if ((off_wrap >> 15) != 0) != self.used_wrap:
            event -= self.size  # the driver's event offset is still in the previous lap
        return need_event(event, new, new - advanced)

    def set_notify(self, bint enabled):
        if not enabled:
            ring_st16(self.dev.p + 2, EV_DISABLE)
            mark(&self.dev, 2, 2)
        elif self.event_idx:
            ring_st16(self.dev.p, self.next_avail | (<uint16_t>self.avail_wrap << 15))
            mark(&self.dev, 0, 2)
            ring_st16(self.dev.p + 2, EV_DESC)
            mark(&self.dev, 2, 2)
        else:
            ring_st16(self.dev.p + 2, EV_ENABLE)
            mark(&self.dev, 2, 2)
        ring_full_barrier()
        return packed_avail(self)


# -- the vhost-user dirty log (emu.vhost_user.dirty_log) --
#
# One bit per 4 KiB guest-physical page, shared with the frontend (which takes bits with an
# atomic exchange of 64-bit words, QEMU's sync) and with every other backend of the same
# frontend (QEMU gives all its vhost-user devices one log): bits are set with atomic ORs,
# never a read-modify-write that could drop a bit someone else set in the same byte.

cdef extern from *:
    """
    static inline void log_set_page(uint8_t *log, uint64_t page) {
        __atomic_fetch_or(log + (page >> 3), (uint8_t)(1u << (page & 7)), __ATOMIC_RELEASE);
    }
    static inline uint8_t log_take_byte(uint8_t *p) { return __atomic_exchange_n(p, 0, __ATOMIC_ACQUIRE); }
    static const uint8_t log_zeros[1024];
    static inline int log_block_clear(const uint8_t *p) { return memcmp(p, log_zeros, 1024) == 0; }
    """
    void log_set_page(uint8_t *log, uint64_t page) noexcept nogil
    uint8_t log_take_byte(uint8_t *p) noexcept nogil
    int log_block_clear(const uint8_t *p) noexcept nogil


def log_marks(uint8_t[::1] marks, uint8_t[::1] log, uint64_t gpa):
    """Set in ``log`` the pages of every marked entry of a region's dirty map (entry i:
    bytes [i*4 KiB, (i+1)*4 KiB) of the region at ``gpa``), then clear those marks.

    A mark is cleared only after its bit is set, and the data it stands for landed before
    the mark is looked at (the caller's writes are done), so a frontend that copies the
    page after seeing the bit copies the new data. Marks whose pages lie beyond the log
    stay marked; returns how many.
    """
    cdef Py_ssize_t n = marks.shape[0], i = 0, beyond = 0
    cdef uint64_t limit = <uint64_t>log.shape[0] * 8, first, last
    if n == 0:
        return 0
    with nogil:
        while i < n:
            if i & 1023 == 0 and i + 1024 <= n and log_block_clear(&marks[i]):
                i += 1024  # 4 MiB of guest RAM unmarked (memcmp is vectorised)
                continue
            if i & 7 == 0 and i + 8 <= n and ring_ld64(&marks[i]) == 0:
                i += 8
                continue
            if marks[i]:
                first = (gpa + (<uint64_t>i << PAGE_SHIFT)) >> PAGE_SHIFT
                last = (gpa + (<uint64_t>i << PAGE_SHIFT) + 4095) >> PAGE_SHIFT
                if last < limit:
                    log_set_page(&log[0], first)
                    if last != first:
                        log_set_page(&log[0], last)
                    marks[i] = 0
                else:
                    beyond += 1
            i += 1
    return beyond


def log_range(uint8_t[::1] log, uint64_t gpa, uint64_t length):
    """Set the pages of [gpa, gpa + length) in ``log``; returns how many lie beyond it."""
    cdef uint64_t limit = <uint64_t>log.shape[0] * 8, page, beyond = 0
    if length == 0:
        return 0
    for page in range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1):
        if page < limit:
            log_set_page(&log[0], page)
        else:
            beyond += 1
    return beyond


def log_take(uint8_t[::1] log):
    """A frontend's sync: the pages whose bits are set, each bit taken (cleared) atomically
    so that a bit a backend sets meanwhile is kept for the next take."""
    cdef Py_ssize_t n = log.shape[0], i
    cdef uint8_t b
    cdef int k
    pages = []
    for i in range(n):
        if log[i] == 0:
            continue
        b = log_take_byte(&log[i])
        for k in range(8):
            if b >> k & 1:
                pages.append((i << 3) + k)
    return np.array(pages, dtype=np.uint64)
