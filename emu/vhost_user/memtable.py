"""The frontend's memory table, mapped as emu ``GuestMemory`` regions.

A frontend describes each region by guest-physical address, size, its own virtual address
(uva) and an offset into the fd it sends. Devices work in guest-physical addresses, as
in-process; ring addresses arrive as uvas and are translated here. Every region is checked
before it is mapped: sizes and ends must not wrap, neither gpa nor uva ranges may overlap
(the uva->gpa map would be ambiguous), and the fd must really hold ``offset + size`` bytes
(``GuestMemory.add_fd_region`` fstats it) so no access can fall outside the file. The file
is sealed against shrinking first where it can be (``sealing``); a file that takes no seal
(UML's RAM) is mapped all the same, and shrinking it would end the process (SIGBUS).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from emu.memory import GuestMemory, GuestMemoryError
from emu.vhost_user.protocol import MEM_REGION
from emu.vhost_user.sealing import seal_shrink

log = logging.getLogger(__name__)

#: GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may build up
MAX_SLOTS = 32
#: largest region accepted: bounds the per-page dirty map a frontend can make us allocate
MAX_REGION = 1 << 40
_U64 = 1 << 64


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    offset: int

    @classmethod
    def unpack(cls, data: bytes, at: int = 0) -> MemRegion:
        return cls(*MEM_REGION.unpack_from(data, at))

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.gpa, self.size, self.uva, self.offset)

    def check(self) -> None:
        if self.size == 0:
            raise GuestMemoryError(f"empty region at gpa {self.gpa:#x}")
        if self.size > MAX_REGION:
            raise GuestMemoryError(f"region of {self.size:#x} bytes is over {MAX_REGION:#x}")
        for what, start in (("gpa", self.gpa), ("uva", self.uva), ("mmap offset", self.offset)):
            if start + self.size > _U64:
                raise GuestMemoryError(f"region {what} {start:#x} + {self.size:#x} wraps")


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class MemoryTable:
    """``mem`` is the one GuestMemory of a connection: rings and devices keep a reference
    to it, so tables change its regions in place rather than replacing it."""

    def __init__(self) -> None:
        self.mem = GuestMemory()
        self.regions: list[MemRegion] = []

    def add(self, region: MemRegion, fd: int) -> None:
        """Map one region; takes ``fd`` (closed on failure too)."""
        try:
            region.check()
            if len(self.regions) >= MAX_SLOTS:
                raise GuestMemoryError(f"all {MAX_SLOTS} memory slots are in use")
            for r in self.regions:
                if _overlap(r.gpa, r.gpa + r.size, region.gpa, region.gpa + region.size):
                    raise GuestMemoryError(f"region gpa {region.gpa:#x} overlaps {r.gpa:#x}")
                if _overlap(r.uva, r.uva + r.size, region.uva, region.uva + region.size):
                    raise GuestMemoryError(f"region uva {region.uva:#x} overlaps {r.uva:#x}")
            sealed = seal_shrink(fd)  # before add_fd_region checks the size
        except BaseException:
            os.close(fd)
            raise
        try:
            self.mem.add_fd_region(region.gpa, region.size, fd, region.offset)
        except (OSError, ValueError) as e:  # add_fd_region has closed the fd
            raise GuestMemoryError(f"cannot map region gpa {region.gpa:#x}: {e}") from e
        self.regions.append(region)
        log.info(
            "vhost-user: mapped gpa %#x size %#x uva %#x offset %#x%s",
            region.gpa,
            region.size,
            region.uva,
            region.offset,
            "" if sealed else " (its file cannot be sealed against shrinking)",
        )

    def remove(self, region: MemRegion) -> None:
        for r in self.regions:
            if (r.gpa, r.size, r.uva) == (region.gpa, region.size, region.uva):
                self.regions.remove(r)
                self.mem.remove_region(r.gpa, r.size)
                return
        raise GuestMemoryError(f"no region gpa {region.gpa:#x} size {region.size:#x} to remove")

    def replace(self, regions: list[MemRegion], fds: list[int]) -> None:
        """SET_MEM_TABLE: the new table replaces the old one; takes every fd."""
        self.clear()
        for i, (region, fd) in enumerate(zip(regions, fds, strict=True)):
            try:
                self.add(region, fd)
            except BaseException:
                for rest in fds[i + 1 :]:
                    os.close(rest)
                self.clear()
                raise

    def clear(self) -> None:
        self.mem.close()
        self.regions.clear()

    def to_gpa(self, uva: int, length: int) -> int:
        """Guest-physical address of [uva, uva + length), which must lie in one region."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return uva - r.uva + r.gpa
        raise GuestMemoryError(f"address {uva:#x} (+{length:#x}) is not in the memory table")
