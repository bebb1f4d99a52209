# cython: language_level=3
"""An interrupt fd: the frontend's eventfd, or (UML) a socket we write a u64 to.

``signal`` runs on the device thread, once per batch of used entries; ``set`` and
``close`` run on the connection's thread. Each method runs whole while holding the GIL
(none of them gives it up: an eventfd write, a non-blocking send and a close never
wait), so an fd is never written after it was closed and its number reused, without a
lock of its own. Writes never block: a full socket or eventfd means the frontend has a
notification pending anyway.
"""

import logging
import os

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

    def __cinit__(self):
        self.fd = -1

    def __init__(self, str what):
        self.what = what

    def __dealloc__(self):
        self._close()

    def set(self, int fd, str kind="eventfd") -> None:
        """Signal ``fd`` from now on (-1: nothing); takes the fd and closes the old one."""
        self._close()
        self.fd = fd
        self.is_socket = kind == "socket"

    cdef void _close(self) noexcept:
        if self.fd >= 0:
            close(self.fd)
        self.fd = -1

    def close(self) -> None:
        self._close()

    @property
    def active(self) -> bool:
        return self.fd >= 0

    cpdef void signal(self):
        cdef uint64_t one = 1
        cdef ssize_t n
        if self.fd < 0:
            return
        if self.is_socket:
            n = send(self.fd, &one, 8, MSG_DONTWAIT | MSG_NOSIGNAL)
        else:
            n = write(self.fd, &one, 8)
        if n < 0 and errno != EAGAIN:
            log.warning("vhost-user: %s fd write failed: %s", self.what, os.strerror(errno))
