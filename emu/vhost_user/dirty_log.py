"""LOG_SHMFD and VHOST_F_LOG_ALL: the dirty log a migrating frontend reads, kept live.

A frontend migrating a running VM (QEMU 7.2's ``vhost_log_global_start``) sends, on
running rings: SET_LOG_BASE (``u64 mmap_size, u64 mmap_offset`` + memfd: one bit per
4 KiB guest-physical page; QEMU waits for the u64 answer), SET_FEATURES with LOG_ALL
(need_reply), then per ring SET_VRING_ADDR with the same ring addresses, flags bit 0
(VHOST_VRING_F_LOG) and ``log_guest_addr`` = the used ring's guest-physical address
(need_reply). It reads the log and clears what it read while the VM runs (live passes),
and a last time after GET_VRING_BASE. It may replace the log with a larger (or smaller)
one mid-migration (another SET_LOG_BASE; it reads the old one once more after our
answer and frees it). On cancel or failure it sends SET_FEATURES without LOG_ALL and
SET_VRING_ADDR with the flag cleared, neither asking for a reply.

While logging is on (LOG_ALL negotiated and a log mapped) every queue of the device has
a ``PageLog`` (``Virtqueue.log``), installed and removed by a command on the device
thread between passes, never under a pass. Device writes mark pages in ``GuestMemory``'s
dirty maps as before (ring core and devices alike); before each publish the marks move
into the log (``before_publish``: a scan of the maps, memcmp over unmarked stretches,
about 2 us for 512 MiB, per batch of used entries, not per request), so a page the
device wrote is in the log before the used entry that lets the guest see it; right
after the publish the used-ring writes are set at ``log_guest_addr`` as the spec says.
The last ring's stop (GET_VRING_BASE) moves what is left (``avail_event`` writes, the
buffers of requests a ``report`` stop left in flight). Logging off costs one ``is None``
per publish. bench/test_bench_blk.py measures both.

A mark is taken (logged and cleared) at the next publish, so it must stand for data that
has landed by then: every backend today completes its writes inside the pass that
marked them (an asynchronous one would have to mark again when its write lands, or the
frontend could copy the page between the bit and the data).

When LOG_ALL turns on, the marks made before are dropped (on the device thread, where
every write a mark stands for has landed): those pages were written before the frontend
started logging, so its first pass copies them anyway. Marks are otherwise kept until
a log takes them, so nothing written while LOG_ALL is on is lost, even before the log
is mapped (QEMU starting a device mid-migration sends LOG_ALL first).

Bits are set with atomic ORs (the native ``emu._ring.log_marks``): QEMU gives every
vhost-user device of a VM the same log, so another backend may be setting bits in the
same byte. The pure-Python fallback (no native core built) is a plain read-modify-write,
safe only for one writer per log.

Refused, each affecting only its own connection: a log fd that is not a memfd or file,
cannot be sealed against shrinking (QEMU's comes sealed; a shrink under the mapping
would be a SIGBUS) or is smaller than ``offset + size``; a log that does not cover
guest memory and the logged used rings; memory added beyond the log while logging.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emu.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from emu.vhost_user.handler import Refused, handles
from emu.vhost_user.protocol import U64, Message, Req, fd_kind
from emu.vhost_user.sealing import seal_shrink
from emu.vhost_user.vring import Vring

if TYPE_CHECKING:
    from emu.devices.base import VirtioDevice

log = logging.getLogger(__name__)

#: the vhost feature bit (in the virtio feature word) that turns logging on
F_LOG_ALL = 26
#: SET_VRING_ADDR flags: log the used ring's writes at ``log_guest_addr``
VRING_F_LOG = 1
LOG_BASE = struct.Struct("<QQ")  # mmap_size, mmap_offset
#: a log for 2 TiB of guest RAM; anything larger is not a real frontend's
MAX_LOG = 64 << 20


def log_marks_py(marks: np.ndarray, bits: Any, gpa: int) -> int:
    """``emu._ring.log_marks`` in numpy (not atomic: one writer per log only)."""
    idx = np.flatnonzero(marks)
    if not len(idx):
        return 0
    out = np.frombuffer(bits, dtype=np.uint8)
    start = gpa + (idx.astype(np.uint64) << np.uint64(PAGE_SHIFT))
    first, last = (
        start >> np.uint64(PAGE_SHIFT),
        (start + np.uint64(PAGE_SIZE - 1)) >> np.uint64(PAGE_SHIFT),
    )
    inside = last < len(out) * 8
    for pages in (first[inside], last[inside]):
        np.bitwise_or.at(out, pages >> np.uint64(3), (1 << (pages & np.uint64(7))).astype(np.uint8))
    marks[idx[inside]] = 0
    return int(np.count_nonzero(~inside))


def log_range_py(bits: Any, gpa: int, length: int) -> int:
    """``emu._ring.log_range`` in numpy (not atomic)."""
    if not length:
        return 0
    out = np.frombuffer(bits, dtype=np.uint8)
    pages = np.arange(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1)
    inside = pages[pages < len(out) * 8]
    np.bitwise_or.at(out, inside >> 3, (1 << (inside & 7)).astype(np.uint8))
    return len(pages) - len(inside)


def log_take_py(bits: Any) -> np.ndarray:
    """``emu._ring.log_take`` in numpy (not atomic: a bit set meanwhile may be lost)."""
    arr = np.frombuffer(bits, dtype=np.uint8)
    taken = np.unpackbits(arr, bitorder="little")
    arr[:] = 0
    return np.flatnonzero(taken).astype(np.uint64)


try:
    from emu._ring import log_marks, log_range, log_take
except ImportError:  # not built: correct for one backend per log
    log_marks, log_range, log_take = log_marks_py, log_range_py, log_take_py


def used_ring_bytes(size: int) -> int:
    """A split ring's used area: flags, idx, ``size`` elements, avail_event."""
    return 6 + 8 * size


