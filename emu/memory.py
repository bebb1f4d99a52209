"""Guest physical address space.

Every address a device touches comes from the guest, so every access goes through
``translate``, which refuses anything not wholly inside one region. Regions are mmaps
exposed as numpy arrays so the ring core and backends can work on guest RAM without copies.
Device writes are recorded page by page for live migration.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

PAGE_SIZE = 4096
PAGE_SHIFT = 12
#: the host's page: the unit in which memory can be given back to it (``discard``)
HOST_PAGE = mmap.PAGESIZE
_U64 = 1 << 64


class GuestMemoryError(Exception):
    """An access that falls outside guest RAM (or straddles two regions)."""


@dataclass(eq=False)
class Region:
    """One contiguous piece of guest RAM: [gpa, gpa + size) backed by ``mm``."""

    gpa: int
    size: int
    mm: mmap.mmap
    fd: int = -1  # shareable backing fd (memfd or file), -1 for anonymous memory
    fd_offset: int = 0
    array: np.ndarray = field(init=False, repr=False)
    dirty: np.ndarray = field(init=False, repr=False)
    #: gpa + size, kept as a plain attribute: ``translate`` reads it on every access
    end: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.array = np.frombuffer(self.mm, dtype=np.uint8, count=self.size)
        self.dirty = np.zeros((self.size + PAGE_SIZE - 1) // PAGE_SIZE, dtype=np.uint8)
        self.end = self.gpa + self.size

    def discard(self, offset: int, length: int) -> None:
        """Free the backing of [offset, offset + length) (host-page aligned): a hole is
        punched in the memfd or file (MADV_REMOVE, as fallocate PUNCH_HOLE | KEEP_SIZE),
        so every process mapping it loses those pages; they read as zeros and are
        allocated again when written. OSError when the backing cannot (hugetlbfs in
        pieces smaller than its pages, a file system without holes)."""
        self.mm.madvise(mmap.MADV_REMOVE, offset, length)

    def close(self) -> None:
        del self.array
        try:
            self.mm.close()
        except BufferError:
            # views are still alive somewhere (a pending I/O); the mapping dies with them
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _map(size: int, backing: str | os.PathLike | None) -> tuple[mmap.mmap, int]:
    if backing is None or backing == "memfd":
        # sealable: a vhost-user backend it is shared with seals it against shrinking
        fd = os.memfd_create("emu-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED), fd
    if backing == "anon":
        return mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS), -1
    fd = os.open(os.fspath(backing), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    return mmap.mmap(fd, size, mmap.MAP_SHARED), fd


class GuestMemory:
    """A set of non-overlapping regions forming the guest physical address space."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    @classmethod
    def create(
        cls, size: int, gpa: int = 0, backing: str | os.PathLike | None = "memfd"
    ) -> GuestMemory:
        """One region of ``size`` bytes at ``gpa``; backing is "memfd", "anon" or a path."""
        mem = cls()
        mem.add_region(gpa, size, backing)
        return mem

    def add_region(
        self, gpa: int, size: int, backing: str | os.PathLike | None = "memfd"
    ) -> Region:
        mm, fd = _map(size, backing)
        return self.add_mapped(gpa, size, mm, fd)

    def add_fd_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> Region:
        """Map ``size`` bytes of someone else's fd (vhost-user memory tables); takes the fd,
        which is closed whatever goes wrong."""
        mm = None
        try:
            if offset % mmap.ALLOCATIONGRANULARITY:
                raise GuestMemoryError(f"mmap offset {offset:#x} is not page aligned")
            if os.fstat(fd).st_size < offset + size:
                raise GuestMemoryError(
                    f"region gpa {gpa:#x} size {size:#x} offset {offset:#x} "
                    "lies beyond the end of its file"
                )
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
            return self.add_mapped(gpa, size, mm, fd, offset)
        except BaseException:
            if mm is not None:
                mm.close()
            os.close(fd)
            raise

    def add_mapped(
        self, gpa: int, size: int, mm: mmap.mmap, fd: int = -1, fd_offset: int = 0
    ) -> Region:
        if size <= 0 or gpa < 0 or gpa + size > _U64:
            raise GuestMemoryError(f"bad region gpa {gpa:#x} size {size:#x}")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region [{gpa:#x}, {gpa + size:#x}) overlaps [{r.gpa:#x}, {r.end:#x})"
                )
        region = Region(gpa, size, mm, fd, fd_offset)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def remove_region(self, gpa: int, size: int) -> None:
        for r in self.regions:
            if r.gpa == gpa and r.size == size:
                self.regions.remove(r)
                r.close()
                return
        raise GuestMemoryError(f"no region at gpa {gpa:#x} size {size:#x}")

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions.clear()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- translation: the one gate every guest address passes through --

    def translate(self, gpa: int, length: int) -> tuple[Region, int]:
        """(region, offset) for [gpa, gpa+length), or GuestMemoryError."""
        if gpa < 0 or length < 0 or gpa + length > _U64:
            raise GuestMemoryError(f"access gpa {gpa:#x} len {length:#x} wraps the address space")
        for r in self.regions:
            if r.gpa <= gpa < r.end or (length == 0 and gpa == r.end):
                if gpa + length > r.end:
                    break
                return r, gpa - r.gpa
        raise GuestMemoryError(f"access gpa {gpa:#x} len {length:#x} is outside guest RAM")

    def view(self, gpa: int, length: int, write: bool = False) -> memoryview:
        """Zero-copy view of guest RAM, for preadv/pwritev; ``write`` marks it dirty."""
        r, off = self.translate(gpa, length)
        if write:
            _mark(r, off, length)
        return memoryview(r.mm)[off : off + length]

    def array(self, gpa: int, length: int) -> np.ndarray:
        """Read-only-by-convention numpy view; use ``view(write=True)`` to write."""
        r, off = self.translate(gpa, length)
        return r.array[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self.translate(gpa, length)
        return r.mm[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        r, off = self.translate(gpa, length)
        r.mm[off : off + length] = data
        _mark(r, off, length)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def discard(self, gpa: int, length: int) -> int:
        """Give the host back the pages wholly inside [gpa, gpa + length) (a balloon):
        the range may span regions; the parts outside guest RAM and host pages only
        partly inside are left alone. Returns the bytes given back; OSError from a
        backing that cannot release (``Region.discard``). Not marked dirty: the guest
        gave their contents up."""
        if gpa < 0 or length < 0:
            raise ValueError(f"discard gpa {gpa:#x} len {length:#x}")
        end = gpa + length
        done = 0
        for r in self.regions:
            # offsets into the region, rounded inwards to whole host pages
            lo = -(-(max(gpa, r.gpa) - r.gpa) // HOST_PAGE) * HOST_PAGE
            hi = (min(end, r.end) - r.gpa) // HOST_PAGE * HOST_PAGE
            if lo < hi:
                r.discard(lo, hi - lo)
                done += hi - lo
        return done

    def allocated(self) -> int | None:
        """Bytes of the regions' backing files the host has allocated (st_blocks), each
        file counted once; None without regions or when one has no file (anonymous)."""
        if not self.regions or any(r.fd < 0 for r in self.regions):
            return None
        stats = [os.fstat(r.fd) for r in self.regions]
        return 512 * sum({(st.st_dev, st.st_ino): st.st_blocks for st in stats}.values())

    def mark_dirty(self, gpa: int, length: int) -> None:
        r, off = self.translate(gpa, length)
        _mark(r, off, length)

    # -- dirty tracking (live migration) --

    def get_and_clear_dirty(self) -> list[int]:
        """Guest page frame numbers written by devices since the last call."""
        pfns: list[int] = []
        for r in self.regions:
            pages = np.flatnonzero(r.dirty)
            r.dirty[pages] = 0
            pfns.extend(((pages.astype(np.uint64) << PAGE_SHIFT) + r.gpa >> PAGE_SHIFT).tolist())
        return pfns

    def dirty_bitmap(self, clear: bool = True) -> dict[int, np.ndarray]:
        """Per-region packed bitmaps (bit i = page i), as vhost-user's log expects."""
        out = {}
        for r in self.regions:
            out[r.gpa] = np.packbits(r.dirty, bitorder="little")
            if clear:
                r.dirty[:] = 0
        return out


def _mark(r: Region, off: int, length: int) -> None:
    if length:
        first, last = off >> PAGE_SHIFT, (off + length - 1) >> PAGE_SHIFT
        if first == last:  # the common small write: an item store costs a quarter of a slice's
            r.dirty[first] = 1
        else:
            r.dirty[first : last + 1] = 1


def span(segments: list[tuple[int, int]], start: int, n: int) -> list[tuple[int, int]]:
    """Bytes ``start`` to ``start + n`` of a chain's buffers (``segments``, as (gpa,
    length)) as pieces of guest RAM: fewer bytes when the buffers hold fewer."""
    out = []
    for gpa, k in segments:
        if not n:
            break
        if start >= k:
            start -= k
            continue
        take = min(k - start, n)
        out.append((gpa + start, take))
        n -= take
        start = 0
    return out
