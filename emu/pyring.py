"""Pure-Python ring core: the readable reference that the Cython core (``emu._ring``) matches.

Every guest access goes through ``GuestMemory`` (bounds checks, dirty marking), so this is
slow but obviously safe; the differential test drives both cores with the same operations
and requires the same batches, return values, memory bytes, state and error classes.

Rules both cores follow where the spec leaves a choice (checked in this order per chain):

* Split head: ``head >= size`` -> DescriptorIndexError, already in flight -> BufferIdError.
* A chain may be zero or more direct descriptors followed by at most one INDIRECT one (split
  and packed alike). More than ``size`` direct descriptors -> ChainLoopError (that is how a
  NEXT cycle shows up). A NEXT index ``>= size`` (or past the indirect table) ->
  DescriptorIndexError.
* INDIRECT descriptor: inside an indirect table (nested), not negotiated, combined with NEXT,
  or a table length that is 0, not a multiple of 16 or longer than ``size`` entries (the
  spec caps a chain at the queue size) -> IndirectError; table outside RAM ->
  RingAddressError. Its WRITE flag is ignored. Split tables are walked by NEXT from entry 0
  (more than ``len/16`` steps -> ChainLoopError); packed tables are used entry by entry and
  their NEXT flags ignored.
* Each buffer, checked in this order: readable after writable -> DescriptorOrderError; not
  wholly inside one RAM region or wrapping 2^64 -> RingAddressError (zero-length buffers
  are allowed but must still point into RAM); running total > 0xFFFFFFFF -> ChainLengthError.
* Packed: buffer id taken from the last descriptor of the chain; ``id >= size`` or already
  in flight -> BufferIdError. Only the head's AVAIL/USED bits are checked.
* Chains popped before the failing one in the same ``pop`` stay in flight; the ring is
  broken after any RingError anyway.
* Packed used descriptors carry WRITE exactly when their length is non-zero (the spec says
  the length is only valid with WRITE).
* Descriptor budget, ``pop(max_chains, max_descs)``: every 16-byte descriptor read counts
  (main-table entries and packed slots, an INDIRECT one included, and indirect-table
  entries). Before each read, and before a split head is read from the avail ring, a pop
  that already holds a chain and has read ``max_descs`` descriptors stops: the chain under
  way is dropped and stays available (next_avail does not move), and its later
  descriptors are checked by a later pop. So the first chain always pops (it is bounded by
  the per-chain rules above), a batch of two or more chains reads at most ``max_descs``
  descriptors, and ``Batch.walked`` says how many were read. ``None``: no budget;
  negative -> ValueError. Chains sharing a tail (legal one by one) or one indirect table
  cost a walk each, so a full ring of them is quadratic: the budget bounds one pop.

Memory ordering. The Cython core reads and writes guest memory with plain loads and stores
and puts a fence wherever the driver, on another CPU, must see two accesses in order; the
same points are marked "fence (...)" in the code below, and tests/test_ring_order.py keeps
the Cython core's fences where they are. Three kinds:

* acquire: the avail index (split) or the head's flags (packed) are read before what they
  publish (avail entries, descriptors);
* release: used elements / used descriptors are written before the index or first flags
  that publish them;
* full: a publish (used index, re-enabled kicks) is made before the driver's side is read
  (used_event / avail flags / event suppression area, the avail index again).

This core has no fences because it cannot issue one and does not need one against the
drivers it serves: every access is a separate call into GuestMemory (numpy, struct) that no
compiler can move across the next, and a driver in this process (the reference driver,
the tests) is a Python thread that runs only while holding the GIL, whose hand-over
orders everything one thread did before everything the next does. So statement order here
is the order a Python driver observes. Against a driver outside the interpreter (a real
guest over vhost-user), x86-64 keeps loads in order and stores in order, which covers the
acquire and release points, but nothing here guarantees the store -> load order of the
"full" points: serve real guests with the Cython core (the default when it is built).
"""

from __future__ import annotations

