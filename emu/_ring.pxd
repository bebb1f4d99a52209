# cython: language_level=3
"""emu._ring's ring class as other native modules see it: the blk data plane pops into
the ring's scratch arrays and pushes from its own, with no Python object per pass."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

cdef struct Region:
    uint64_t gpa
    uint64_t size
    uint8_t *data
    uint8_t *dirty

cdef struct Area:
    uint8_t *p  # host address of the ring area
    uint8_t *dirty  # dirty map of its region
    uint64_t off  # offset of the area inside its region

cdef struct HeldSeg:  # one segment of a chain in flight, as it was popped
    uint64_t addr
    uint32_t length
    uint8_t writable


cdef class _Ring:
    cdef Region *regions
    cdef int nregions
    cdef object _keep  # the region arrays: keeps the mappings alive while we hold pointers
    cdef Area desc, drv, dev
    cdef uint32_t size
    cdef bint indirect, event_idx, in_order
    cdef uint16_t next_avail, next_used, signalled_used
    cdef bint avail_wrap, used_wrap
    # in flight: nd[head] = descriptors it took (0 = not in flight), seq[head] = fetch number
    cdef uint32_t *nd
    cdef uint64_t *seq
    cdef uint64_t nfetched
    cdef uint32_t ninflight
    # and the segments of each chain in flight: held_n[head] of them at held[head]
    # (UNKNOWN: restored in flight, segments not given yet)
    cdef HeldSeg **held
    cdef uint32_t *held_n
    cdef uint32_t *held_cap
    # a push given as Python lists, copied out of them (no numpy conversion)
    cdef uint16_t *p_heads
    cdef uint32_t *p_lens
    # scratch output of one pop
    cdef uint16_t *o_heads
    cdef uint32_t *o_starts
    cdef uint64_t *o_addr
    cdef uint32_t *o_len
    cdef uint8_t *o_wr
    cdef size_t cap_segs
    cdef uint32_t nchains, nseg
    # descriptors read by this pop, and how many it may read once it holds a chain
    cdef uint64_t walked, budget
    # the chain being walked, and what the last error was about
    cdef uint64_t c_total
    cdef bint c_wrote
    cdef uint64_t err_a, err_b

    cdef _setup(self, mem, size, tuple areas, tuple aligns, tuple lengths, features)
    cdef int grow_segs(self) noexcept
    cdef int keep(self, uint16_t head, uint32_t first, uint32_t n) noexcept
    cdef int pop_into(self, Py_ssize_t max_chains) noexcept
    # pop without a Batch: the chains are in the scratch arrays (o_*, nchains, walked)
    cdef int pop_c(self, Py_ssize_t max_chains, uint64_t max_descs) except -1
    cdef int fill(self, Py_ssize_t max_chains) except -1
    # push without arrays; True: notify the driver
    cdef bint push_c(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1
    cdef bint publish(self, const uint16_t *h, const uint32_t *ln, Py_ssize_t n) except -1
    cdef object batch(self)
    cdef int begin_pop(self, object max_descs) except -1
    cdef int take(self, const uint16_t *h, Py_ssize_t n) except -1
    cdef uint32_t release(self, uint16_t head) noexcept
    cdef uint8_t *host(self, uint64_t gpa, uint64_t length, bint dirty) except NULL
    cdef iovec *iovecs(self, list segments, uint64_t start, uint64_t n, int most,
                       bint dirty, int *count) except? NULL
    cdef list _inflight_pairs(self)
    cdef object _index_limit(self)