class PageLog:
    """What the device thread logs into while logging is on (``Virtqueue.log``)."""

    def __init__(self, mapped: mmap.mmap, mem: GuestMemory, used_at: dict[int, int]) -> None:
        self.mapped = mapped
        self.bits = np.frombuffer(mapped, dtype=np.uint8)
        self.mem = mem
        #: vring index -> log_guest_addr, for rings with VHOST_VRING_F_LOG
        self.used_at = used_at

    def before_publish(self) -> None:
        """Every page marked so far into the log (device thread, or no ring running)."""
        for r in self.mem.regions:
            if log_marks(r.dirty, self.bits, r.gpa):
                # refused at every door (SET_LOG_BASE, LOG_ALL, memory changes): a bug
                log.error("vhost-user: pages written beyond the dirty log at %#x", r.gpa)

    def published(self, q: Any, count: int) -> None:
        """The used-ring writes of the publish just made, at the ring's log address."""
        at = self.used_at.get(q.index)
        if at is None or q.packed:  # packed: its used descriptors are marked, logged next
            return
        used = self.mem.read_int(q.device + 2, 2)
        first = (used - count) % q.size
        bits = self.bits
        log_range(bits, at + 2, 2)  # idx
        if first + count <= q.size:
            log_range(bits, at + 4 + 8 * first, 8 * count)
        else:
            log_range(bits, at + 4 + 8 * first, 8 * (q.size - first))
            log_range(bits, at + 4, 8 * (first + count - q.size))


class LogSession(Protocol):
    """What the log reads of its session (``emu.vhost_user.backend.Session``)."""

    device: VirtioDevice
    vrings: list[Vring]
    vu_features: int

    @property
    def packed(self) -> bool: ...

    @property
    def mem(self) -> GuestMemory: ...


