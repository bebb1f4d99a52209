# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native blk data plane: one ``BlkPlane`` per queue, serving popped batches in C.

It does what emu.devices.blk's Python path does (that file is the readable reference and
documents the rules), with the same guest-visible answers, but without the GIL and
without a Python object per request, and with the I/O outstanding at an asynchronous
engine (emu.backends.engine) instead of one syscall at a time:

* ``serve`` cuts every chain of a batch (header / data / status byte), validates it and
  translates its buffers to host pointers through a C copy of the guest regions; a
  chain the device cannot answer (no writable byte, readable after writable) raises
  DeviceError before anything of the batch runs. Then each request is answered at once
  (IOERR, UNSUPP, GET_ID) or submitted to the engine, and the engine is kicked once.
* A request's state lives in the slot of its head (heads are unique among a queue's
  chains in flight), which the engine's tag names. Discard / write-zeroes segments run
  one after another, as the Python path runs them, and stop at the first error.
* Completions (``take_due``) write the status byte, mark the dirty pages of every byte
  the device wrote into guest memory (read data, GET_ID, status) exactly as GuestMemory
  does, and come out as (heads, lengths) arrays for the queue to publish.
* Writethrough: writes carry F_FUA, a discard / write-zeroes ends with a flush.
* A full engine (-EAGAIN): the rest waits in a backlog submitted as completions free
  room, and ``room`` tells the device to pop nothing more; when the backlog empties the
  queue's kick eventfd is written so the device serves it again.

This class is the queue's ``deferred`` (emu.queue.Deferred): a drain stop waits
(``take_all``), a report stop cancels the reads at the engine (they must not land in
guest memory after STOPPED) and discards every later completion, and ``count`` keeps the
device STOPPING until the writes already handed to the engine are done (the fence).

The region table is taken from ``mem.regions`` when the queue's ring is a different
object than last time (a restart, a vhost-user memory table change); the old regions'
arrays are kept referenced until nothing submitted can point into them.
"""

import logging
import os

import numpy as np

cimport numpy as cnp
from libc.errno cimport EAGAIN, ENOTCONN
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.uio cimport iovec

from emu.backends.engine cimport (
    Done,
    Engine,
    F_FUA,
    F_MAY_UNMAP,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    OP_WRITE_ZEROES,
)

from emu.devices.base import DeviceError
from emu.memory import GuestMemoryError
from emu._ring cimport _Ring
from emu.queue import CLOSED, OPEN

cnp.import_array()

log = logging.getLogger("emu.devices.blk")

# request types, statuses and limits: as emu.devices.blk (tests check they agree)
cdef enum:
    T_IN = 0
    T_OUT = 1
    T_FLUSH = 4
    T_GET_ID = 8
    T_DISCARD = 11
    T_WRITE_ZEROES = 13
    S_OK = 0
    S_IOERR = 1
    S_UNSUPP = 2
    SECTOR = 512
    HEADER_BYTES = 16
    DWZ_BYTES = 16
    MAX_DWZ_SEGMENTS = 16
    ID_BYTES = 20
    PAGE_SHIFT = 12

cdef uint64_t MAX_DWZ_SECTORS = 0x3FFFFF
#: chains popped at once (blk.BATCH)
cdef Py_ssize_t BATCH = 64

#: ``mode`` bits the device sets before each pass
MODE_WRITETHROUGH = 1
MODE_DISCARD = 2
MODE_WRITE_ZEROES = 4

cdef enum:
    M_WRITETHROUGH = 1
    M_DISCARD = 2
    M_WRITE_ZEROES = 4

# what parsing a batch can run into (before anything of it runs)
cdef enum ParseErr:
    P_OK = 0
    P_ORDER  # readable descriptor after a writable one
    P_NO_STATUS  # no device-writable byte
    P_MEMORY  # a buffer outside guest RAM
    P_NOMEM
    P_BUSY  # a head already in flight, or beyond the queue (a ring core bug)


cdef struct Region:
    uint64_t gpa
    uint64_t size
    uint8_t *data
    uint8_t *dirty

cdef struct Seg:  # where an iovec's bytes are in guest RAM, for the dirty map
    uint8_t *dirty
    uint64_t off

cdef struct Sub:  # one engine request of a slot
    uint64_t offset
    uint64_t length
    uint8_t op
    uint8_t flags

cdef struct Slot:
    bint busy  # popped, not answered
    bint queued  # in the backlog
    bint pending  # a Sub at the engine
    bint getid  # answered at once with the serial
    uint8_t status
    uint8_t nsub
    uint8_t next_sub
    uint32_t written  # data bytes written to the guest: the used length is this + 1
    uint64_t expect  # bytes a read or write must move
    uint8_t *status_p
    uint8_t *status_dirty
    uint64_t status_off
    iovec *iov
    Seg *seg
    uint32_t niov
    uint32_t cap
    Sub one
    Sub *dwz  # discard / write-zeroes: malloc'd, up to 17 (segments, then a flush)


cdef inline void mark(uint8_t *dirty, uint64_t off, uint64_t length) noexcept nogil:
    """GuestMemory._mark: every page the bytes [off, off + length) touch."""
    if length:
        memset(dirty + (off >> PAGE_SHIFT), 1,
               ((off + length - 1) >> PAGE_SHIFT) - (off >> PAGE_SHIFT) + 1)


cdef cnp.ndarray as_c(object values, int typenum):
    """The batch's own array when it is already 1-D contiguous ``typenum`` (what both ring
    cores return), else a converted copy: no numpy call per batch on the hot path."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(values):
        a = <cnp.ndarray>values
        if (cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_NDIM(a) == 1
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and not cnp.PyArray_ISBYTESWAPPED(a)):
            return a
    return np.ascontiguousarray(values, cnp.PyArray_DescrFromType(typenum)).reshape(-1)


cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t ld64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef class BlkPlane:
    """One queue's native serve loop and its completions (see the module docstring)."""

    cdef Engine engine
    cdef object q
    cdef object _ring
    cdef list _keep
    cdef list _old_keep
    cdef Region *regions
    cdef int nregions
    cdef Slot *slots
    cdef unsigned nslots
    cdef uint16_t *out_heads
    cdef uint32_t *out_lens
    cdef unsigned n_out
    cdef uint16_t *backlog
    cdef unsigned bl_head, bl_n
    cdef Done *dones
    cdef readonly uint64_t capacity  # 512-byte sectors
    cdef readonly uint32_t block_size
    cdef readonly uint32_t seg_max
    cdef readonly bint readonly
    cdef uint8_t serial[ID_BYTES]
    cdef public int mode
    cdef bint cancelled
    cdef unsigned uncertain  # writes answered -ENOTCONN after a cancel (take_uncertain)
    cdef bint starved
    # I/O errors since the last report (logged with the GIL)
    cdef uint64_t nerr
    cdef int64_t err_res
    cdef int err_op
    cdef uint64_t err_off
    # where a batch failed to parse
    cdef uint64_t bad_gpa, bad_len

    def __cinit__(self):
        self.regions = NULL
        self.slots = NULL

    def __init__(self, q, Engine engine, *, uint64_t capacity, uint32_t block_size,
                 uint32_t seg_max, bint readonly, bytes serial):
        cdef unsigned i
        self.q = q
        self.engine = engine
        self.capacity = capacity
        self.block_size = block_size
        self.seg_max = seg_max
        self.readonly = readonly
        self.set_serial(serial)
        self._keep = []
        self._old_keep = []
        self.nslots = q.max_size
        self.slots = <Slot *>malloc(self.nslots * sizeof(Slot))
        self.out_heads = <uint16_t *>malloc(self.nslots * sizeof(uint16_t))
        self.out_lens = <uint32_t *>malloc(self.nslots * sizeof(uint32_t))
        self.backlog = <uint16_t *>malloc(self.nslots * sizeof(uint16_t))
        self.dones = <Done *>malloc(engine.depth * sizeof(Done))
        if not (self.slots and self.out_heads and self.out_lens and self.backlog
                and self.dones):
            raise MemoryError()
        memset(self.slots, 0, self.nslots * sizeof(Slot))

    def __dealloc__(self):
        cdef unsigned i
        if self.slots != NULL:
            for i in range(self.nslots):
                free(self.slots[i].iov)
                free(self.slots[i].seg)
                free(self.slots[i].dwz)
        free(self.slots)
        free(self.out_heads)
        free(self.out_lens)
        free(self.backlog)
        free(self.dones)
        free(self.regions)

    def set_serial(self, bytes serial) -> None:
        """What GET_ID answers (a restore takes over the serial the guest saw)."""
        if len(serial) != ID_BYTES:
            raise ValueError(f"serial must be {ID_BYTES} bytes")
        memcpy(self.serial, <const char *>serial, ID_BYTES)

    @property
    def fd(self):
        return self.engine.fd

    # -- serving --

    def room(self) -> int:
        """How many more requests the engine takes now (0: pop nothing more)."""
        if self.bl_n or self.cancelled:
            return 0
        return self.engine.depth - self.engine.outstanding

    def serve(self, batch, mem) -> None:
        """Answer or submit every chain of ``batch`` (a Batch: chains handed out again,
        or popped from emu.pyring's ring)."""
        cdef cnp.ndarray heads = as_c(batch.heads, cnp.NPY_UINT16)
        cdef cnp.ndarray starts = as_c(batch.chain_start, cnp.NPY_UINT32)
        cdef cnp.ndarray addr = as_c(batch.addr, cnp.NPY_UINT64)
        cdef cnp.ndarray length = as_c(batch.length, cnp.NPY_UINT32)
        cdef cnp.ndarray writable = as_c(batch.writable, cnp.NPY_UINT8)
        self.serve_chains(
            <uint16_t *>cnp.PyArray_DATA(heads), <uint32_t *>cnp.PyArray_DATA(starts),
            <uint64_t *>cnp.PyArray_DATA(addr), <uint32_t *>cnp.PyArray_DATA(length),
            <uint8_t *>cnp.PyArray_DATA(writable), cnp.PyArray_DIM(heads, 0), mem)

    cdef int serve_chains(self, const uint16_t *h, const uint32_t *st, const uint64_t *ad,
                          const uint32_t *ln, const uint8_t *wr, Py_ssize_t n,
                          mem) except -1:
        """Answer or submit ``n`` chains (a Batch's arrays, or the ring's scratch after
        ``_Ring.pop_c``); DeviceError (nothing of them run) for a chain without a status
        byte or with readable after writable."""
        cdef Py_ssize_t bad = -1
        cdef int err = P_OK
        cdef Py_ssize_t i
        if n == 0:
            return 0
        if self.q.ring is not self._ring:
            self._refresh(mem)
        if self.cancelled and not self.count():
            self.cancelled = False
        with nogil:
            for i in range(n):
                err = self.parse(h[i], ad, ln, wr, st[i], st[i + 1])
                if err != P_OK:
                    bad = i
                    break
            if err == P_OK:
                for i in range(n):
                    self.execute(h[i])
                self.engine.kick()
        if err != P_OK:
            head = h[bad]
            if err == P_ORDER:
                raise DeviceError(f"blk: chain {head}: readable descriptor after a writable one")
            if err == P_NO_STATUS:
                raise DeviceError(f"blk: chain {head}: no device-writable byte for the status")
            if err == P_MEMORY:
                raise GuestMemoryError(
                    f"access gpa {self.bad_gpa:#x} len {self.bad_len:#x} is outside guest RAM"
                )
            if err == P_NOMEM:
                raise MemoryError()
            raise DeviceError(f"blk: chain {head}: already in flight")
        self._log_errors()
        return 0

    def _refresh(self, mem) -> None:
        """Copy the guest regions into the C table (as emu._ring does)."""
        regions = list(mem.regions)
        cdef Region *table = <Region *>malloc(max(len(regions), 1) * sizeof(Region))
        cdef int k
        if table == NULL:
            raise MemoryError()
        for k, r in enumerate(regions):
            table[k].gpa = r.gpa
            table[k].size = r.size
            table[k].data = <uint8_t *>cnp.PyArray_DATA(r.array)
            table[k].dirty = <uint8_t *>cnp.PyArray_DATA(r.dirty)
        if self.count():
            self._old_keep.append(self._keep)  # slots may still point into them
        free(self.regions)
        self.regions = table
        self.nregions = len(regions)
        self._keep = [(r.array, r.dirty) for r in regions]
        self._ring = self.q.ring

    cdef uint8_t *translate(self, uint64_t gpa, uint64_t length, Region **region) noexcept nogil:
        """Host address of [gpa, gpa + length) (length >= 1), NULL unless wholly inside one
        region (GuestMemory.translate)."""
        cdef int k
        cdef Region *r
        for k in range(self.nregions):
            r = &self.regions[k]
            if r.gpa <= gpa and gpa - r.gpa < r.size:
                if length > r.size - (gpa - r.gpa):
                    break
                region[0] = r
                return r.data + (gpa - r.gpa)
        self.bad_gpa, self.bad_len = gpa, length
        return NULL

    cdef bint range_ok(self, uint64_t sector, uint64_t nbytes) noexcept nogil:
        cdef uint64_t align = self.block_size // SECTOR
        return (nbytes % self.block_size == 0 and sector % align == 0
                and sector <= self.capacity and nbytes // SECTOR <= self.capacity - sector)

    cdef int add_iov(self, Slot *s, uint64_t gpa, uint64_t n) noexcept nogil:
        """Append guest bytes [gpa, gpa + n) to the slot's iovecs."""
        cdef Region *r
        cdef uint8_t *p = self.translate(gpa, n, &r)
        cdef uint32_t cap
        cdef void *a
        cdef void *b
        if p == NULL:
            return P_MEMORY
        if s.niov == s.cap:
            cap = 8 if s.cap == 0 else 2 * s.cap
            a = realloc(s.iov, cap * sizeof(iovec))
            if a == NULL:
                return P_NOMEM
            s.iov = <iovec *>a
            b = realloc(s.seg, cap * sizeof(Seg))
            if b == NULL:
                return P_NOMEM
            s.seg = <Seg *>b
            s.cap = cap
        s.iov[s.niov].iov_base = p
        s.iov[s.niov].iov_len = n
        s.seg[s.niov].dirty = r.dirty
        s.seg[s.niov].off = gpa - r.gpa
        s.niov += 1
        return P_OK

    cdef int parse(self, uint16_t head, const uint64_t *ad, const uint32_t *ln,
                   const uint8_t *wr, uint32_t a, uint32_t b) noexcept nogil:
        """Cut chain segments [a, b) into header / data / status byte and decide what the
        request is (blk._parse and blk.BlkDevice._execute's checks), into its slot."""
        cdef Slot *s
        cdef Region *r
        cdef uint32_t j, first_w = b, last_w = b, nw, k
        cdef uint8_t hdr[HEADER_BYTES]
        cdef uint8_t payload[MAX_DWZ_SEGMENTS * DWZ_BYTES]
        cdef uint64_t got = 0, take, skip_j = b, skip_off = 0, nbytes, gpa, n
        cdef uint64_t start, count
        cdef uint32_t rtype, flags
        cdef uint8_t *p
        cdef int rc
        cdef bint zeroes
        for j in range(a, b):
            if ln[j] == 0:
                continue
            if wr[j]:
                if first_w == b:
                    first_w = j
                last_w = j
            elif first_w != b:
                return P_ORDER
        if last_w == b:
            return P_NO_STATUS
        if head >= self.nslots or self.slots[head].busy:
            return P_BUSY
        s = &self.slots[head]
        s.niov = 0
        s.nsub = s.next_sub = 0
        s.written = 0
        s.status = S_OK
        s.expect = 0
        s.queued = s.pending = s.getid = False
        free(s.dwz)
        s.dwz = NULL
        # the whole last writable segment is checked, so its end cannot wrap the address
        p = self.translate(ad[last_w], ln[last_w], &r)
        if p == NULL:
            return P_MEMORY
        s.status_p = p + ln[last_w] - 1
        s.status_dirty = r.dirty
        s.status_off = ad[last_w] - r.gpa + ln[last_w] - 1
        # the header: the first 16 readable bytes, over as many segments as they take
        for j in range(a, first_w):
            if ln[j] == 0:
                continue
            if got == HEADER_BYTES:
                skip_j, skip_off = j, 0
                break
            take = min(<uint64_t>ln[j], HEADER_BYTES - got)
            p = self.translate(ad[j], take, &r)
            if p == NULL:
                return P_MEMORY
            memcpy(hdr + got, p, take)
            got += take
            if take < ln[j]:
                skip_j, skip_off = j, take
                break
        if got < HEADER_BYTES:
            s.status = S_IOERR  # a short header
            return P_OK
        rtype = ld32(hdr)
        s.one.offset = ld64(hdr + 8)  # the sector, until it is known to be one
        if rtype != T_IN and rtype != T_OUT and rtype != T_FLUSH and rtype != T_GET_ID \
                and rtype != T_DISCARD and rtype != T_WRITE_ZEROES:
            s.status = S_UNSUPP
            return P_OK
        if self.readonly and (rtype == T_OUT or rtype == T_DISCARD or rtype == T_WRITE_ZEROES):
            s.status = S_IOERR
            return P_OK
        if rtype == T_GET_ID:  # the serial, cut to the space the driver gave
            nbytes = 0
            for j in range(first_w, last_w + 1):
                n = ln[j] - (1 if j == last_w else 0)
                if n == 0:
                    continue
                if nbytes == ID_BYTES:
                    break
                n = min(n, ID_BYTES - nbytes)
                rc = self.add_iov(s, ad[j], n)
                if rc != P_OK:
                    return rc
                nbytes += n
            s.getid = True
            s.written = <uint32_t>nbytes
            return P_OK
        if rtype == T_IN:  # the writable data: all but the status byte
            nbytes = k = 0
            for j in range(first_w, last_w + 1):
                n = ln[j] - (1 if j == last_w else 0)
                nbytes += n
                k += n != 0
            if k > self.seg_max or not self.range_ok(s.one.offset, nbytes):
                s.status = S_IOERR  # checked before any buffer is looked at
                return P_OK
            for j in range(first_w, last_w + 1):
                n = ln[j] - (1 if j == last_w else 0)
                if n:
                    rc = self.add_iov(s, ad[j], n)
                    if rc != P_OK:
                        return rc
            s.expect = nbytes
            s.one.op, s.one.offset, s.one.length = OP_READ, s.one.offset * SECTOR, nbytes
            s.one.flags = 0
            s.nsub = 1 if nbytes else 0
            return P_OK
        if rtype == T_FLUSH:
            if s.one.offset != 0:
                s.status = S_IOERR
                return P_OK
            s.one.op, s.one.offset, s.one.length, s.one.flags = OP_FLUSH, 0, 0, 0
            s.nsub = 1
            return P_OK
        # T_OUT, T_DISCARD, T_WRITE_ZEROES: the readable bytes after the header
        zeroes = rtype == T_WRITE_ZEROES
        if rtype != T_OUT and not (self.mode & (M_WRITE_ZEROES if zeroes else M_DISCARD)):
            s.status = S_UNSUPP
            return P_OK
        nbytes = k = 0
        for j in range(skip_j, first_w):
            n = ln[j] - (skip_off if j == skip_j else 0)
            nbytes += n
            k += n != 0
        if rtype == T_OUT:
            if k > self.seg_max or not self.range_ok(s.one.offset, nbytes):
                s.status = S_IOERR
                return P_OK
            for j in range(skip_j, first_w):
                n = ln[j] - (skip_off if j == skip_j else 0)
                if n:
                    rc = self.add_iov(s, ad[j] + (skip_off if j == skip_j else 0), n)
                    if rc != P_OK:
                        return rc
            s.expect = nbytes
            s.one.op, s.one.offset, s.one.length = OP_WRITE, s.one.offset * SECTOR, nbytes
            s.one.flags = F_FUA if self.mode & M_WRITETHROUGH else 0
            s.nsub = 1 if nbytes else 0
            return P_OK
        if nbytes == 0 or nbytes % DWZ_BYTES:
            s.status = S_IOERR
            return P_OK
        if nbytes // DWZ_BYTES > MAX_DWZ_SEGMENTS:
            s.status = S_UNSUPP
            return P_OK
        got = 0
        for j in range(skip_j, first_w):
            n = ln[j] - (skip_off if j == skip_j else 0)
            if n:
                p = self.translate(ad[j] + (skip_off if j == skip_j else 0), n, &r)
                if p == NULL:
                    return P_MEMORY
                memcpy(payload + got, p, n)
                got += n
        for k in range(<uint32_t>(nbytes // DWZ_BYTES)):
            start = ld64(payload + k * DWZ_BYTES)
            count = ld32(payload + k * DWZ_BYTES + 8)
            flags = ld32(payload + k * DWZ_BYTES + 12)
            if flags & ~1u or (flags and not zeroes):
                s.status = S_UNSUPP
                return P_OK
            if count > MAX_DWZ_SECTORS or not self.range_ok(start, count * SECTOR):
                s.status = S_IOERR
                return P_OK
        s.dwz = <Sub *>malloc((MAX_DWZ_SEGMENTS + 1) * sizeof(Sub))
        if s.dwz == NULL:
            return P_NOMEM
        for k in range(<uint32_t>(nbytes // DWZ_BYTES)):
            count = ld32(payload + k * DWZ_BYTES + 8)
            if count == 0:
                continue  # nothing to do, as the Python path's fallocate of 0 bytes
            s.dwz[s.nsub].op = OP_WRITE_ZEROES if zeroes else OP_DISCARD
            s.dwz[s.nsub].offset = ld64(payload + k * DWZ_BYTES) * SECTOR
            s.dwz[s.nsub].length = count * SECTOR
            s.dwz[s.nsub].flags = F_MAY_UNMAP if ld32(payload + k * DWZ_BYTES + 12) else 0
            s.nsub += 1
        if self.mode & M_WRITETHROUGH:
            s.dwz[s.nsub].op, s.dwz[s.nsub].offset, s.dwz[s.nsub].length = OP_FLUSH, 0, 0
            s.dwz[s.nsub].flags = 0
            s.nsub += 1
        return P_OK

    cdef void execute(self, uint16_t head) noexcept nogil:
        """Answer a parsed request at once, or hand it to the engine."""
        cdef Slot *s = &self.slots[head]
        cdef uint32_t k, done = 0
        s.busy = True
        if s.status == S_OK and s.getid:
            for k in range(s.niov):
                memcpy(s.iov[k].iov_base, self.serial + done, s.iov[k].iov_len)
                mark(s.seg[k].dirty, s.seg[k].off, s.iov[k].iov_len)
                done += <uint32_t>s.iov[k].iov_len
            s.niov = 0
            self.complete(head)
        elif s.status != S_OK or s.nsub == 0:
            self.complete(head)
        elif self.bl_n:
            self.enqueue(head)  # keep the order: older requests wait for room first
        else:
            self.submit_next(head)

    cdef int submit_next(self, uint16_t head) noexcept nogil:
        """Hand the slot's next Sub to the engine; -EAGAIN queues it for later."""
        cdef Slot *s = &self.slots[head]
        cdef Sub *sub = &s.dwz[s.next_sub] if s.dwz != NULL else &s.one
        cdef int rc
        if sub.op == OP_READ or sub.op == OP_WRITE:
            rc = self.engine.submit(sub.op, head, s.iov, s.niov, sub.offset, sub.length,
                                    sub.flags)
        else:
            rc = self.engine.submit(sub.op, head, NULL, 0, sub.offset, sub.length, sub.flags)
        if rc == 0:
            s.pending = True
            s.next_sub += 1
        elif rc == -EAGAIN:
            self.enqueue(head)
        else:
            self.error(sub.op, rc, sub.offset)
            s.status = S_IOERR
            s.written = 0
            self.complete(head)
        return rc

    cdef void enqueue(self, uint16_t head) noexcept nogil:
        if not self.slots[head].queued:
            self.slots[head].queued = True
            self.backlog[(self.bl_head + self.bl_n) % self.nslots] = head
            self.bl_n += 1

    cdef void pump(self) noexcept nogil:
        """Submit from the backlog while the engine takes it."""
        cdef uint16_t head
        while self.bl_n:
            head = self.backlog[self.bl_head]
            self.slots[head].queued = False
            self.bl_head = (self.bl_head + 1) % self.nslots
            self.bl_n -= 1
            if self.submit_next(head) == -EAGAIN:
                # submit_next queued it at the back; it was first, so it goes first again
                self.bl_n -= 1
                self.bl_head = (self.bl_head + self.nslots - 1) % self.nslots
                self.backlog[self.bl_head] = head
                self.bl_n += 1
                return

    cdef void error(self, int op, int64_t res, uint64_t offset) noexcept nogil:
        self.nerr += 1
        self.err_op, self.err_res, self.err_off = op, res, offset

    cdef void complete(self, uint16_t head) noexcept nogil:
        """Write the status byte and put the used entry out."""
        cdef Slot *s = &self.slots[head]
        s.status_p[0] = s.status
        mark(s.status_dirty, s.status_off, 1)
        self.out_heads[self.n_out] = head
        self.out_lens[self.n_out] = s.written + 1
        self.n_out += 1
        self.release(s)

    cdef inline void release(self, Slot *s) noexcept nogil:
        s.busy = s.queued = s.pending = False
        if s.dwz != NULL:
            free(s.dwz)
            s.dwz = NULL

    cdef void on_done(self, uint64_t tag, int64_t res) noexcept nogil:
        cdef Slot *s
        cdef Sub *sub
        cdef uint32_t k
        if tag >= self.nslots:
            return
        s = &self.slots[tag]
        if not s.busy or not s.pending:
            return
        s.pending = False
        sub = &s.dwz[s.next_sub - 1] if s.dwz != NULL else &s.one
        if sub.op == OP_READ:  # whatever came of it, the buffers may have been written
            for k in range(s.niov):
                mark(s.seg[k].dirty, s.seg[k].off, s.iov[k].iov_len)
        if self.cancelled:
            if res == -ENOTCONN and sub.op != OP_READ:
                self.uncertain += 1  # sent, never answered: it may still land
            self.release(s)
            return
        if res < 0:
            self.error(sub.op, res, sub.offset)
            s.status = S_IOERR
            s.written = 0
        elif sub.op == OP_READ:
            s.written = <uint32_t>res
            if <uint64_t>res != s.expect:
                s.status = S_IOERR
        elif sub.op == OP_WRITE and <uint64_t>res != s.expect:
            s.status = S_IOERR
        if s.status != S_OK or s.next_sub == s.nsub:
            self.complete(<uint16_t>tag)
        elif self.bl_n:
            self.enqueue(<uint16_t>tag)
        else:
            self.submit_next(<uint16_t>tag)

    cdef void collect(self) noexcept nogil:
        """Everything the engine finished, without blocking; then refill it, and again
        while the refill's requests finished at once (``Engine.ready``)."""
        cdef int n, k
        cdef int depth = self.engine.depth
        while True:
            n = self.engine.reap(self.dones, depth)
            for k in range(n):
                self.on_done(self.dones[k].tag, self.dones[k].result)
            if n == depth:
                continue
            self.refill()
            if not self.engine.ready():
                break

    cdef void refill(self) noexcept nogil:
        if self.cancelled:
            self.drop_backlog()
        else:
            self.pump()
        self.engine.kick()

    cdef void drop_backlog(self) noexcept nogil:
        while self.bl_n:
            self.release(&self.slots[self.backlog[self.bl_head]])
            self.bl_head = (self.bl_head + 1) % self.nslots
            self.bl_n -= 1

    cdef bint wait_some(self) noexcept nogil:
        """Block for at least one completion; False when nothing is outstanding."""
        cdef int n, k
        n = self.engine.wait(self.dones, self.engine.depth)
        for k in range(n):
            self.on_done(self.dones[k].tag, self.dones[k].result)
        self.refill()
        return n > 0

    def _emit(self):
        cdef unsigned n = self.n_out
        if n == 0:
            return ()
        heads = np.empty(n, np.uint16)
        lengths = np.empty(n, np.uint32)
        memcpy(cnp.PyArray_DATA(heads), self.out_heads, n * sizeof(uint16_t))
        memcpy(cnp.PyArray_DATA(lengths), self.out_lens, n * sizeof(uint32_t))
        self.n_out = 0
        return ((heads, lengths),)

    def _log_errors(self):
        if self.nerr:
            what = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush",
                    OP_DISCARD: "discard", OP_WRITE_ZEROES: "write zeroes"}.get(self.err_op)
            log.error("blk: %d I/O error(s), the last: %s at byte %d: %s", self.nerr, what,
                      self.err_off, os.strerror(<int>-self.err_res))
            self.nerr = 0

    def _after(self):
        """Serve the queue again once the backlog is gone (the device stopped popping)."""
        self._log_errors()
        if self.starved and not self.bl_n:
            self.starved = False
            self.q.kick()

    def starve(self) -> None:
        """The device stopped popping for want of room: kick the queue when there is."""
        self.starved = True
        if not self.bl_n and self.engine.outstanding < self.engine.depth:
            self._after()

    # -- the device thread's pass over the queue --

    def serve_queue(self, mem) -> None:
        """Pop while the engine has room, serve each batch, publish what is done: the
        native plane's pass (blk.BlkDevice._serve_batch is the Python path's). The queue's
        own steps (Virtqueue.set_kicks, pop, publish_due) run inline: ``set_kicks``,
        ``pop`` and ``publish`` below are theirs, line for line, except that chains come
        from the ring's scratch arrays and used entries go to it from ours, with no
        Batch or array in between (emu._ring's ``pop_c`` / ``push_c``)."""
        q = self.q
        cdef Py_ssize_t room, want, got
        while True:
            self.set_kicks(q, False)
            room = self.room()
            while room:
                want = min(BATCH, room)
                try:
                    got = self.pop_serve(q, want, mem)
                except (DeviceError, GuestMemoryError):
                    q.publish_all_due()  # what earlier batches did reaches the guest first
                    raise
                if not got:
                    break
                if got < want:
                    break  # the ring ran dry (or the pass budget ran out): set_kicks tells
                room = self.room()
            if not room:  # the engine is full: ``starve`` kicks the queue when it is not
                self.starve()
                break
            if not self.set_kicks(q, True):
                break
        self.publish_ready(q)

    cdef bint set_kicks(self, q, bint enabled) except -1:
        """Virtqueue.set_kicks."""
        if q.gate is not OPEN:
            return False
        if enabled and q.more:
            return False
        return bool(q._resubmit) or q._requeue or q.ring.set_notify(enabled)

    cdef Py_ssize_t pop_serve(self, q, Py_ssize_t want, mem) except -1:
        """Virtqueue.pop, then ``serve``: the chains popped (0: none). Chains handed out
        again after a resume or restore come from Virtqueue.pop itself, as do the
        chains of a ring that is not emu._ring's (EMU_RING=python)."""
        cdef Py_ssize_t chains_left, descs_left, n
        cdef _Ring ring
        if q.gate is not OPEN:
            return 0
        chains_left, descs_left = q._chains_left, q._descs_left
        if chains_left <= 0 or descs_left <= 0:
            q.more = True
            return 0
        if q._requeue or q._resubmit or not isinstance(q.ring, _Ring):
            batch = q.pop(want)
            self.serve(batch, mem)
            return cnp.PyArray_DIM(batch.heads, 0)
        ring = <_Ring>q.ring
        ring.pop_c(min(want, chains_left), descs_left)
        q._descs_left = descs_left - <Py_ssize_t>ring.walked
        n = ring.nchains
        q._chains_left = chains_left - n
        if n and q.tracker is not None:
            q.tracker.fetched(ring.batch())
        self.serve_chains(ring.o_heads, ring.o_starts, ring.o_addr, ring.o_len, ring.o_wr, n,
                          mem)
        return n

    cdef int publish_ready(self, q) except -1:
        """Virtqueue.publish_due; without an observer (the vhost-user inflight region,
        the dirty log), straight from our arrays into the ring."""
        cdef Py_ssize_t n
        with nogil:
            self.collect()
        self._after()
        if q.gate is CLOSED:
            self.n_out = 0
            return 0
        ring = q.ring
        if self.n_out and q.tracker is None and q.log is None and isinstance(ring, _Ring):
            n, self.n_out = self.n_out, 0
            if (<_Ring>ring).push_c(self.out_heads, self.out_lens, n):
                q.interrupt()
            return 0
        for heads, lengths in self._emit():
            self.publish(q, heads, lengths)
        return 0

    cdef int publish(self, q, heads, lengths) except -1:
        """Virtqueue._publish."""
        cdef Py_ssize_t n = cnp.PyArray_DIM(heads, 0)
        tracker, log = q.tracker, q.log
        if log is not None:
            log.before_publish()
        if tracker is not None:
            tracker.using(heads)
        notify = q.ring.push(heads, lengths)
        if log is not None:
            log.published(q, n)
        if tracker is not None:
            tracker.used(heads)
        if notify:
            q.interrupt()
        return 0

    def publish_done(self) -> None:
        """The queue's completions, published (the device loop's wait in C calls this when
        ``fd`` turns readable)."""
        self.publish_ready(self.q)

    # -- emu.queue.Deferred --

    def defer(self, heads, lengths) -> None:
        """Used entries someone pushed while this plane is the queue's deferred."""
        cdef Py_ssize_t i
        for i, (h, n) in enumerate(zip(np.asarray(heads).tolist(), np.asarray(lengths).tolist())):
            if self.n_out >= self.nslots:
                raise OverflowError("more completions than the queue has slots")
            self.out_heads[self.n_out] = h
            self.out_lens[self.n_out] = n
            self.n_out += 1

    def next_due(self):
        """Completions come through ``fd``; answers made without the engine are due now."""
        return 0.0 if self.n_out else None

    def take_due(self, now):
        with nogil:
            self.collect()
        self._after()
        return self._emit()

    def take_all(self):
        """Every completion, waiting for each (drain)."""
        while True:
            with nogil:
                self.collect()
            yield from self._emit()
            if not self.count():
                break
            with nogil:
                self.wait_some()
        self._after()

    def cancel(self) -> None:
        """Publish nothing more: reads at the engine are cancelled (they no longer write
        guest memory when this returns), later completions are discarded, the backlog is
        forgotten (those chains stay in flight, never started).

        The Dones the engine has ready (the cancelled reads' above all) are reaped here,
        without blocking, so ``count`` is left with what the backend still holds: a
        report stop with only reads outstanding is final at once, not one device-thread
        wake-up later."""
        with nogil:
            self.engine.cancel_reads()
        self.cancelled = True
        self.n_out = 0
        with nogil:
            self.collect()  # discards (cancelled), and drops the backlog

    def drop(self) -> None:
        """Cancel, wait until the engine holds nothing, forget everything."""
        cdef unsigned i
        self.cancel()
        with nogil:
            self.engine.fence()
            while self.engine.outstanding:
                self.wait_some()
        for i in range(self.nslots):
            self.release(&self.slots[i])
        self.n_out = 0
        self.cancelled = False
        self.starved = False
        self._old_keep = []

    def take_uncertain(self) -> int:
        """Writes the engine gave up on after a cancel (-ENOTCONN: sent, never answered),
        since the last call."""
        n, self.uncertain = self.uncertain, 0
        return n

    def count(self) -> int:
        """Outstanding at the engine, waiting for room, or answered and not yet taken."""
        return self.engine.outstanding + self.n_out + self.bl_n
