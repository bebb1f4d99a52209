"""The driver's side of a split or packed ring, byte by byte: one writer for everything
that has to make chains available (the reference driver, the ring tests, the vhost-user
in-flight reparse), so the layout the ring cores read is written in one place.

Segments are ``(addr, length, flags)`` with only WRITE / INDIRECT in ``flags``; NEXT and
the packed AVAIL/USED bits are added here. Publication follows the spec's order: split
writes the avail entries before avail->idx, packed writes a chain's head flags last.
"""

from __future__ import annotations

import struct

from emu.memory import GuestMemory
from emu.ringdefs import DESC_F_AVAIL, DESC_F_NEXT, DESC_F_USED

#: split: addr len flags next; packed: addr len id flags
DESC = struct.Struct("<QIHH")

Segment = tuple[int, int, int]


def indirect_table(segs: list[Segment], packed: bool) -> bytes:
    """An indirect table for ``segs``: split entries linked by NEXT, packed ones in order
    (only WRITE counts in a packed table)."""
    if packed:
        return b"".join(DESC.pack(a, n, 0, f) for a, n, f in segs)
    last = len(segs) - 1
    return b"".join(
        DESC.pack(a, n, f | (DESC_F_NEXT if i < last else 0), i + 1 if i < last else 0)
        for i, (a, n, f) in enumerate(segs)
    )


def write_split_chain(mem: GuestMemory, desc: int, ids: list[int], segs: list[Segment]) -> int:
    """Descriptor ``ids[k]`` gets segment k, linked to ``ids[k+1]``; returns the head."""
    for k, (addr, length, flags) in enumerate(segs):
        more = k + 1 < len(segs)
        flags |= DESC_F_NEXT if more else 0
        mem.write(desc + 16 * ids[k], DESC.pack(addr, length, flags, ids[k + 1] if more else 0))
    return ids[0]


def offer_split(
    mem: GuestMemory, driver: int, size: int, idx: int, heads: list[int], publish: bool = True
) -> int:
    """Put ``heads`` in the avail ring from free-running index ``idx``; then publish the
    new avail->idx (unless told not to). Returns the new index."""
    for h in heads:
        mem.write_int(driver + 4 + 2 * (idx % size), 2, h)
        idx = (idx + 1) & 0xFFFF
    if publish:
        mem.write_int(driver + 2, 2, idx)
    return idx


def avail_flags(wrap: bool) -> int:
    """The AVAIL/USED pair that marks a packed descriptor available in wrap ``wrap``."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


def offer_packed(
    mem: GuestMemory, desc: int, size: int, slot: int, wrap: bool, buf_id: int, segs: list[Segment]
) -> tuple[int, bool]:
    """Make one chain available from ``slot``; the head's flags are written last.

    Returns the driver's next (slot, wrap).
    """
    head_at, head_flags = slot, 0
    for k, (addr, length, flags) in enumerate(segs):
        flags |= (DESC_F_NEXT if k + 1 < len(segs) else 0) | avail_flags(wrap)
        if k == 0:
            head_flags = flags
            mem.write(desc + 16 * slot, DESC.pack(addr, length, buf_id, 0)[:14])
        else:
            mem.write(desc + 16 * slot, DESC.pack(addr, length, buf_id, flags))
        slot += 1
        if slot == size:
            slot, wrap = 0, not wrap
    mem.write_int(desc + 16 * head_at + 14, 2, head_flags)  # publish last
    return slot, wrap
