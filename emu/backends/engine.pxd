# cython: language_level=3
"""The contract between the native blk data plane and an asynchronous storage engine.

An engine runs requests on a disk (a host file through io_uring, an NBD export through
libnbd) with many of them outstanding at once. The plane submits from the device thread
and reaps from the same thread when ``fd`` (an eventfd) turns readable; the hot calls are
``cdef ... nogil`` so the plane runs them without the GIL and without Python objects.

Rules every engine keeps:

* ``iov`` points into guest RAM (or the caller's buffers) and stays valid until the
  request's ``Done`` is reaped, or until ``abandon`` / ``cancel_reads`` says the engine
  no longer touches it.
* One ``Done`` per submitted request, with the caller's ``tag``; ``result`` is the bytes
  moved (read / write), 0 (flush, discard, write-zeroes) or ``-errno``. A backend that
  went away answers for what it held, never nothing: ``-ENOTCONN`` when the request may
  or may not have been carried out (a write sent to a server that vanished before it
  answered: its fate is unknown, and a stop must not claim it fenced), ``-EIO`` when it
  surely was not (never sent).
* ``wait`` and ``fence`` give a backend that stopped answering ``timeout`` seconds; then
  the engine gives it up (a network engine drops the connection and answers everything
  it held ``-ENOTCONN``) and returns (fence: ``-ETIMEDOUT``). Local kernel I/O (io_uring)
  cannot be given up and is waited for.
* ``fd`` is readable while Dones wait to be reaped (eventfd semantics: ``reap`` clears it
  when it empties the queue), except the Dones of requests ``submit`` finished at once
  (a tmpfs file's reads and writes, done in ``submit`` itself): ``ready`` counts those,
  and whoever submits reaps them before it waits on ``fd``. That saves the eventfd's
  write and read per request on a path with no other system call than the I/O.
* ``cancel_reads`` (a report stop): from its return on, no read still outstanding writes
  to its ``iov`` (io_uring: IORING_OP_ASYNC_CANCEL, then the read completes with -ECANCELED
  or in full before ``abandon`` returns; NBD: the read lands in an engine-owned bounce
  buffer that is dropped). Their Dones still arrive, with ``-ECANCELED``.
* ``fence`` (the end of a report stop, a reset): returns once nothing submitted is
  outstanding at the backend that could still change the disk; Dones of fenced requests
  stay reapable.
"""

from libc.stdint cimport int64_t, uint64_t
from posix.uio cimport iovec

cdef enum Op:
    OP_READ = 0
    OP_WRITE = 1
    OP_FLUSH = 2
    OP_DISCARD = 3
    OP_WRITE_ZEROES = 4

cdef enum OpFlag:
    F_FUA = 1  # write: durable before its Done (writethrough)
    F_MAY_UNMAP = 2  # write-zeroes: the range may be deallocated

cdef struct Done:
    uint64_t tag
    int64_t result


cdef class Engine:
    cdef readonly int fd  # eventfd: readable while Dones wait in reap()
    cdef readonly uint64_t size  # bytes
    cdef readonly bint readonly
    cdef readonly unsigned depth  # most requests outstanding at once
    cdef readonly unsigned outstanding  # submitted, Done not reaped yet
    cdef public double timeout  # seconds wait / fence give a silent backend (see above)

    # Queue one request; 0, -EAGAIN when ``depth`` are outstanding, or another -errno
    # (the request was not taken: no Done will come).
    cdef int submit(self, int op, uint64_t tag, const iovec *iov, int niov,
                    uint64_t offset, uint64_t length, int flags) noexcept nogil
    # Hand everything submitted since the last call to the backend; 0 or -errno.
    cdef int kick(self) noexcept nogil
    # Dones waiting that ``fd`` may not show (finished in ``submit``): reap them.
    cdef unsigned ready(self) noexcept nogil
    # Up to ``max`` Dones without blocking; how many.
    cdef int reap(self, Done *out, int max) noexcept nogil
    # At least one Done (blocks), unless nothing is outstanding (returns 0); how many.
    cdef int wait(self, Done *out, int max) noexcept nogil
    # See the module docstring; 0 or -errno.
    cdef int cancel_reads(self) noexcept nogil
    cdef int fence(self) noexcept nogil
    # the blocking Python face (engine.pyx)
    cdef int64_t _run(self, int op, const iovec *iov, int niov, uint64_t offset,
                      uint64_t length, int flags) except? -1
    cdef int64_t _vectored(self, int op, buffers, uint64_t offset) except? -1