import errno
import os
import struct
from itertools import islice

import numpy as np

from emu.memory import GuestMemory, GuestMemoryError, span
from emu.ringdefs import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    MAX_PACKED_SIZE,
    MAX_SPLIT_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_F_NO_NOTIFY,
    AvailIndexError,
    Batch,
    BufferIdError,
    ChainLengthError,
    ChainLoopError,
    DescriptorIndexError,
    DescriptorOrderError,
    IndirectError,
    RingAddressError,
    RingAlignmentError,
    RingState,
)

_DESC = struct.Struct("<QIHH")  # split: addr len flags next / packed: addr len id flags


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) cross ``event`` (all mod 2^16)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _as_1d(values: object, dtype: type) -> np.ndarray:
    a = np.ascontiguousarray(values, dtype)
    if a.ndim != 1:
        raise ValueError("push takes one-dimensional arrays")
    return a


class _OverBudget(Exception):
    """Control flow of one pop: the descriptor budget ran out inside a chain after the first."""


def _budget(max_descs: int | None) -> int | None:
    if max_descs is not None and max_descs < 0:
        raise ValueError(f"max_descs {max_descs} is negative")
    return max_descs


class _Segments:
    """Accumulates one pop's chains as flat lists, checking each buffer as it is added,
    and counts the descriptors read against the pop's budget."""

    def __init__(self, mem: GuestMemory, budget: int | None = None) -> None:
        self.mem = mem
        self.heads: list[int] = []
        self.starts = [0]
        self.addr: list[int] = []
        self.length: list[int] = []
        self.writable: list[int] = []
        self.total = 0
        self.wrote = False
        self.budget = budget
        self.walked = 0

    def spent(self) -> bool:
        """The batch holds a chain and the budget is used up: start or read nothing more."""
        return self.budget is not None and bool(self.heads) and self.walked >= self.budget

    def count(self) -> None:
        """One more descriptor is about to be read."""
        if self.spent():
            raise _OverBudget
        self.walked += 1

    def drop_partial(self) -> None:
        """Forget the segments of a chain that was not finished (it stays available)."""
        cut = self.starts[-1]
        del self.addr[cut:], self.length[cut:], self.writable[cut:]

    def begin(self) -> None:
        self.total, self.wrote = 0, False

    def add(self, addr: int, length: int, flags: int) -> None:
        writable = bool(flags & DESC_F_WRITE)
        if self.wrote and not writable:
            raise DescriptorOrderError(f"readable buffer {addr:#x} after a writable one")
        try:
            self.mem.translate(addr, length)
        except GuestMemoryError as e:
            raise RingAddressError(f"buffer {addr:#x}+{length:#x} is outside guest RAM") from e
        self.total += length
        if self.total > 0xFFFFFFFF:
            raise ChainLengthError("chain is longer than 2^32 - 1 bytes")
        self.addr.append(addr)
        self.length.append(length)
        self.writable.append(writable)
        self.wrote |= writable

    def end(self, head: int) -> None:
        self.heads.append(head)
        self.starts.append(len(self.addr))

    def batch(self) -> Batch:
        return Batch(
            np.array(self.heads, np.uint16),
            np.array(self.starts, np.uint32),
            np.array(self.addr, np.uint64),
            np.array(self.length, np.uint32),
            np.array(self.writable, np.uint8),
            self.walked,
        )


#: buffers one preadv / pwritev takes
IOV_MAX = os.sysconf("SC_IOV_MAX")


