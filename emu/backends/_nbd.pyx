# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""NbdEngine: an NBD export as an asynchronous storage engine, through libnbd's aio API.

How it is put together, and why:

* One libnbd handle, one worker thread (a pthread that never holds the GIL) that owns the
  socket's event loop: it polls the handle's fd in the direction libnbd asks for and an
  eventfd (``wake``) that submitters write when a command could not be sent at once
  (libnbd's direction turned to WRITE). Commands are handed to libnbd in ``submit`` (libnbd
  sends them there and then), so ``kick`` has nothing left to send.
* Every command carries a completion callback. libnbd runs it on whichever thread drives
  its state machine (mostly the worker), with the handle locked; it only records the answer
  in the request's slot, queues the slot for ``reap`` under ``qlock`` and makes ``fd``
  readable. Nothing here calls libnbd while holding ``qlock`` (lock order: ``hlock`` ->
  libnbd's handle lock -> ``qlock``), so the callback can never deadlock against a reaper.
* READS always land in an engine-owned bounce buffer and are copied into the caller's
  iovecs when their Done is reaped. NBD has no cancel: a read handed to the server will be
  answered, whenever the server likes. With the bounce buffer, ``cancel_reads`` is
  immediate: each outstanding read gets its Done (-ECANCELED) at once, nothing will write
  to its iovecs, and the bounce buffer (and the slot, which still counts against
  ``depth``) is freed when the server answers. The cost is one memcpy per read.
* WRITES of one segment are sent straight from the caller's memory (zero copy; the iovec
  stays valid until the Done by the Engine contract). Scatter lists are gathered into one
  bounce buffer and sent as one command: one reply, one error, and NBD's per-command cost
  (a header each way, a server round trip) paid once instead of per segment, which for a
  guest's 4 KiB pages is far more than the copy (bench/nbd.py prints both).
* F_FUA writes carry NBD's FUA flag when the server supports it; otherwise the write is
  followed by a flush issued (by the worker) once the write is answered, and the request's
  Done waits for the flush. Write-zeroes carries NO_HOLE unless F_MAY_UNMAP.
