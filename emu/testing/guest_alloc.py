"""Guest RAM for the reference drivers' rings and buffers: a bump allocator.

Nothing is ever freed; ``DriverQueue`` recycles its buffers by size class instead, so long
runs don't exhaust guest memory.
"""

from __future__ import annotations

from emu.memory import PAGE_SIZE, GuestMemory


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align`` (a power of 2)."""
    return (value + align - 1) & -align


class GuestAllocator:
    """Bump allocator over guest RAM; page 0 is skipped so a zero gpa is always a bug."""

    def __init__(self, mem: GuestMemory, start: int | None = None, end: int | None = None) -> None:
        region = mem.regions[0]
        self.start = region.gpa + PAGE_SIZE if start is None else start
        self.end = region.end if end is None else end
        self.next = self.start

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = align_up(self.next, align)
        if gpa + size > self.end:
            raise MemoryError(f"guest allocator full: {size:#x} bytes wanted at {gpa:#x}")
        self.next = gpa + size
        return gpa