class _Ring:
    """Construction checks, in-flight bookkeeping and state, shared by both formats."""

    _ALIGN: tuple[int, int, int]
    _MAX_SIZE: int

    def __init__(
        self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, features: int
    ) -> None:
        if not self._size_ok(size):
            raise RingAlignmentError(f"invalid queue size {size}")
        areas = (desc, driver, device)
        for addr, align in zip(areas, self._ALIGN, strict=True):
            if addr % align:
                raise RingAlignmentError(f"ring area {addr:#x} is not {align}-byte aligned")
        for addr, length in zip(areas, self._area_sizes(size), strict=True):
            try:
                mem.translate(addr, length)
            except GuestMemoryError as e:
                raise RingAddressError(f"ring area {addr:#x}+{length:#x} outside RAM") from e
        self.mem, self.size = mem, size
        self.desc, self.driver, self.device = desc, driver, device
        self.indirect = bool(features >> F_INDIRECT_DESC & 1)
        self.event_idx = bool(features >> F_EVENT_IDX & 1)
        self.in_order = bool(features >> F_IN_ORDER & 1)
        self.next_avail = self.next_used = self.signalled_used = 0
        self.avail_wrap = self.used_wrap = True
        self._inflight: dict[int, int] = {}  # head -> ndesc, insertion order = fetch order
        #: head -> the segments of the chain in flight there, as popped (``segments``)
        self._held: dict[int, list[tuple[int, int, int]]] = {}

    def _size_ok(self, size: int) -> bool:
        return 1 <= size <= self._MAX_SIZE

    def _area_sizes(self, size: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.mem.read(table + 16 * i, 16))

    def _check_indirect(self, addr: int, length: int, flags: int, nested: bool) -> None:
        """An INDIRECT descriptor must be negotiated, alone at the end and sized sanely."""
        if nested:
            raise IndirectError("indirect descriptor inside an indirect table")
        if not self.indirect:
            raise IndirectError("INDIRECT_DESC was not negotiated")
        if flags & DESC_F_NEXT:
            raise IndirectError("descriptor has both INDIRECT and NEXT")
        if length == 0 or length % 16 or length // 16 > self.size:
            raise IndirectError(f"bad indirect table length {length}")
        try:
            self.mem.translate(addr, length)
        except GuestMemoryError as e:
            raise RingAddressError(f"indirect table {addr:#x}+{length:#x} outside RAM") from e

    def _take(self, heads: object, lengths: object) -> list[tuple[int, int, int]]:
        """Remove pushed heads from the in-flight set: (head, len, ndesc), or ValueError."""
        hs = _as_1d(heads, np.uint16).tolist()
        ls = _as_1d(lengths, np.uint32).tolist()
        if len(hs) != len(ls):
            raise ValueError("heads and lengths differ in length")
        if self.in_order:
            if hs != list(islice(self._inflight, len(hs))):
                raise ValueError("IN_ORDER: chains must be pushed in fetch order")
        elif len(set(hs)) != len(hs) or not all(h in self._inflight for h in hs):
            raise ValueError("pushing a head that is not in flight")
        for h in hs:
            self._held.pop(h, None)
        return [(h, n, self._inflight.pop(h)) for h, n in zip(hs, ls, strict=True)]

    def _fetched(self, out: _Segments, head: int, ndesc: int) -> None:
        first = out.starts[-1]
        segs = zip(out.addr[first:], out.length[first:], out.writable[first:], strict=True)
        self._held[head] = [(a, n, int(w)) for a, n, w in segs]
        out.end(head)
        self._inflight[head] = ndesc

    def segments(self, head: int) -> list[tuple[int, int, int]] | None:
        """The (gpa, length, writable) segments of the chain in flight at ``head`` as it
        was popped; None when nothing is in flight there, or a restored chain's are not
        known (``remember``)."""
        if head not in self._inflight or head not in self._held:
            return None
        return list(self._held[head])

    def remember(self, head: int, segments: list[tuple[int, int, int]]) -> None:
        """The segments of a chain restored in flight (``set_state``) at ``head``."""
        if head not in self._inflight:
            raise ValueError(f"head {head} is not in flight")
        held = [(a, n, int(bool(w))) for a, n, w in segments]
        for a, n, _ in held:
            if not (0 <= a < 2**64 and 0 <= n < 2**32):
                raise ValueError(f"chain at head {head}: segment ({a:#x}, {n:#x}) out of range")
        self._held[head] = held

    def gather(self, segments: list[tuple[int, int]], limit: int) -> tuple[bytes | None, int]:
        """The bytes of ``segments`` ((gpa, length) pairs: a popped chain's readable
        buffers) joined, and their count; (None, count) when that is over ``limit``,
        nothing read. GuestMemoryError for a segment outside the guest's RAM."""
        total = sum(n for _, n in segments)
        if total > limit:
            return None, total
        return b"".join([self.mem.read(gpa, n) for gpa, n in segments]), total

    def scatter(self, segments: list[tuple[int, int]], data: bytes) -> None:
        """``data`` into ``segments`` ((gpa, length) pairs: a popped chain's writable
        buffers) front to back, pages marked dirty; ValueError (nothing written) when they
        hold less."""
        room = sum(n for _, n in segments)
        if len(data) > room:
            raise ValueError(f"{len(data)} bytes for {room} of room")
        off = 0
        for gpa, n in segments:
            if off >= len(data):
                break
            piece = data[off : off + n]
            self.mem.write(gpa, piece)
            off += len(piece)

    def readv(self, fd: int, segments: list[tuple[int, int]], start: int, limit: int,
              offset: int) -> int:  # fmt: skip
        """preadv(2) from ``fd`` at ``offset`` straight into ``segments`` ((gpa, length)
        pairs: a chain's writable buffers) from their byte ``start`` on, at most ``limit``
        bytes and IOV_MAX buffers; the count read (pages marked dirty first). EINVAL for a
        negative offset (which os.preadv would take as "the file position")."""
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        views = [self.mem.view(g, n, write=True) for g, n in span(segments, start, limit)]
        return os.preadv(fd, views[:IOV_MAX], offset) if views else 0

    def writev(self, fd: int, segments: list[tuple[int, int]], start: int, size: int,
               offset: int) -> int:  # fmt: skip
        """pwritev(2) of ``size`` bytes of ``segments`` from their byte ``start`` on to
        ``fd`` at ``offset``, IOV_MAX buffers a call, until done or a short write; EINVAL
        for a negative offset."""
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        views = [self.mem.view(g, n) for g, n in span(segments, start, size)]
        done = 0
        for i in range(0, len(views), IOV_MAX):
            part = views[i : i + IOV_MAX]
            n = os.pwritev(fd, part, offset + done)
            done += n
            if n < sum(len(v) for v in part):
                break
        return done

    def inflight(self) -> list[int]:
        return list(self._inflight)

    def state(self) -> RingState:
        return RingState(
            self.next_avail,
            self.next_used,
            self.avail_wrap,
            self.used_wrap,
            self.signalled_used,
            list(self._inflight.items()),
        )

    def _index_limit(self) -> int:
        raise NotImplementedError

    def set_state(self, state: RingState) -> None:
        """Restore device-private state (migration); refuses values that cannot be real."""
        limit = self._index_limit()
        for v in (state.next_avail, state.next_used, state.signalled_used):
            if not 0 <= v < limit:
                raise ValueError(f"ring index {v} out of range")
        heads = [h for h, _ in state.inflight]
        if len(set(heads)) != len(heads):
            raise ValueError("duplicate in-flight head")
        for h, n in state.inflight:
            if not (0 <= h < self.size and 1 <= n <= self.size):
                raise ValueError(f"bad in-flight entry ({h}, {n})")
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self.avail_wrap, self.used_wrap = bool(state.avail_wrap), bool(state.used_wrap)
        self.signalled_used = state.signalled_used
        self._inflight = dict(state.inflight)
        self._held = {}