* Requests larger than the server takes in one command (its advertised maximum block
  size; 32 MiB when it advertises none, libnbd's own cap is 64 MiB; 4 GiB - 4 KiB for
  discard / write-zeroes, NBD's 32-bit length) go out as several commands on one slot;
  the slot counts its pieces and gives one Done when the last is answered (the worst
  error wins: -ENOTCONN over another error over success).
* A server that goes away: libnbd answers every command it held ENOTCONN, both those on
  the wire and those still queued in libnbd (it aborts both lists alike, so the two cannot
  be told apart). The engine passes -ENOTCONN on ("fate unknown": a write may still be
  applied by the server); -EIO stays for what surely was not done (refused at submit while
  disconnected: no Done) and for the server's own errors. The worker logs one line, marks
  the engine dead, and later submits fail at once with -EIO. The next submit/kick asks the
  worker to reconnect (a new handle on the same URI, at most once per second).
* A server that stops answering (hung, partitioned): ``wait`` and ``fence`` give it
  ``timeout`` seconds, then give it up: every request libnbd still holds gets its Done
  (-ENOTCONN) at once, the engine is marked dead, and the worker closes the handle (its
  buffers are freed only then: libnbd may write into a read's bounce buffer until it is
  closed) and reconnects later as after a loss; ``fence`` returns -ETIMEDOUT.
* Connecting is asynchronous (``nbd_aio_connect_uri``) in a poll loop with a deadline
  (``timeout``) that also watches ``wake``: a server that accepts and never speaks costs a
  failed attempt, never a worker that ``close`` cannot stop.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EINVAL, EIO, ENOMEM, EPIPE, EROFS, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, strdup, strncpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close, read, write

from emu._poll cimport POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, poll, pollfd
from emu.backends.engine cimport (Done, Engine, F_FUA, F_MAY_UNMAP, OP_DISCARD, OP_FLUSH,
                                  OP_READ, OP_WRITE, OP_WRITE_ZEROES)

import logging
import os

log = logging.getLogger(__name__)

cdef extern from "<libnbd.h>" nogil:
    struct nbd_handle:
        pass
    ctypedef struct nbd_completion_callback:
        int (*callback)(void *user_data, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil
    uint32_t LIBNBD_CMD_FLAG_FUA, LIBNBD_CMD_FLAG_NO_HOLE
    unsigned LIBNBD_AIO_DIRECTION_READ, LIBNBD_AIO_DIRECTION_WRITE
    nbd_handle *nbd_create()
    void nbd_close(nbd_handle *h)
    const char *nbd_get_error()
    int nbd_get_errno()
    int nbd_set_handle_name(nbd_handle *h, const char *name)
    int nbd_set_pread_initialize(nbd_handle *h, bint request)
    int nbd_aio_connect_uri(nbd_handle *h, const char *uri)
    int nbd_aio_is_ready(nbd_handle *h)
    int64_t nbd_get_block_size(nbd_handle *h, int size_type)
    int LIBNBD_SIZE_MINIMUM, LIBNBD_SIZE_MAXIMUM
    int64_t nbd_get_size(nbd_handle *h)
    int nbd_is_read_only(nbd_handle *h)
    int nbd_can_flush(nbd_handle *h)
    int nbd_can_fua(nbd_handle *h)
    int nbd_can_trim(nbd_handle *h)
    int nbd_can_zero(nbd_handle *h)
    int64_t nbd_aio_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset,
                          nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_pwrite(nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                           nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_flush(nbd_handle *h, nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_trim(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback cb, uint32_t flags)
    int64_t nbd_aio_zero(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback cb, uint32_t flags)
    int nbd_aio_get_fd(nbd_handle *h)
    unsigned nbd_aio_get_direction(nbd_handle *h)
    int nbd_aio_notify_read(nbd_handle *h)
    int nbd_aio_notify_write(nbd_handle *h)
    int nbd_aio_is_dead(nbd_handle *h)
    int nbd_aio_is_closed(nbd_handle *h)

cdef extern from "<errno.h>" nogil:
    int ECANCELED, ECONNRESET, ENOTCONN, EOPNOTSUPP, ESHUTDOWN, ETIMEDOUT

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_condattr_init(pthread_condattr_t *a)
    int pthread_condattr_setclock(pthread_condattr_t *a, int clock)
    int pthread_condattr_destroy(pthread_condattr_t *a)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)
    int pthread_create(pthread_t *t, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t t, void **ret)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const pthread_condattr_t *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)

cdef enum:
    INLINE_IOV = 4
    ERRLEN = 256
    # events the worker reports to Python logging
    EV_LOST = 1
    EV_BACK = 2
    EV_RETRY_FAILED = 3
    EV_GAVE_UP = 4

cdef int64_t RECONNECT_NS = 1000000000  # at most one reconnect attempt per second
# the largest read/write command: libnbd refuses more (ERANGE); when the server advertises
# no maximum, 32 MiB, above which libnbd's documentation warns some servers disconnect
cdef uint64_t DATA_CAP = 64 << 20
cdef uint64_t DATA_DEFAULT = 32 << 20
cdef uint64_t OTHER_CAP = 0xFFFFFFFF  # discard / write-zeroes: NBD's 32-bit length


cdef struct Slot:
    State *st
    uint64_t tag
    int op
    uint64_t length
    int64_t result
    char *bounce  # engine-owned data buffer, or NULL (zero-copy write, no data)
    iovec *iov  # the caller's iovecs (reads scatter into them at reap)
    int niov
    iovec inline_iov[INLINE_IOV]
    bint in_use  # taken from the pool
    bint answered  # libnbd is done with the request (and its buffer)
    bint queued  # in the Done FIFO (or already reaped)
    bint reaped  # its Done was handed out; the slot is free once also answered
    bint canceled  # a read whose Done said -ECANCELED: its data goes nowhere
    bint flush_after  # an F_FUA write on a server without FUA: flush once written
    unsigned pieces  # commands at libnbd for this request, not answered yet (0 until sent)
    int err  # the worst error of its pieces so far (ENOTCONN wins), or 0


cdef struct State:
    nbd_handle *h
    char *uri
    uint64_t size
    int fd  # the engine's eventfd (Dones waiting)
    int wake  # the worker's eventfd
    pthread_t worker
    bint worker_started
    # hlock guards ``h``, ``dead`` and the server's capabilities against a reconnect
    pthread_mutex_t hlock
    bint dead
    bint lost  # (written under qlock) a command was answered "not connected": as dead
    bint want_reconnect
    bint can_fua, can_flush, can_trim, can_zero
    uint64_t max_data, max_other  # the largest command (bytes): read/write, discard/zero
    double *timeout  # the engine's ``timeout`` (seconds), read by the worker to connect
    bint gave_up  # wait/fence dropped the connection: the worker logs it once
    int64_t last_try_ns
    unsigned reconnects
    char err[ERRLEN]
    # qlock guards everything below and every Slot's state flags
    pthread_mutex_t qlock
    pthread_cond_t cond  # a Done queued or a write answered
    bint stopping
    Slot *slots
    unsigned nslots
    int *free_stack
    unsigned nfree
    int *fifo  # slot indices whose Done waits for reap
    unsigned head, count
    int *followups  # F_FUA writes waiting for their flush
    unsigned nfollow
    unsigned writes_pending  # write/flush/trim/zero not answered yet
    # a submit got -EAGAIN because canceled reads held the slots: ``fd`` is made readable
    # (with nothing to reap) when one comes back, so the caller knows to retry
    bint starved
    bint fd_spurious


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t _deadline(double seconds) noexcept nogil:
    """``seconds`` from now on the monotonic clock, in ns (NaN is 0; huge is capped)."""
    if not seconds > 0:
        seconds = 0
    elif seconds > 1e9:
        seconds = 1e9
    return _now_ns() + <int64_t>(seconds * 1e9)


cdef inline int _wait_until(State *st, int64_t deadline) noexcept nogil:
    """pthread_cond_timedwait on ``cond`` (monotonic clock); qlock held. ETIMEDOUT or 0."""
    cdef timespec ts
    ts.tv_sec = deadline // 1000000000
    ts.tv_nsec = deadline % 1000000000
    return pthread_cond_timedwait(&st.cond, &st.qlock, &ts)


cdef inline void _poke(int fd) noexcept nogil:
    cdef uint64_t one = 1
    write(fd, &one, 8)


cdef inline void _drain(int fd) noexcept nogil:
    cdef uint64_t v
    read(fd, &v, 8)


cdef inline void _queue_done(State *st, Slot *s) noexcept nogil:
    """Puts ``s`` in the Done FIFO; qlock held."""
    s.queued = True
    st.fifo[(st.head + st.count) % st.nslots] = <int>(s - st.slots)
    st.count += 1
    if st.count == 1:
        _poke(st.fd)
    pthread_cond_broadcast(&st.cond)


cdef inline void _release(State *st, Slot *s) noexcept nogil:
    """Returns ``s`` to the pool; qlock held, libnbd done with it, its Done reaped."""
    free(s.bounce)
    s.bounce = NULL
    s.in_use = False
    if s.iov != &s.inline_iov[0]:
        free(s.iov)
    s.iov = NULL
    st.free_stack[st.nfree] = <int>(s - st.slots)
    st.nfree += 1


cdef inline void _answer(State *st, Slot *s, int64_t result) noexcept nogil:
    """libnbd is done with the request (and its buffer); qlock held."""
    s.answered = True
    if s.queued:
        # a canceled read or a request given up: its Done is out already
        if s.reaped:
            _release(st, s)
            if st.starved:
                st.starved = False
                if st.count == 0:
                    st.fd_spurious = True
                    _poke(st.fd)
        return
    if s.op != OP_READ:
        st.writes_pending -= 1
    s.result = result
    _queue_done(st, s)


cdef inline void _piece_failed(Slot *s, int err) noexcept nogil:
    """Records a piece's error; a lost connection (fate unknown) outranks the rest."""
    if s.err == 0 or err == ENOTCONN:
        s.err = err


cdef int _on_reply(void *user_data, int *error) noexcept nogil:
    """libnbd's completion callback (any thread, libnbd's handle lock held)."""
    cdef Slot *s = <Slot *>user_data
    cdef State *st = s.st
    cdef int err = error[0]
    cdef int64_t result = 0
    pthread_mutex_lock(&st.qlock)
    if err in (ENOTCONN, ECONNRESET, EPIPE):
        # no answer: the connection went (libnbd says ENOTCONN for commands on the wire and
        # for those it had not sent yet alike), so the server may still carry it out
        err = ENOTCONN
        st.lost = True
    elif err == ESHUTDOWN:
        # the server's NBD_ESHUTDOWN reply ("shutting down"), on a connection that is still
        # up: a failed request, not a lost connection. Marking it lost would refuse every
        # later request with nothing to reconnect (the worker reconnects dead handles only)
        err = EIO
    if err:
        _piece_failed(s, err)
    s.pieces -= 1
    if s.pieces:
        pthread_mutex_unlock(&st.qlock)
        return 1
    if s.err:
        result = -s.err
    elif s.op == OP_READ or s.op == OP_WRITE:
        result = <int64_t>s.length
    if s.flush_after and not s.err and not s.queued:
        s.flush_after = False
        st.followups[st.nfollow] = <int>(s - st.slots)
        st.nfollow += 1
        _poke(st.wake)
    else:
        _answer(st, s, result)
    pthread_mutex_unlock(&st.qlock)
    return 1  # retire the command: nothing ever asks libnbd about it again


cdef inline nbd_completion_callback _cb(Slot *s) noexcept nogil:
    cdef nbd_completion_callback cb
    cb.callback = _on_reply
    cb.user_data = s
    cb.free = NULL
    return cb


cdef void _log_event(State *st, int event) noexcept with gil:
    """The worker's rare news, in Python logging (takes the GIL: never on a hot path)."""
    uri = st.uri.decode(errors="replace")
    why = st.err.decode(errors="replace")
    try:
        if event == EV_LOST:
            log.warning("nbd %s: connection lost (%s); outstanding requests answered "
                        "ENOTCONN (fate unknown), new ones fail with EIO until it is back",
                        uri, why)
        elif event == EV_GAVE_UP:
            log.warning("nbd %s: connection lost (no answer within %.3g s: dropped); "
                        "outstanding requests answered ENOTCONN (fate unknown), new ones "
                        "fail with EIO until it is back", uri, st.timeout[0])
        elif event == EV_BACK:
            log.warning("nbd %s: reconnected", uri)
        else:
            log.info("nbd %s: reconnect failed (%s)", uri, why)
    except Exception:  # logging must never take the worker down
        pass


cdef inline void _note_error(State *st) noexcept nogil:
    cdef const char *msg = nbd_get_error()
    if msg == NULL:
        msg = b"unknown error"
    strncpy(st.err, msg, ERRLEN - 1)
    st.err[ERRLEN - 1] = 0


cdef int _capabilities(State *st, nbd_handle *h) noexcept nogil:
    """Reads the server's features into ``st``; hlock held (or no other thread yet)."""
    st.can_fua = nbd_can_fua(h) == 1
    st.can_flush = nbd_can_flush(h) == 1
    st.can_trim = nbd_can_trim(h) == 1
    st.can_zero = nbd_can_zero(h) == 1
    cdef int64_t bmin = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM)
    cdef int64_t bmax = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM)
    cdef uint64_t align = <uint64_t>bmin if bmin > 4096 else 4096
    st.max_data = DATA_DEFAULT if bmax <= 0 else min(<uint64_t>bmax, DATA_CAP)
    if st.max_data > align:  # pieces keep the request's alignment
        st.max_data -= st.max_data % align
    st.max_other = OTHER_CAP - OTHER_CAP % align
    return 0