class DirtyLog:
    """One connection's log: SET_LOG_BASE, and the ``PageLog`` the device's queues use."""

    def __init__(self, session: LogSession) -> None:
        self.session = session
        self.mapped: mmap.mmap | None = None
        self.active: PageLog | None = None  # installed on the device's queues

    @property
    def name(self) -> str:
        return self.session.device.name

    @property
    def logging(self) -> bool:
        """LOG_ALL negotiated: the frontend wants every device write logged."""
        return bool(self.session.vu_features >> F_LOG_ALL & 1)

    # -- SET_LOG_BASE --

    @handles(Req.SET_LOG_BASE, LOG_BASE.size, (1, 1))
    def set_log_base(self, msg: Message) -> bytes:
        size, offset = LOG_BASE.unpack(msg.payload)
        kind = fd_kind(msg.fds[0])
        if kind not in ("memfd", "file"):
            raise Refused(f"dirty log fd is a {kind}")
        if not 0 < size <= MAX_LOG or offset % mmap.ALLOCATIONGRANULARITY:
            raise Refused(f"dirty log of {size:#x} bytes at offset {offset:#x}")
        self._require_covers(size)
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
        old, self.mapped = self.mapped, mapped
        self.update()  # the device logs into the new one before the frontend reads the old
        if old is not None:
            _unmap(old)  # no PageLog refers to it any more
        log.info("vhost-user: %s: dirty log of %#x bytes", self.name, size)
        return U64.pack(0)

    # -- what may be logged --

    def _require_covers(self, size: int, memory_end: int | None = None) -> None:
        """Refused unless a log of ``size`` bytes has a bit for every page of guest memory
        (ending at ``memory_end``, default: the table's) and of every logged used ring."""
        pages = size * 8
        mem = self.session.mem
        end = max((r.end for r in mem.regions), default=0) if memory_end is None else memory_end
        if end and (end - 1) >> PAGE_SHIFT >= pages:
            raise Refused(f"dirty log of {size:#x} bytes does not cover guest memory to {end:#x}")
        for vr in self.session.vrings:
            if vr.log_addr is not None and self._ring_end(vr) >> PAGE_SHIFT >= pages:
                raise Refused(f"dirty log of {size:#x} bytes does not cover vring {vr.index}")

    def _ring_end(self, vr: Vring) -> int:
        assert vr.log_addr is not None
        return vr.log_addr + used_ring_bytes(max(vr.num, 1)) - 1

    def check_memory(self, end: int) -> None:
        """Before memory ending at ``end`` is added, while logging: refused if the log does
        not reach it (QEMU grows the log before it adds memory)."""
        if self.logging and self.mapped is not None:
            self._require_covers(len(self.mapped), end)

    def check_ring(self, vr: Vring, log_addr: int) -> None:
        """SET_VRING_ADDR with VHOST_VRING_F_LOG: the used ring's log must fit."""
        if log_addr + used_ring_bytes(max(vr.num, 1)) > 1 << 64:
            raise Refused(f"vring {vr.index}: log address {log_addr:#x} wraps")
        if self.mapped is not None and (
            (log_addr + used_ring_bytes(max(vr.num, 1)) - 1) >> PAGE_SHIFT >= len(self.mapped) * 8
        ):
            raise Refused(f"vring {vr.index}: log address {log_addr:#x} beyond the dirty log")

    def check_features(self, value: int) -> None:
        """SET_FEATURES turning LOG_ALL on: the log (if mapped yet) must cover memory."""
        if value >> F_LOG_ALL & 1 and self.mapped is not None:
            self._require_covers(len(self.mapped))

    # -- the device side --

    def update(self, started_logging: bool = False) -> None:
        """Give the device's queues the log they should use now, on the device thread.

        ``started_logging``: LOG_ALL has just been turned on; marks made before are dropped.
        """
        want = None
        if self.logging and self.mapped is not None:
            used_at = {
                vr.index: vr.log_addr for vr in self.session.vrings if vr.log_addr is not None
            }
            active = self.active
            if active is not None and active.used_at == used_at and active.mapped is self.mapped:
                want = active
            else:
                want = PageLog(self.mapped, self.session.mem, used_at)
        if want is self.active and not started_logging:
            return
        self._install(want, started_logging)

    def _install(self, page_log: PageLog | None, clear: bool) -> None:
        dev, mem = self.session.device, self.session.mem

        def run() -> None:
            if clear:
                for r in mem.regions:
                    r.dirty[:] = 0
            for q in dev.queues:
                q.log = page_log

        dev.call(run)
        self.active = page_log

    def rings_stopped(self) -> None:
        """Every ring is stopped (GET_VRING_BASE, before the frontend's last read):
        whatever is still marked goes into the log."""
        if self.active is not None:
            self.active.before_publish()

    def close(self) -> None:
        if self.active is not None:
            try:
                self._install(None, False)
            except RuntimeError:  # the device is closed: nothing uses the log any more
                self.active = None
        if self.mapped is not None:
            _unmap(self.mapped)
            self.mapped = None


def _unmap(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:  # a PageLog still referenced somewhere: unmapped when it goes
        log.debug("vhost-user: old dirty log still referenced; unmapped later")