class SplitRing(_Ring):
    """Split virtqueue: descriptor table, avail ring (driver area), used ring (device area)."""

    _ALIGN = (16, 2, 4)
    _MAX_SIZE = MAX_SPLIT_SIZE

    def _size_ok(self, size: int) -> bool:
        return super()._size_ok(size) and size & (size - 1) == 0

    def _area_sizes(self, size: int) -> tuple[int, int, int]:
        return 16 * size, 6 + 2 * size, 6 + 8 * size

    def _index_limit(self) -> int:
        return 1 << 16

    def _avail_idx(self) -> int:
        return self.mem.read_int(self.driver + 2, 2)

    def pending(self) -> bool:
        return self._avail_idx() != self.next_avail

    def pop(self, max_chains: int, max_descs: int | None = None) -> Batch:
        budget = _budget(max_descs)
        if max_chains <= 0:
            return Batch.empty()
        avail = (self._avail_idx() - self.next_avail) & 0xFFFF
        # fence (acquire): the avail index is read before the entries it publishes
        if avail > self.size:
            raise AvailIndexError(f"avail idx moved by {avail} > queue size {self.size}")
        out = _Segments(self.mem, budget)
        for _ in range(min(avail, max_chains)):
            if out.spent():
                break
            slot = self.next_avail % self.size
            head = self.mem.read_int(self.driver + 4 + 2 * slot, 2)
            if head >= self.size:
                raise DescriptorIndexError(f"head {head} >= queue size {self.size}")
            if head in self._inflight:
                raise BufferIdError(f"head {head} is already in flight")
            out.begin()
            try:
                ndesc = self._walk(head, out)
            except _OverBudget:
                out.drop_partial()
                break
            self._fetched(out, head, ndesc)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
        return out.batch()

    def _walk(self, head: int, out: _Segments) -> int:
        """Follow one chain into ``out``; returns descriptors used in the main table."""
        table, limit, i = self.desc, self.size, head
        steps = ndesc = 0
        nested = False
        while True:
            steps += 1
            if steps > limit:
                raise ChainLoopError(f"chain from head {head} has more than {limit} descriptors")
            out.count()
            addr, length, flags, nxt = self._desc(table, i)
            ndesc += not nested
            if flags & DESC_F_INDIRECT:
                self._check_indirect(addr, length, flags, nested)
                table, limit, i, steps, nested = addr, length // 16, 0, 0, True
                continue
            out.add(addr, length, flags)
            if not flags & DESC_F_NEXT:
                return ndesc
            i = nxt
            if i >= limit:
                raise DescriptorIndexError(f"next index {i} >= {limit}")

    def push(self, heads: np.ndarray, lengths: np.ndarray) -> bool:
        done = self._take(heads, lengths)
        if not done:
            return False
        for head, length, _ in done:
            slot = self.next_used % self.size
            self.mem.write_int(self.device + 4 + 8 * slot, 8, head | length << 32)
            self.next_used = (self.next_used + 1) & 0xFFFF
        # fence (release): the used elements are written before the index that publishes them
        self.mem.write_int(self.device + 2, 2, self.next_used)
        # fence (full): the index is published before the driver's suppression is read
        old, self.signalled_used = self.signalled_used, self.next_used
        if self.event_idx:
            used_event = self.mem.read_int(self.driver + 4 + 2 * self.size, 2)
            return need_event(used_event, self.next_used, old)
        return not self.mem.read_int(self.driver, 2) & AVAIL_F_NO_INTERRUPT

    def set_notify(self, enabled: bool) -> bool:
        if self.event_idx:
            if enabled:
                self.mem.write_int(self.device + 4 + 8 * self.size, 2, self.next_avail)
        else:
            self.mem.write_int(self.device, 2, 0 if enabled else USED_F_NO_NOTIFY)
        # fence (full): kicks are re-enabled before the avail index is read again
        return self.pending()


