"""LOG_SHMFD and VHOST_F_LOG_ALL: the dirty log a migrating frontend reads.

QEMU 7.2 refuses to migrate a VM with a vhost-user device unless the backend offers both
(a migration blocker: "vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD"), even a
migration of a stopped VM, which is how emu's guests are snapshotted. So they are offered,
and the log is kept correctly, in the simplest way that is safe:

* SET_LOG_BASE (``u64 mmap_size, u64 mmap_offset`` + memfd) maps the log: one bit per
  4 KiB guest-physical page. It is answered with a u64 0 (QEMU waits for a reply). The
  memfd is sealed against shrinking first, and refused if it cannot be (QEMU's comes
  sealed; a shrink under the mapping would be a SIGBUS: docs/vhost-user.md).
* Every write emu makes to guest memory marks its pages in ``GuestMemory``'s dirty maps
  (ring core and devices alike). When a ring stops (GET_VRING_BASE, which QEMU sends
  before its last dirty-log sync) with LOG_ALL negotiated, every marked page is set in
  the log. Marks are cleared only then, with the device thread off the ring: a mark made
  before the data lands (a read into a buffer) is never dropped before the data is there.

Pages are therefore reported at the stop rather than in the live passes: a live
migration stays correct and sends those pages during the downtime. Setting bits is a
plain read-modify-write: QEMU only ever clears bits, so a race can only set a bit it
already took, which costs a page resent, never a page lost.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct

import numpy as np

from emu.memory import PAGE_SHIFT, GuestMemory
from emu.vhost_user.handler import Refused, handles
from emu.vhost_user.protocol import U64, Message, Req, fd_kind
from emu.vhost_user.sealing import seal_shrink

log = logging.getLogger(__name__)

#: the vhost feature bit (in the virtio feature word) that turns logging on
F_LOG_ALL = 26
LOG_BASE = struct.Struct("<QQ")  # mmap_size, mmap_offset
#: a log for 2 TiB of guest RAM; anything larger is not a real frontend's
MAX_LOG = 64 << 20


class DirtyLog:
    """One connection's log: mapped at SET_LOG_BASE, filled by ``flush`` at ring stops."""

    def __init__(self, name: str) -> None:
        self.name = name  # the device's, for the log
        self.mapped: mmap.mmap | None = None

    @handles(Req.SET_LOG_BASE, LOG_BASE.size, (1, 1))
    def set_log_base(self, msg: Message) -> bytes:
        size, offset = LOG_BASE.unpack(msg.payload)
        kind = fd_kind(msg.fds[0])
        if kind not in ("memfd", "file"):
            raise Refused(f"dirty log fd is a {kind}")
        if not 0 < size <= MAX_LOG or offset % mmap.ALLOCATIONGRANULARITY:
            raise Refused(f"dirty log of {size:#x} bytes at offset {offset:#x}")
        fd = msg.fds.pop()
        try:
            if not seal_shrink(fd):  # QEMU's log comes sealed; a shrink would be a SIGBUS
                raise Refused("dirty log file cannot be sealed against shrinking")
            if os.fstat(fd).st_size < offset + size:
                raise Refused(f"dirty log fd is smaller than {offset + size:#x} bytes")
            try:
                mapped = mmap.mmap(
                    fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
            except (OSError, ValueError) as e:  # e.g. a file open for reading only
                raise Refused(f"dirty log cannot be mapped: {e}") from e
        finally:
            os.close(fd)
        self.close()
        self.mapped = mapped
        log.info("vhost-user: %s: dirty log of %#x bytes", self.name, size)
        return U64.pack(0)

    def flush(self, features: int, mem: GuestMemory) -> None:
        """Set the log bits of every page emu wrote, if the frontend asked for logging
        (LOG_ALL in ``features``); call with every ring stopped."""
        if self.mapped is None or not features >> F_LOG_ALL & 1:
            return
        bits = np.frombuffer(self.mapped, dtype=np.uint8)
        limit = len(bits) * 8
        for r in mem.regions:
            pages = np.flatnonzero(r.dirty)
            if not len(pages):
                continue
            pfns = (r.gpa >> PAGE_SHIFT) + pages
            if pfns[-1] >= limit:
                log.warning("vhost-user: dirty pages beyond the log (%d pages)", limit)
                pfns = pfns[pfns < limit]
            np.bitwise_or.at(bits, pfns >> 3, (1 << (pfns & 7)).astype(np.uint8))
            r.dirty[pages] = 0
        del bits  # the mapping stays closable

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None
