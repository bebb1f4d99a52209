"""A minimal driver side for ring tests: writes descriptors, rings and event areas by hand.

It packs the spec's structures with ``struct`` straight into guest memory, independently of
both ring cores, so tests can build valid rings and also any hostile byte pattern.
"""

from __future__ import annotations

from emu import ringlayout
from emu.memory import GuestMemory

DESC = ringlayout.DESC

RAM0 = (0x0, 0x20000)  # rings and indirect tables live here
RAM1 = (0x100000, 0x10000)  # buffers; the gap between the two regions is not RAM
BUF = RAM1[0]


def make_memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(*RAM0)
    mem.add_region(*RAM1, backing="anon")
    return mem


def snapshot(mem: GuestMemory) -> list[tuple[bytes, bytes]]:
    """Every byte of guest RAM and every dirty flag, for comparing two memories."""
    return [(r.array.tobytes(), r.dirty.tobytes()) for r in mem.regions]


class SplitBuilder:
    """Driver view of a split ring: descriptor table, avail ring (driver), used ring (device)."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int = 0x1000,
        driver: int = 0x9000,
        device: int = 0xA000,
    ) -> None:
        self.mem, self.size = mem, size
        self.desc_addr, self.driver, self.device = desc, driver, device
        self.avail_idx = 0

    def areas(self) -> tuple[int, int, int]:
        return self.desc_addr, self.driver, self.device

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc_addr + 16 * i, DESC.pack(addr, length, flags, nxt))

    def table(self, at: int, entries: list[tuple[int, int, int, int]]) -> None:
        """An indirect table of (addr, len, flags, next) entries."""
        self.mem.write(at, b"".join(DESC.pack(*e) for e in entries))

    def chain(self, head: int, bufs: list[tuple[int, int, int]]) -> int:
        """Descriptors head, head+1, ... (mod size) linked by NEXT; bufs are (addr, len, flags)."""
        ids = [(head + k) % self.size for k in range(len(bufs))]
        return ringlayout.write_split_chain(self.mem, self.desc_addr, ids, bufs)

    def offer(self, *heads: int, publish: bool = True) -> None:
        self.avail_idx = ringlayout.offer_split(
            self.mem, self.driver, self.size, self.avail_idx, list(heads), publish
        )

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write_int(self.driver + 2, 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_int(self.driver, 2, flags)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_int(self.driver + 4 + 2 * self.size, 2, idx)

    def used_idx(self) -> int:
        return self.mem.read_int(self.device + 2, 2)

    def used_flags(self) -> int:
        return self.mem.read_int(self.device, 2)

    def avail_event(self) -> int:
        return self.mem.read_int(self.device + 4 + 8 * self.size, 2)

    def used(self, i: int) -> tuple[int, int]:
        """Used element i (free-running index): (id, len)."""
        at = self.device + 4 + 8 * (i % self.size)
        return self.mem.read_int(at, 4), self.mem.read_int(at + 4, 4)


class PackedBuilder:
    """Driver view of a packed ring; tracks the driver's next slot and wrap counter."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int = 0x1000,
        driver: int = 0x9000,
        device: int = 0x9004,
    ) -> None:
        self.mem, self.size = mem, size
        self.desc_addr, self.driver, self.device = desc, driver, device
        self.slot, self.wrap = 0, True

    def areas(self) -> tuple[int, int, int]:
        return self.desc_addr, self.driver, self.device

    def raw(self, slot: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        self.mem.write(self.desc_addr + 16 * slot, DESC.pack(addr, length, buf_id, flags))

    def avail_bits(self, wrap: bool) -> int:
        return ringlayout.avail_flags(wrap)

    def offer(self, buf_id: int, bufs: list[tuple[int, int, int]]) -> int:
        """Make one chain available at the driver's next slots; the head's flags go last."""
        self.slot, self.wrap = ringlayout.offer_packed(
            self.mem, self.desc_addr, self.size, self.slot, self.wrap, buf_id, bufs
        )
        return len(bufs)

    def table(self, at: int, entries: list[tuple[int, int, int]]) -> None:
        """A packed indirect table of (addr, len, flags) entries."""
        self.mem.write(at, b"".join(DESC.pack(a, n, 0, f) for a, n, f in entries))

    def read(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) at a slot."""
        return DESC.unpack(self.mem.read(self.desc_addr + 16 * slot, 16))

    def set_driver_event(self, flags: int, off: int = 0, wrap: bool = False) -> None:
        self.mem.write_int(self.driver, 2, off | wrap << 15)
        self.mem.write_int(self.driver + 2, 2, flags)

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device event suppression area."""
        return self.mem.read_int(self.device, 2), self.mem.read_int(self.device + 2, 2)