class PackedRing(_Ring):
    """Packed virtqueue: one descriptor ring plus driver and device event suppression areas."""

    _ALIGN = (16, 4, 4)
    _MAX_SIZE = MAX_PACKED_SIZE

    def _area_sizes(self, size: int) -> tuple[int, int, int]:
        return 16 * size, 4, 4

    def _index_limit(self) -> int:
        return self.size

    def pending(self) -> bool:
        flags = self.mem.read_int(self.desc + 16 * self.next_avail + 14, 2)
        avail, used = bool(flags & DESC_F_AVAIL), bool(flags & DESC_F_USED)
        return avail == self.avail_wrap and used != self.avail_wrap

    def pop(self, max_chains: int, max_descs: int | None = None) -> Batch:
        out = _Segments(self.mem, _budget(max_descs))
        while len(out.heads) < max_chains and not out.spent() and self.pending():
            # fence (acquire): the head's flags are read before the chain they publish
            out.begin()
            try:
                self._walk(out)
            except _OverBudget:
                out.drop_partial()
                break
        return out.batch()

    def _walk(self, out: _Segments) -> None:
        """Follow the chain at next_avail through consecutive slots into ``out``."""
        slot, wrap, steps = self.next_avail, self.avail_wrap, 0
        while True:
            steps += 1
            if steps > self.size:
                raise ChainLoopError(f"chain has more than {self.size} descriptors")
            out.count()
            addr, length, buf_id, flags = self._desc(self.desc, slot)
            if flags & DESC_F_INDIRECT:
                self._check_indirect(addr, length, flags, False)
                for k in range(length // 16):
                    out.count()
                    t_addr, t_len, _, t_flags = self._desc(addr, k)
                    if t_flags & DESC_F_INDIRECT:
                        raise IndirectError("indirect descriptor inside an indirect table")
                    out.add(t_addr, t_len, t_flags)
            else:
                out.add(addr, length, flags)
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
            if not flags & DESC_F_NEXT:
                break
        if buf_id >= self.size:
            raise BufferIdError(f"buffer id {buf_id} >= queue size {self.size}")
        if buf_id in self._inflight:
            raise BufferIdError(f"buffer id {buf_id} is already in flight")
        self._fetched(out, buf_id, steps)
        self.next_avail, self.avail_wrap = slot, wrap

    def push(self, heads: np.ndarray, lengths: np.ndarray) -> bool:
        done = self._take(heads, lengths)
        if not done:
            return False
        first: tuple[int, int] | None = None
        for buf_id, length, ndesc in done:
            at = self.desc + 16 * self.next_used
            flags = (DESC_F_AVAIL | DESC_F_USED if self.used_wrap else 0) | (
                DESC_F_WRITE if length else 0
            )
            self.mem.write(at + 8, struct.pack("<IH", length, buf_id))
            if first is None:
                first = at, flags
            else:
                self.mem.write_int(at + 14, 2, flags)
            self.next_used += ndesc
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
        assert first is not None
        # fence (release): every used descriptor is written before the first one's flags,
        # which publish the whole batch
        self.mem.write_int(first[0] + 14, 2, first[1])
        # fence (full): published before the driver's event suppression area is read
        return self._should_notify()

    def _should_notify(self) -> bool:
        """Driver event suppression, as Linux's virtqueue_kick_prepare_packed mirrored."""
        new = self.next_used
        advanced = (new - self.signalled_used) % self.size or self.size
        self.signalled_used = new
        flags = self.mem.read_int(self.driver + 2, 2) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True  # ENABLE, or a mode we cannot honour: a spurious interrupt is safe
        off_wrap = self.mem.read_int(self.driver, 2)
        event = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self.used_wrap:
            event -= self.size  # the driver's event offset is still in the previous lap
        return need_event(event & 0xFFFF, new, new - advanced)

    def set_notify(self, enabled: bool) -> bool:
        if not enabled:
            self.mem.write_int(self.device + 2, 2, RING_EVENT_FLAGS_DISABLE)
        elif self.event_idx:
            self.mem.write_int(self.device, 2, self.next_avail | self.avail_wrap << 15)
            self.mem.write_int(self.device + 2, 2, RING_EVENT_FLAGS_DESC)
        else:
            self.mem.write_int(self.device + 2, 2, RING_EVENT_FLAGS_ENABLE)
        # fence (full): kicks are re-enabled before the next slot is read again
        return self.pending()