cdef inline int _notify(nbd_handle *h, unsigned direction, short revents) noexcept nogil:
    """Tell libnbd the socket is ready the way it waits for (read or write); 0 if not."""
    if (direction & LIBNBD_AIO_DIRECTION_READ) and \
            revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL):
        return nbd_aio_notify_read(h)
    if (direction & LIBNBD_AIO_DIRECTION_WRITE) and \
            revents & (POLLOUT | POLLHUP | POLLERR | POLLNVAL):
        return nbd_aio_notify_write(h)
    return 0


cdef nbd_handle *_connect(State *st) noexcept nogil:
    """A new handle, connected within ``timeout``, or NULL with ``st.err`` set.

    Asynchronous (a poll loop on libnbd's fd and ``wake``) so that ``close`` (``stopping``
    and a poke) ends it at once, whatever the other end does."""
    cdef nbd_handle *h = nbd_create()
    cdef int64_t deadline = _deadline(st.timeout[0]), left
    cdef pollfd pfd[2]
    cdef unsigned direction
    cdef int r
    if h == NULL:
        _note_error(st)
        return NULL
    nbd_set_handle_name(h, b"emu")
    # the bounce buffers are never read after an error, so libnbd need not zero them
    nbd_set_pread_initialize(h, False)
    if nbd_aio_connect_uri(h, st.uri) == -1:
        _note_error(st)
        nbd_close(h)
        return NULL
    while not nbd_aio_is_ready(h):
        r = 0
        left = deadline - _now_ns()
        if nbd_aio_is_dead(h) or nbd_aio_is_closed(h):
            strncpy(st.err, b"the server closed the connection during the handshake",
                    ERRLEN - 1)
            r = -1
        elif st.stopping:
            strncpy(st.err, b"the engine is closing", ERRLEN - 1)
            r = -1
        elif left <= 0:
            strncpy(st.err, b"no handshake within the timeout", ERRLEN - 1)
            r = -1
        if r == -1:
            nbd_close(h)
            return NULL
        direction = nbd_aio_get_direction(h)
        pfd[0].fd = nbd_aio_get_fd(h)
        pfd[0].events = 0
        if direction & LIBNBD_AIO_DIRECTION_READ:
            pfd[0].events |= POLLIN
        if direction & LIBNBD_AIO_DIRECTION_WRITE:
            pfd[0].events |= POLLOUT
        pfd[0].revents = 0
        pfd[1].fd = st.wake
        pfd[1].events = POLLIN
        pfd[1].revents = 0
        if poll(pfd, 2, <int>(left // 1000000) + 1) <= 0:
            continue  # the deadline, or EINTR
        if pfd[1].revents & POLLIN:
            _drain(st.wake)
        r = _notify(h, direction, pfd[0].revents)
        if r == -1:
            _note_error(st)
            nbd_close(h)
            return NULL
    return h


cdef void _reconnect(State *st) noexcept nogil:
    cdef nbd_handle *h
    cdef nbd_handle *old
    st.last_try_ns = _now_ns()
    st.want_reconnect = False
    h = _connect(st)
    if h != NULL and <uint64_t>nbd_get_size(h) != st.size:
        strncpy(st.err, b"the export changed size", ERRLEN - 1)
        nbd_close(h)
        h = NULL
    if h == NULL:
        _log_event(st, EV_RETRY_FAILED)
        return
    pthread_mutex_lock(&st.hlock)
    st.h = h  # the old one was closed by _drop
    _capabilities(st, h)
    st.dead = False
    st.reconnects += 1
    pthread_mutex_lock(&st.qlock)
    st.lost = False
    pthread_mutex_unlock(&st.qlock)
    pthread_mutex_unlock(&st.hlock)
    _log_event(st, EV_BACK)


cdef void _give_up(State *st) noexcept nogil:
    """``wait`` / ``fence`` ran out of time: every request libnbd holds gets its Done
    (-ENOTCONN) now and the engine is dead; the worker closes the handle (_drop)."""
    cdef unsigned i
    cdef Slot *s
    pthread_mutex_lock(&st.hlock)
    if not st.dead:
        st.dead = True
        st.gave_up = True
        strncpy(st.err, b"no answer within the timeout", ERRLEN - 1)
    pthread_mutex_lock(&st.qlock)
    for i in range(st.nslots):
        s = &st.slots[i]
        if s.in_use and not s.queued:
            # not answered (answered slots are queued): the slot stays libnbd's until _drop
            if s.op != OP_READ:
                st.writes_pending -= 1
            s.result = -ENOTCONN
            _queue_done(st, s)
    pthread_mutex_unlock(&st.qlock)
    pthread_mutex_unlock(&st.hlock)
    _poke(st.wake)


cdef void _drop(State *st) noexcept nogil:
    """Closes a dead handle (worker only, no other thread uses a dead handle); what libnbd
    never answered (given up) is let go, as libnbd runs no callback after nbd_close."""
    cdef nbd_handle *h
    cdef unsigned i
    cdef Slot *s
    pthread_mutex_lock(&st.hlock)
    h = st.h
    st.h = NULL
    pthread_mutex_unlock(&st.hlock)
    nbd_close(h)
    pthread_mutex_lock(&st.qlock)
    for i in range(st.nslots):
        s = &st.slots[i]
        # ``pieces``: commands of it are still at libnbd (a slot a submit took but has not
        # handed to libnbd is that submit's to answer or let go)
        if s.in_use and s.pieces and not s.answered:
            _answer(st, s, -ENOTCONN)
    pthread_mutex_unlock(&st.qlock)
    if st.gave_up:
        st.gave_up = False
        _log_event(st, EV_GAVE_UP)


cdef void _issue_followups(State *st) noexcept nogil:
    """Sends the flush that completes each F_FUA write on a server without FUA."""
    cdef int idx
    cdef Slot *s
    cdef int64_t cookie
    while True:
        pthread_mutex_lock(&st.qlock)
        if st.nfollow == 0:
            pthread_mutex_unlock(&st.qlock)
            return
        st.nfollow -= 1
        idx = st.followups[st.nfollow]
        s = &st.slots[idx]
        s.pieces = 1
        pthread_mutex_unlock(&st.qlock)
        pthread_mutex_lock(&st.hlock)
        cookie = -1 if st.dead or s.queued else nbd_aio_flush(st.h, _cb(s), 0)
        pthread_mutex_unlock(&st.hlock)
        if cookie < 0:
            # the write landed, its flush was not sent: nothing more can reach the disk,
            # but the FUA promise failed
            pthread_mutex_lock(&st.qlock)
            _answer(st, s, -EIO)
            pthread_mutex_unlock(&st.qlock)


cdef void *_worker(void *arg) noexcept nogil:
    """The socket's event loop (see the module docstring)."""
    cdef State *st = <State *>arg
    cdef pollfd pfd[2]
    cdef unsigned direction
    cdef int r, timeout
    cdef int64_t due
    cdef nbd_handle *h
    while not st.stopping:
        h = st.h  # only this thread replaces it
        if not st.dead:
            direction = nbd_aio_get_direction(h)
            pfd[0].events = 0
            if direction & LIBNBD_AIO_DIRECTION_READ:
                pfd[0].events |= POLLIN
            if direction & LIBNBD_AIO_DIRECTION_WRITE:
                pfd[0].events |= POLLOUT
            # libnbd waiting on nothing: leave its fd out (a hang-up would spin the loop)
            pfd[0].fd = nbd_aio_get_fd(h) if pfd[0].events else -1
            pfd[0].revents = 0
            pfd[1].fd = st.wake
            pfd[1].events = POLLIN
            pfd[1].revents = 0
            if poll(pfd, 2, -1) < 0:
                continue  # EINTR
            if pfd[1].revents & POLLIN:
                _drain(st.wake)
            r = _notify(h, direction, pfd[0].revents)
            if r == -1 or nbd_aio_is_dead(h) or nbd_aio_is_closed(h):
                if r == -1:
                    _note_error(st)
                else:
                    strncpy(st.err, b"the server closed the connection", ERRLEN - 1)
                pthread_mutex_lock(&st.hlock)
                st.dead = True
                pthread_mutex_unlock(&st.hlock)
                _log_event(st, EV_LOST)
            _issue_followups(st)
        else:
            _issue_followups(st)  # answers them EIO
            if st.h != NULL:
                _drop(st)
            timeout = -1
            if st.want_reconnect:
                due = st.last_try_ns + RECONNECT_NS - _now_ns()
                if due <= 0:
                    _reconnect(st)
                    continue
                timeout = <int>(due // 1000000) + 1
            pfd[1].fd = st.wake
            pfd[1].events = POLLIN
            pfd[1].revents = 0
            if poll(&pfd[1], 1, timeout) > 0:
                _drain(st.wake)
    return NULL


cdef class NbdEngine(Engine):
    """An NBD export (``nbd://HOST:PORT/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``).

    ``readonly`` refuses writes here (-EROFS); a read-only server makes the engine
    read-only too. ``depth`` caps the commands at the server at once, including reads
    whose Done was already given out by ``cancel_reads`` but which the server has not
    answered yet: a submit refused -EAGAIN for that reason (``outstanding`` below
    ``depth``) sees ``fd`` turn readable, with nothing to reap, when a slot comes back.
    ``timeout`` (Engine) also bounds each connect (the first, in the constructor, and
    every reconnect). See the module docstring for the threads and the bounce buffers.
    """

    cdef State *st
    cdef readonly str uri
    cdef dict _held  # submit_py: tag -> the buffers the engine may still touch

    def __cinit__(self, *args, **kwargs):
        self.st = NULL

    def __init__(self, uri: str, *, readonly: bool = False, depth: int = 128) -> None:
        cdef State *st
        cdef nbd_handle *h
        cdef unsigned i
        cdef pthread_condattr_t cattr
        if depth < 1 or depth > 65536:
            raise ValueError(f"depth must be 1..65536, not {depth}")
        self.uri = uri
        self._held = {}
        st = self.st = <State *>calloc(1, sizeof(State))
        if st == NULL:
            raise MemoryError()
        st.fd = st.wake = -1
        st.timeout = &self.timeout
        pthread_mutex_init(&st.hlock, NULL)
        pthread_mutex_init(&st.qlock, NULL)
        pthread_condattr_init(&cattr)
        pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC)  # wait/fence deadlines
        pthread_cond_init(&st.cond, &cattr)
        pthread_condattr_destroy(&cattr)
        st.nslots = depth
        st.slots = <Slot *>calloc(depth, sizeof(Slot))
        st.free_stack = <int *>malloc(depth * sizeof(int))
        st.fifo = <int *>malloc(depth * sizeof(int))
        st.followups = <int *>malloc(depth * sizeof(int))
        st.uri = strdup(uri.encode())
        if not (st.slots and st.free_stack and st.fifo and st.followups and st.uri):
            raise MemoryError()
        for i in range(depth):
            st.slots[i].st = st
            st.free_stack[i] = depth - 1 - i
        st.nfree = depth
        st.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        st.wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if st.fd < 0 or st.wake < 0:
            raise OSError(errno, os.strerror(errno))
        with nogil:
            h = _connect(st)
        if h == NULL:
            raise OSError(EIO, f"nbd: cannot connect to {uri}: {st.err.decode(errors='replace')}")
        st.h = h
        st.size = <uint64_t>nbd_get_size(h)
        _capabilities(st, h)
        self.size = st.size
        self.readonly = bool(readonly) or nbd_is_read_only(h) == 1
        self.depth = depth
        self.fd = st.fd
        if pthread_create(&st.worker, NULL, _worker, st) != 0:
            raise OSError(EIO, "nbd: cannot start the worker thread")
        st.worker_started = True

    # -- the Engine contract --

    cdef int submit(self, int op, uint64_t tag, const iovec *iov, int niov,
                    uint64_t offset, uint64_t length, int flags) noexcept nogil:
        cdef State *st = self.st
        cdef Slot *s
        cdef uint64_t total = 0, done = 0, chunk, off, part
        cdef int i, err = 0
        cdef unsigned n, sent
        cdef int64_t cookie
        cdef uint32_t nflags = 0
        cdef bint data = op == OP_READ or op == OP_WRITE
        cdef char *buf = NULL
        if st == NULL or st.stopping:
            return -EIO
        if op < OP_READ or op > OP_WRITE_ZEROES or niov < 0:
            return -EINVAL
        if op != OP_READ and op != OP_FLUSH and self.readonly:
            return -EROFS
        if data:
            for i in range(niov):
                total += iov[i].iov_len
            if total != length:
                return -EINVAL
        if op != OP_FLUSH and (offset > st.size or length > st.size - offset):
            return -EINVAL
        if self.outstanding >= self.depth:
            return -EAGAIN
        pthread_mutex_lock(&st.qlock)
        if st.nfree == 0:  # canceled reads still at the server hold the rest
            st.starved = True
            pthread_mutex_unlock(&st.qlock)
            return -EAGAIN
        st.nfree -= 1
        s = &st.slots[st.free_stack[st.nfree]]
        # under qlock: the worker's _drop scans the slots; with ``pieces`` 0 it leaves this
        # one to submit until a command of it is handed to libnbd
        s.tag = tag
        s.op = op
        s.length = length
        s.result = 0
        s.bounce = NULL
        s.iov = NULL
        s.niov = 0
        s.answered = s.queued = s.reaped = s.canceled = s.flush_after = False
        s.pieces = 0
        s.err = 0
        s.in_use = True
        pthread_mutex_unlock(&st.qlock)
        # -- buffers --
        if op == OP_READ and length:
            s.bounce = <char *>malloc(length)
            if niov <= INLINE_IOV:
                s.iov = &s.inline_iov[0]
            else:
                s.iov = <iovec *>malloc(niov * sizeof(iovec))
            if s.bounce == NULL or s.iov == NULL:
                err = ENOMEM
            else:
                memcpy(s.iov, iov, niov * sizeof(iovec))
                s.niov = niov
        elif op == OP_WRITE and niov > 1 and length:
            s.bounce = <char *>malloc(length)
            if s.bounce == NULL:
                err = ENOMEM
            else:
                for i in range(niov):
                    memcpy(s.bounce + done, iov[i].iov_base, iov[i].iov_len)
                    done += iov[i].iov_len
        if err:
            pthread_mutex_lock(&st.qlock)
            s.answered = s.reaped = True
            _release(st, s)
            pthread_mutex_unlock(&st.qlock)
            return -err
        self.outstanding += 1
        pthread_mutex_lock(&st.qlock)
        if op != OP_READ:
            st.writes_pending += 1
        pthread_mutex_unlock(&st.qlock)
        # -- the command --
        pthread_mutex_lock(&st.hlock)
        if st.dead or st.lost:
            st.want_reconnect = True
            _poke(st.wake)
            err = EIO
        elif (data and length == 0) or (op == OP_FLUSH and not st.can_flush) or \
                (op == OP_DISCARD and not st.can_trim):
            err = -1  # nothing to send: done at once (a discard may do nothing)
        elif op == OP_WRITE_ZEROES and not st.can_zero:
            err = EOPNOTSUPP
        else:
            if op == OP_WRITE:
                buf = s.bounce if s.bounce != NULL else <char *>iov[0].iov_base
                if flags & F_FUA:
                    if st.can_fua:
                        nflags = LIBNBD_CMD_FLAG_FUA  # on every piece
                    elif st.can_flush:
                        s.flush_after = True
            elif op == OP_WRITE_ZEROES and not (flags & F_MAY_UNMAP):
                nflags = LIBNBD_CMD_FLAG_NO_HOLE
            # pieces the server takes; the count is set before the first can be answered
            chunk = st.max_data if data else st.max_other
            n = 1 if op == OP_FLUSH or length == 0 else <unsigned>((length - 1) // chunk + 1)
            pthread_mutex_lock(&st.qlock)
            s.pieces = n
            pthread_mutex_unlock(&st.qlock)
            sent = 0
            while sent < n:
                off = <uint64_t>sent * chunk
                part = min(chunk, length - off)
                if op == OP_READ:
                    cookie = nbd_aio_pread(st.h, s.bounce + off, part, offset + off, _cb(s), 0)
                elif op == OP_WRITE:
                    cookie = nbd_aio_pwrite(st.h, buf + off, part, offset + off, _cb(s), nflags)
                elif op == OP_FLUSH:
                    cookie = nbd_aio_flush(st.h, _cb(s), 0)
                elif op == OP_DISCARD:
                    cookie = nbd_aio_trim(st.h, part, offset + off, _cb(s), 0)
                else:
                    cookie = nbd_aio_zero(st.h, part, offset + off, _cb(s), nflags)
                if cookie < 0:
                    break
                sent += 1
            if sent < n:
                # libnbd refused a piece: nothing was sent for it
                err = nbd_get_errno()
                # a handle the server hung up on (dead, or CLOSED: libnbd says EINVAL then)
                # before the worker noticed: not sent, as when the engine is marked dead
                if err == 0 or err == ENOTCONN or nbd_aio_is_dead(st.h) or \
                        nbd_aio_is_closed(st.h):
                    err = EIO
                pthread_mutex_lock(&st.qlock)
                s.pieces -= n - sent
                if sent:
                    # earlier pieces are at the server and will be answered: the request
                    # was taken, and its Done carries the failure
                    _piece_failed(s, err)
                    if s.pieces == 0:
                        _answer(st, s, -s.err)
                    err = 0
                pthread_mutex_unlock(&st.qlock)
            if sent and nbd_aio_get_direction(st.h) & LIBNBD_AIO_DIRECTION_WRITE:
                _poke(st.wake)  # the socket was full: the worker must wait for POLLOUT
        if err:
            # still under hlock (taken before qlock, as everywhere): a live handle cannot be
            # marked dead, and so dropped, before this slot is settled; a dead one's _drop
            # skips it (``pieces`` 0: nothing of it reached libnbd)
            pthread_mutex_lock(&st.qlock)
            if err == -1:
                _answer(st, s, 0)
                err = 0
            else:
                # not taken: no Done will come
                if op != OP_READ:
                    st.writes_pending -= 1
                s.answered = s.reaped = True
                _release(st, s)
                self.outstanding -= 1
            pthread_mutex_unlock(&st.qlock)
        pthread_mutex_unlock(&st.hlock)
        return -err

    cdef int kick(self) noexcept nogil:
        """Commands went out in submit; a dead connection is asked to come back."""
        cdef State *st = self.st
        if st == NULL:
            return -EIO
        pthread_mutex_lock(&st.hlock)
        if (st.dead or st.lost) and not st.want_reconnect:
            st.want_reconnect = True
            _poke(st.wake)
        pthread_mutex_unlock(&st.hlock)
        return 0

    cdef int reap(self, Done *out, int max) noexcept nogil:
        cdef State *st = self.st
        cdef int n = 0, i, j, k
        cdef Slot *s
        cdef Slot *taken[64]
        cdef bint mine[64]  # answered when taken: this reap scatters and releases it
        cdef uint64_t off, chunk
        if st == NULL:
            return 0
        while n < max:
            pthread_mutex_lock(&st.qlock)
            j = 0
            while st.count and j < 64 and n + j < max:
                s = &st.slots[st.fifo[st.head]]
                st.head = (st.head + 1) % st.nslots
                st.count -= 1
                s.reaped = True
                out[n + j].tag = s.tag
                out[n + j].result = -ECANCELED if s.canceled else s.result
                taken[j] = s
                # not answered yet (a canceled read, a request given up): _answer releases
                # it when libnbd lets go, which may be before this reap locks again, so
                # this reap must not touch it after unlocking (it would release it twice)
                mine[j] = s.answered
                j += 1
            if st.count == 0 and (j or st.fd_spurious):
                _drain(st.fd)
                st.fd_spurious = False
            pthread_mutex_unlock(&st.qlock)
            if j == 0:
                break
            # answered slots are this thread's alone now: scatter the reads unlocked
            for i in range(j):
                s = taken[i]
                if mine[i] and s.op == OP_READ and not s.canceled and s.result > 0:
                    off = 0
                    for k in range(s.niov):
                        chunk = s.iov[k].iov_len
                        memcpy(s.iov[k].iov_base, s.bounce + off, chunk)
                        off += chunk
            pthread_mutex_lock(&st.qlock)
            for i in range(j):
                if mine[i]:
                    _release(st, taken[i])
            pthread_mutex_unlock(&st.qlock)
            self.outstanding -= j
            n += j
        return n

    cdef int wait(self, Done *out, int max) noexcept nogil:
        """At least one Done; a server silent for ``timeout`` is given up (_give_up)."""
        cdef State *st = self.st
        cdef int64_t deadline
        if st == NULL or self.outstanding == 0:
            return 0
        pthread_mutex_lock(&st.qlock)
        if st.count == 0:
            deadline = _deadline(self.timeout)
            while st.count == 0:
                if _wait_until(st, deadline) == ETIMEDOUT and st.count == 0:
                    pthread_mutex_unlock(&st.qlock)
                    _give_up(st)  # answers all it held: count > 0 now
                    pthread_mutex_lock(&st.qlock)
                    break
        pthread_mutex_unlock(&st.qlock)
        return self.reap(out, max)

    cdef int cancel_reads(self) noexcept nogil:
        """Every read not reaped yet gets its Done (-ECANCELED) now; see the module doc."""
        cdef State *st = self.st
        cdef unsigned i
        cdef Slot *s
        if st == NULL:
            return 0
        pthread_mutex_lock(&st.qlock)
        for i in range(st.nslots):
            s = &st.slots[i]
            if s.in_use and s.op == OP_READ and not s.reaped:
                s.canceled = True
                if not s.queued:
                    _queue_done(st, s)
        pthread_mutex_unlock(&st.qlock)
        return 0

    cdef int fence(self) noexcept nogil:
        """Returns once every write, flush, discard and write-zeroes is answered; -ETIMEDOUT
        when the server left them unanswered for ``timeout`` (they are given up: their
        Dones say -ENOTCONN, the connection is dropped)."""
        cdef State *st = self.st
        cdef int64_t deadline
        if st == NULL:
            return 0
        deadline = _deadline(self.timeout)
        pthread_mutex_lock(&st.qlock)
        while st.writes_pending:
            if _wait_until(st, deadline) == ETIMEDOUT and st.writes_pending:
                pthread_mutex_unlock(&st.qlock)
                _give_up(st)
                return -ETIMEDOUT
        pthread_mutex_unlock(&st.qlock)
        return 0

    # -- Python face beyond the blocking one: state, and async use for tests and benches --

    @property
    def connected(self) -> bool:
        """False from a lost connection until the worker has reconnected."""
        return self.st != NULL and not (self.st.dead or self.st.lost)

    @property
    def reconnects(self) -> int:
        return self.st.reconnects if self.st != NULL else 0

    @property
    def can_fua(self) -> bool:
        return self.st != NULL and self.st.can_fua

    @property
    def can_trim(self) -> bool:
        return self.st != NULL and self.st.can_trim

    @property
    def can_zero(self) -> bool:
        return self.st != NULL and self.st.can_zero

    def submit_py(self, int op, uint64_t tag, buffers, uint64_t offset, uint64_t length=0,
                  int flags=0) -> int:
        """``submit`` from Python (0 or -errno); ``buffers`` (read/write) stay referenced
        until their Done is reaped with ``reap_py``."""
        cdef Py_ssize_t n = len(buffers) if buffers is not None else 0, i, got = 0
        cdef Py_buffer view
        cdef iovec *iov = <iovec *>malloc(max(n, 1) * sizeof(iovec))
        cdef int rc
        cdef uint64_t total = 0
        if iov == NULL:
            raise MemoryError()
        if tag in self._held:
            free(iov)
            raise ValueError(f"tag {tag} is outstanding")
        try:
            for i in range(n):
                PyObject_GetBuffer(buffers[i], &view, PyBUF_WRITABLE if op == OP_READ
                                   else PyBUF_SIMPLE)
                iov[i].iov_base = view.buf
                iov[i].iov_len = view.len
                total += view.len
                # the exporter's memory stays put while a memoryview of it lives
                PyBuffer_Release(&view)
            if n:
                length = total
            held = [memoryview(b) for b in buffers] if n else []
            with nogil:
                rc = self.submit(op, tag, iov, <int>n, offset, length, flags)
            if rc == 0:
                self._held[tag] = held
            return rc
        finally:
            free(iov)

    def kick_py(self) -> int:
        cdef int rc
        with nogil:
            rc = self.kick()
        return rc

    def reap_py(self, int max=64, bint block=False) -> list[tuple[int, int]]:
        """Up to ``max`` Dones as (tag, result); ``block`` waits for at least one."""
        cdef Done *out = <Done *>malloc(max * sizeof(Done))
        cdef int n, i
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = self.wait(out, max) if block else self.reap(out, max)
            got = [(out[i].tag, out[i].result) for i in range(n)]
        finally:
            free(out)
        for tag, _ in got:
            self._held.pop(tag, None)
        return got

    def cancel_reads_py(self) -> int:
        cdef int rc
        with nogil:
            rc = self.cancel_reads()
        return rc

    def fence_py(self) -> int:
        cdef int rc
        with nogil:
            rc = self.fence()
        return rc

    # -- teardown --

    def close(self) -> None:
        """Stops the worker and closes the connection; outstanding requests are dropped
        (their buffers freed here, nothing touches the caller's memory afterwards)."""
        self._shutdown()
        self._held.clear()

    cdef void _shutdown(self) noexcept:
        cdef State *st = self.st
        cdef unsigned i
        if st == NULL:
            return
        self.st = NULL
        self.fd = -1
        st.stopping = True
        if st.worker_started:
            _poke(st.wake)
            with nogil:
                pthread_join(st.worker, NULL)
        if st.h != NULL:
            with nogil:
                nbd_close(st.h)  # the socket goes; libnbd runs no callback from here on
        if st.slots != NULL:
            for i in range(st.nslots):
                free(st.slots[i].bounce)
                if st.slots[i].iov != &st.slots[i].inline_iov[0]:
                    free(st.slots[i].iov)
        if st.fd >= 0:
            close(st.fd)
        if st.wake >= 0:
            close(st.wake)
        pthread_cond_destroy(&st.cond)
        pthread_mutex_destroy(&st.qlock)
        pthread_mutex_destroy(&st.hlock)
        free(st.slots)
        free(st.free_stack)
        free(st.fifo)
        free(st.followups)
        free(st.uri)
        free(st)
        self.outstanding = 0

    def __dealloc__(self):
        self._shutdown()

