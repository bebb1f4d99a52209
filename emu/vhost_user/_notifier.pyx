# cython: language_level=3
"""An interrupt fd: the frontend's eventfd, or (UML) a socket we write a u64 to.

``signal`` runs on the device thread, once per batch of used entries; ``set`` and
``close`` run on the connection's thread. A lock of its own (taken without the GIL)
keeps an fd from being written after it was closed and its number reused. The write
itself is done without the GIL: the frontend's call eventfd may be blocking (it can
clear O_NONBLOCK, a flag it shares with us) and full, and then only the device thread
waits, as it must for a frontend that stops reading, never the whole process
(tests/test_hostile_review_inflight3.py). A full socket (MSG_DONTWAIT) or a full
non-blocking eventfd means the frontend has a notification pending anyway.
"""

import logging
import os

from cpython.pythread cimport (
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
    WAIT_LOCK,
)
from libc.errno cimport EAGAIN, errno
from libc.stdint cimport uint64_t
from posix.unistd cimport close, write

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

log = logging.getLogger("emu.vhost_user.vring")


cdef class Notifier:
    cdef readonly str what
    cdef int fd
    cdef bint is_socket
    cdef PyThread_type_lock lock

    def __cinit__(self):
        self.fd = -1
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, str what):
        self.what = what

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef void replace(self, int fd, bint is_socket) noexcept nogil:
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        if self.fd >= 0:
            close(self.fd)
        self.fd, self.is_socket = fd, is_socket
        PyThread_release_lock(self.lock)

    def set(self, int fd, str kind="eventfd") -> None:
        """Signal ``fd`` from now on (-1: nothing); takes the fd and closes the old one."""
        cdef bint is_socket = kind == "socket"
        with nogil:
            self.replace(fd, is_socket)

    def close(self) -> None:
        with nogil:
            self.replace(-1, False)

    @property
    def active(self) -> bool:
        return self.fd >= 0

    cpdef void signal(self):
        cdef uint64_t one = 1
        cdef int err = 0
        with nogil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
            if self.fd >= 0:
                if self.is_socket:
                    if send(self.fd, &one, 8, MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
                        err = errno
                elif write(self.fd, &one, 8) < 0:
                    err = errno
            PyThread_release_lock(self.lock)
        if err and err != EAGAIN:
            log.warning("vhost-user: %s fd write failed: %s", self.what, os.strerror(err))
