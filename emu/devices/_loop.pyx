# cython: language_level=3
"""The device thread's wait, in C (VirtioDevice.serve_parked).

While a device is RUNNING with nothing pending and nothing due by time, VirtioDevice._run
would park in epoll, and come back to its Python loop for every kick and every batch of
completions. This waits in the same epoll instead and, for the fds it is given, does
what that loop would: a queue's kick is a pass (``begin_pass``, ``handle_queue``, the
failure handling of ``_serve_pass``), a deferred's completion fd is its
``publish_done()``. It holds the device's ownership token only while serving, as the
Python loop does, and returns, leaving the event to the Python loop's poll (epoll is
level-triggered), as soon as any other fd is ready (the wake eventfd: commands, backend
input, a borrowed stop still STOPPING) or a queue may not be served here (not RUNNING, a
command queued, the queue stopped or its gate not OPEN, its deferred replaced, its pass
budget spent).
"""

from libc.errno cimport EOPNOTSUPP, errno
from libc.stdint cimport uint32_t, uint64_t
from posix.uio cimport iovec
from posix.unistd cimport close, read

from emu._poll cimport POLLIN, poll, pollfd


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long offset, int flags)

cdef extern from "<linux/fs.h>" nogil:
    int RWF_NOWAIT


cdef void clear_kick(int fd) noexcept nogil:
    """Virtqueue.clear_kick: take the count if there is one, never wait for it. The
    frontend's kick eventfd may be blocking (it can clear O_NONBLOCK on its side, which
    ours shares) and may be another ring's too, whose read took the count: RWF_NOWAIT
    makes this read non-blocking whatever the file's flags (a kernel without it for
    eventfds: look first, then read)."""
    cdef uint64_t junk
    cdef iovec iov
    cdef pollfd pfd
    iov.iov_base = &junk
    iov.iov_len = 8
    if preadv2(fd, &iov, 1, -1, RWF_NOWAIT) >= 0 or errno != EOPNOTSUPP:
        return
    pfd.fd = fd
    pfd.events = POLLIN
    if poll(&pfd, 1, 0) > 0:
        read(fd, &junk, 8)


def serve_parked(dev, int ep_fd, owner, dict fds, running, open_gate) -> None:
    """``fds``: a queue's kick fd -> (queue, its deferred or None, True, its
    ``native_pass`` or None), a deferred's completion fd -> (queue, deferred, False, None).
    ``running`` / ``open_gate``: RunState.RUNNING and Gate.OPEN. Entered and left with
    ``owner`` released."""
    cdef epoll_event evs[16]
    cdef int n, k, fd
    while True:
        with nogil:
            n = epoll_wait(ep_fd, evs, 16, -1)
        if n < 0:
            return  # EINTR: the Python loop polls again
        for k in range(n):
            if evs[k].data.fd not in fds:
                return
        owner.acquire()
        try:
            for k in range(n):
                fd = evs[k].data.fd
                q, deferred, kick, native = fds[fd]
                if (dev.run_state is not running or dev._commands or q.ring is None
                        or q.gate is not open_gate or q.deferred is not deferred):
                    return
                if not kick:
                    deferred.publish_done()
                    continue
                with nogil:
                    clear_kick(fd)
                q.begin_pass()
                dev._in_pass = True
                try:
                    if native is None:
                        dev.handle_queue(q)
                    else:
                        native()
                except Exception as e:
                    dev.queue_failed(q, e)
                    return
                finally:
                    dev._in_pass = False
                if q.more and q.ring is not None:  # budget spent: the Python loop goes on
                    dev._pending[q.index] = q
                    return
            if dev.run_state is not running:
                # what the pass or the publish set off (a stop the VMM asked for from its
                # interrupt callback runs inline): the Python loop keeps its deadline
                return
        finally:
            owner.release()


cdef extern from "<sys/timerfd.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    struct itimerspec:
        timespec it_interval
        timespec it_value
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)
    int TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME

cdef extern from "<time.h>" nogil:
    int CLOCK_MONOTONIC


cdef class HoldTimer:
    """The device loop's alarm for held interrupts (Virtqueue.interrupt): a timerfd on
    CLOCK_MONOTONIC, time.monotonic()'s clock, so a deadline taken there is one here; it
    needs microseconds, which an epoll timeout (milliseconds) cannot say."""

    cdef readonly int fd
    cdef double armed_at  # 0: not armed

    def __cinit__(self):
        self.fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, "timerfd_create failed")
        self.armed_at = 0

    def arm(self, double deadline) -> None:
        """Fire at ``deadline`` (time.monotonic() seconds), unless already due sooner."""
        cdef itimerspec t
        if self.armed_at and self.armed_at <= deadline:
            return
        t.it_interval.tv_sec = t.it_interval.tv_nsec = 0
        t.it_value.tv_sec = <long>deadline
        t.it_value.tv_nsec = max(1, <long>((deadline - t.it_value.tv_sec) * 1e9))
        if timerfd_settime(self.fd, TFD_TIMER_ABSTIME, &t, NULL) < 0:
            raise OSError(errno, "timerfd_settime failed")
        self.armed_at = deadline

    def clear(self) -> None:
        """After it fired: take the expiry count, and forget the deadline."""
        cdef uint64_t junk
        read(self.fd, &junk, 8)
        self.armed_at = 0

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
