# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""UringEngine: a host file or block device through io_uring (Debian's liburing).

Each request gets a slot in a table of ``depth`` entries; its index is the SQE's
user_data, so a completion finds its request without a search and ``cancel_reads`` can
name each outstanding read to IORING_OP_ASYNC_CANCEL. Completed requests wait in a
``Done`` buffer until the caller reaps them: ``cancel_reads`` and ``fence`` consume
completion entries while they wait, and the caller must still get every Done.

Discard and write-zeroes are fallocate (PUNCH_HOLE / ZERO_RANGE, with KEEP_SIZE). A mode
the filesystem refuses (EOPNOTSUPP, EINVAL, ENOSYS, ENODEV) is remembered and the next one
is tried, ending in writing zeros, as emu.backends.file does, so every filesystem gives the
same result (tmpfs has no ZERO_RANGE). A discard nothing can punch is a no-op.

The eventfd is registered with the ring, so it turns readable when a completion is
posted; ``reap`` clears it and sets it again when it leaves Dones behind.

A file on tmpfs has no non-blocking read or write (FMODE_NOWAIT: preadv2 with RWF_NOWAIT
says EOPNOTSUPP), so io_uring hands every read and write of it to an io-wq worker thread:
a thread wake-up there and one back per request, and the caller's first reap usually
comes too early, so each request also costs the device thread a second trip through its
poll loop. Its pages are memory, so ``sync_rw`` engines (tmpfs) do reads and writes with
preadv2 / pwritev2 in ``submit`` itself instead, done before it returns (a page swapped
out is the one wait); everything else still goes through the ring. Their Dones do not
set the eventfd (``ready`` counts them; the plane reaps them in the same pass), and
``reap`` reads the eventfd only when it may be set, so such a request costs no system
call besides its own read or write.
"""

from libc.errno cimport (
    EAGAIN,
    EBADF,
    EINTR,
    EINVAL,
    EIO,
    ENODEV,
    ENOMEM,
    ENOSYS,
    EOPNOTSUPP,
    errno,
)
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from posix.uio cimport iovec
from posix.unistd cimport close as c_close, read as c_read, write as c_write

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

import os
import stat

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<liburing.h>" nogil:
    struct io_uring:
        pass
    struct io_uring_sqe:
        pass
    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags
    int io_uring_queue_init(unsigned entries, io_uring *ring, unsigned flags)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    int io_uring_submit_and_wait(io_uring *ring, unsigned wait_nr)
    int io_uring_register_eventfd(io_uring *ring, int fd)
    int io_uring_peek_cqe(io_uring *ring, io_uring_cqe **cqe)
    void io_uring_cqe_seen(io_uring *ring, io_uring_cqe *cqe)
    unsigned io_uring_sq_ready(const io_uring *ring)
    unsigned io_uring_cq_ready(const io_uring *ring)
    void io_uring_prep_readv(io_uring_sqe *sqe, int fd, const iovec *iov, unsigned nr,
                             uint64_t offset)
    void io_uring_prep_writev2(io_uring_sqe *sqe, int fd, const iovec *iov, unsigned nr,
                               uint64_t offset, int flags)
    void io_uring_prep_write(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                             uint64_t offset)
    void io_uring_prep_fsync(io_uring_sqe *sqe, int fd, unsigned flags)
    void io_uring_prep_fallocate(io_uring_sqe *sqe, int fd, int mode, uint64_t offset,
                                 uint64_t length)
    void io_uring_prep_cancel64(io_uring_sqe *sqe, uint64_t user_data, int flags)
    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    unsigned IORING_FSYNC_DATASYNC

cdef extern from "<linux/fs.h>" nogil:
    int RWF_DSYNC

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long offset, int flags)
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, long offset, int flags)

cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)

cdef long TMPFS_MAGIC = 0x01021994

cdef enum:
    FL_KEEP_SIZE = 0x01
    FL_PUNCH_HOLE = 0x02
    FL_ZERO_RANGE = 0x10
    # stages of a discard / write-zeroes, tried in this order
    ST_NONE = 0
    ST_PUNCH = 1
    ST_ZERO = 2
    ST_WRITE = 3
    ZERO_CHUNK = 1 << 20

cdef uint64_t CANCEL_UD = 0xFFFFFFFFFFFFFFFF  # user_data of cancel SQEs: their CQEs are ignored


cdef struct Req:
    uint64_t tag
    uint64_t offset
    uint64_t length
    uint64_t done  # write-zeroes by writing: bytes zeroed so far
    const iovec *iov
    int niov
    int op
    int flags
    int stage
    bint active
    bint cancel_sent


cdef bint on_tmpfs(int fd):
    """A regular file on tmpfs. Not a device node: /dev is a tmpfs (devtmpfs reports the
    same magic), so a host block device's node would pass the fstatfs test while its
    reads and writes go to a real (or network) disk and block."""
    cdef statfs st
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return False
    return fstatfs(fd, &st) == 0 and st.f_type == TMPFS_MAGIC


cdef inline bint is_write(int op) noexcept nogil:
    return op != OP_READ


cdef inline bint refused(int res) noexcept nogil:
    """A fallocate mode this file cannot do, as opposed to an I/O error."""
    return res == -EOPNOTSUPP or res == -EINVAL or res == -ENOSYS or res == -ENODEV


cdef class UringEngine(Engine):
    """One file (or block device), one io_uring of ``depth`` entries, one eventfd."""

    cdef io_uring ring
    cdef bint ring_ok
    cdef int file_fd
    cdef Req *reqs
    cdef int *free_idx
    cdef unsigned nfree
    cdef Done *buf  # finished, not handed to the caller yet (circular)
    cdef unsigned buf_head, buf_n
    cdef unsigned reads_out, writes_out  # at the backend (not in buf)
    cdef bint punch_ok, zero_ok
    cdef bint prepped  # SQEs prepared while reaping: submit before returning
    cdef unsigned in_ring  # SQEs taken whose CQE is not drained yet: each may set fd
    cdef bint armed  # ``signal`` wrote fd since ``reap`` last cleared it
    cdef void *zeros
    cdef readonly str path
    #: reads and writes done in ``submit`` (a tmpfs file: see the module docstring)
    cdef readonly bint sync_rw

    def __cinit__(self, *args, **kwargs):
        self.file_fd = -1
        self.ring_ok = False

    def __init__(self, path, *, bint readonly=False, unsigned depth=128):
        cdef int rc, i
        if not 1 <= depth <= 4096:
            raise ValueError(f"depth {depth} not in 1..4096")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.depth = depth
        self.punch_ok = self.zero_ok = True
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.file_fd = os.open(self.path, flags)
        # not st_size: a host block device reports 0 there, lseek finds its end
        self.size = os.lseek(self.file_fd, 0, os.SEEK_END)
        self.sync_rw = on_tmpfs(self.file_fd)
        self.reqs = <Req *>calloc(depth, sizeof(Req))
        self.free_idx = <int *>malloc(depth * sizeof(int))
        self.buf = <Done *>malloc(depth * sizeof(Done))
        if self.reqs == NULL or self.free_idx == NULL or self.buf == NULL:
            raise MemoryError()
        for i in range(depth):
            self.free_idx[i] = depth - 1 - i
        self.nfree = depth
        # CQ is twice the SQ: room for a cancel's own completion beside each read
        rc = io_uring_queue_init(depth, &self.ring, 0)
        if rc < 0:
            raise OSError(-rc, f"io_uring_queue_init: {os.strerror(-rc)}")
        self.ring_ok = True
        self.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(os.strerror(EIO))
        rc = io_uring_register_eventfd(&self.ring, self.fd)
        if rc < 0:
            raise OSError(-rc, f"io_uring_register_eventfd: {os.strerror(-rc)}")

    def __dealloc__(self):
        self._release()

    def close(self) -> None:
        """Cancel reads, wait for everything else, free the ring and the fds."""
        if self.ring_ok:
            with nogil:
                self.cancel_reads()
                self.settle()
        self._release()

    cdef void _release(self):
        if self.ring_ok:
            io_uring_queue_exit(&self.ring)
            self.ring_ok = False
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        if self.file_fd >= 0:
            c_close(self.file_fd)
            self.file_fd = -1
        free(self.reqs)
        free(self.free_idx)
        free(self.buf)
        free(self.zeros)
        self.reqs = NULL
        self.free_idx = NULL
        self.buf = NULL
        self.zeros = NULL

    # -- the Engine contract --

    cdef int submit(self, int op, uint64_t tag, const iovec *iov, int niov,
                    uint64_t offset, uint64_t length, int flags) noexcept nogil:
        cdef int i
        cdef Req *r
        if not self.ring_ok:
            return -EBADF
        if self.nfree == 0:
            return -EAGAIN
        if op < OP_READ or op > OP_WRITE_ZEROES:
            return -EINVAL
        self.nfree -= 1
        i = self.free_idx[self.nfree]
        r = &self.reqs[i]
        r.tag, r.op, r.iov, r.niov = tag, op, iov, niov
        r.offset, r.length, r.flags, r.done = offset, length, flags, 0
        r.active, r.cancel_sent, r.stage = True, False, ST_NONE
        self.outstanding += 1
        if is_write(op):
            self.writes_out += 1
        else:
            self.reads_out += 1
        if op == OP_DISCARD or op == OP_WRITE_ZEROES:
            self.next_stage(i)
        else:
            self.start(i)
        return 0  # finished at once (tmpfs, nothing to do, no SQE): ``ready`` says so

    cdef int kick(self) noexcept nogil:
        cdef int rc
        if not self.ring_ok:
            return -EBADF
        self.prepped = False
        if io_uring_sq_ready(&self.ring) == 0:
            return 0
        rc = io_uring_submit(&self.ring)
        return rc if rc < 0 else 0

    cdef unsigned ready(self) noexcept nogil:
        return self.buf_n

    cdef int reap(self, Done *out, int max) noexcept nogil:
        cdef uint64_t junk
        cdef int n = 0
        if not self.ring_ok:
            return 0
        # Clear fd first (a completion posted later sets it again) when it may be set: by
        # ``signal``, by a CQE still to drain, or when there is nothing to take (a wake-up
        # for nothing: a CQE drained before its eventfd write landed). A tmpfs pass
        # (done in ``submit``, nothing in the ring) reaps with no system call.
        if self.armed or self.in_ring or not (self.buf_n or io_uring_cq_ready(&self.ring)):
            c_read(self.fd, &junk, 8)
            self.armed = False
        self.drain_cq()
        while n < max and self.buf_n:
            out[n] = self.buf[self.buf_head]
            self.buf_head = (self.buf_head + 1) % self.depth
            self.buf_n -= 1
            n += 1
        self.outstanding -= n
        if self.buf_n:
            self.signal()
        return n

    cdef int wait(self, Done *out, int max) noexcept nogil:
        cdef int n
        while self.outstanding and self.ring_ok:
            n = self.reap(out, max)
            if n:
                return n
            self.block()
        return 0

    cdef int cancel_reads(self) noexcept nogil:
        cdef unsigned i
        cdef io_uring_sqe *sqe
        if not self.ring_ok:
            return 0
        for i in range(self.depth):
            if self.reqs[i].active and self.reqs[i].op == OP_READ and not self.reqs[i].cancel_sent:
                sqe = self.get_sqe()
                if sqe == NULL:
                    break  # cannot happen (the SQ was just flushed); the read is waited for
                io_uring_prep_cancel64(sqe, i, 0)
                io_uring_sqe_set_data64(sqe, CANCEL_UD)
                self.reqs[i].cancel_sent = True
        while self.reads_out and self.ring_ok:
            self.block()
            self.drain_cq()
        if self.buf_n:
            self.signal()
        return 0

    cdef int fence(self) noexcept nogil:
        while self.writes_out and self.ring_ok:
            self.block()
            self.drain_cq()
        if self.buf_n:
            self.signal()
        return 0

    # -- inside --

    cdef void settle(self) noexcept nogil:
        """Wait until nothing is at the backend (close)."""
        while (self.reads_out or self.writes_out) and self.ring_ok:
            self.block()
            self.drain_cq()

    cdef void block(self) noexcept nogil:
        """Submit anything prepared and sleep until a completion is posted."""
        cdef int rc = io_uring_submit_and_wait(&self.ring, 1)
        self.prepped = False
        if rc < 0 and rc != -EINTR:
            self.fail_all(rc)

    cdef void fail_all(self, int err) noexcept nogil:
        """The ring itself failed: every request at the backend ends with ``err`` (never
        reached in practice; it keeps a broken ring from hanging the device thread)."""
        cdef unsigned i
        for i in range(self.depth):
            if self.reqs[i].active:
                self.finish(i, err)

    cdef void signal(self) noexcept nogil:
        cdef uint64_t one = 1
        self.armed = True
        c_write(self.fd, &one, 8)

    cdef io_uring_sqe *get_sqe(self) noexcept nogil:
        cdef io_uring_sqe *sqe = io_uring_get_sqe(&self.ring)
        if sqe == NULL:  # SQ full of prepared entries: hand them over, then there is room
            io_uring_submit(&self.ring)
            sqe = io_uring_get_sqe(&self.ring)
        if sqe != NULL:
            self.in_ring += 1
        return sqe

    cdef void drain_cq(self) noexcept nogil:
        cdef io_uring_cqe *cqe
        cdef uint64_t ud
        cdef int res
        while io_uring_peek_cqe(&self.ring, &cqe) == 0:
            ud, res = cqe.user_data, cqe.res
            io_uring_cqe_seen(&self.ring, cqe)
            self.in_ring -= 1
            if ud < self.depth and self.reqs[ud].active:
                self.completed(<int>ud, res)
        if self.prepped:
            io_uring_submit(&self.ring)
            self.prepped = False

    cdef void completed(self, int i, int res) noexcept nogil:
        cdef Req *r = &self.reqs[i]
        if r.stage == ST_NONE:
            self.finish(i, res)
        elif r.stage == ST_WRITE:
            if res <= 0:
                self.finish(i, res if res < 0 else -EIO)
                return
            r.done += <uint64_t>res
            if r.done < r.length:
                self.start(i)
                self.prepped = True
            else:
                self.finish(i, 0)
        elif refused(res):  # a fallocate mode this file lacks: remember, try the next
            if r.stage == ST_PUNCH:
                self.punch_ok = False
            else:
                self.zero_ok = False
            self.next_stage(i)
            self.prepped = True
        else:
            self.finish(i, res)

    cdef void next_stage(self, int i) noexcept nogil:
        """Move a discard / write-zeroes to the next way of doing it that may work."""
        cdef Req *r = &self.reqs[i]
        if r.length == 0:
            self.finish(i, 0)
            return
        while True:
            r.stage += 1
            if r.stage == ST_PUNCH:
                if self.punch_ok and (r.op == OP_DISCARD or r.flags & F_MAY_UNMAP):
                    break
            elif r.stage == ST_ZERO:
                if r.op == OP_WRITE_ZEROES and self.zero_ok:
                    break
            elif r.stage == ST_WRITE and r.op == OP_WRITE_ZEROES:
                if self.zeros == NULL:
                    self.zeros = calloc(1, ZERO_CHUNK)
                    if self.zeros == NULL:
                        self.finish(i, -ENOMEM)
                        return
                break
            else:
                self.finish(i, 0)  # a discard with no way to punch: nothing to do
                return
        self.start(i)

    cdef void start(self, int i) noexcept nogil:
        cdef Req *r = &self.reqs[i]
        cdef io_uring_sqe *sqe
        cdef uint64_t n
        if self.sync_rw and r.stage == ST_NONE and (r.op == OP_READ or r.op == OP_WRITE):
            self.finish(i, self.rw_now(r))
            return
        sqe = self.get_sqe()
        if sqe == NULL:
            self.finish(i, -EAGAIN)
            return
        if r.stage == ST_PUNCH:
            io_uring_prep_fallocate(sqe, self.file_fd, FL_PUNCH_HOLE | FL_KEEP_SIZE,
                                    r.offset, r.length)
        elif r.stage == ST_ZERO:
            io_uring_prep_fallocate(sqe, self.file_fd, FL_ZERO_RANGE | FL_KEEP_SIZE,
                                    r.offset, r.length)
        elif r.stage == ST_WRITE:
            n = r.length - r.done
            if n > ZERO_CHUNK:
                n = ZERO_CHUNK
            io_uring_prep_write(sqe, self.file_fd, self.zeros, <unsigned>n, r.offset + r.done)
        elif r.op == OP_READ:
            io_uring_prep_readv(sqe, self.file_fd, r.iov, r.niov, r.offset)
        elif r.op == OP_WRITE:
            io_uring_prep_writev2(sqe, self.file_fd, r.iov, r.niov, r.offset,
                                  RWF_DSYNC if r.flags & F_FUA else 0)
        else:  # OP_FLUSH
            io_uring_prep_fsync(sqe, self.file_fd, IORING_FSYNC_DATASYNC)
        io_uring_sqe_set_data64(sqe, i)

    cdef int64_t rw_now(self, Req *r) noexcept nogil:
        """A read or write done here and now (``sync_rw``): bytes moved, or -errno."""
        cdef ssize_t n
        while True:
            if r.op == OP_READ:
                n = preadv2(self.file_fd, r.iov, r.niov, r.offset, 0)
            else:
                n = pwritev2(self.file_fd, r.iov, r.niov, r.offset,
                             RWF_DSYNC if r.flags & F_FUA else 0)
            if n >= 0:
                return n
            if errno != EINTR:
                return -errno

    cdef void finish(self, int i, int64_t res) noexcept nogil:
        cdef Req *r = &self.reqs[i]
        cdef unsigned at = (self.buf_head + self.buf_n) % self.depth
        self.buf[at].tag = r.tag
        self.buf[at].result = res
        self.buf_n += 1
        if is_write(r.op):
            self.writes_out -= 1
        else:
            self.reads_out -= 1
        r.active = False
        self.free_idx[self.nfree] = i
        self.nfree += 1
