"""INFLIGHT_SHMFD: the shared region recording every chain fetched and not yet used.

The frontend keeps the region across a backend crash and hands it back (SET_INFLIGHT_FD)
to the next backend, which resubmits what was in flight. Layouts are the spec's, one area
per queue, each 64-byte aligned:

* split: header ``u64 features, u16 version, u16 desc_num, u16 last_batch_head,
  u16 used_idx`` and 16-byte ``{u8 inflight, u8 pad[5], u16 next, u64 counter}`` per head.
  Fetch: counter, then inflight=1. Completion of a batch: link it through ``next`` and set
  ``last_batch_head`` (before the used index is published), then clear inflight and set
  ``used_idx`` (after). On recovery a ``used_idx`` behind the ring's means the last batch
  was published but not cleared: it is cleared then.
* packed: header ``u64 features, u16 version, u16 desc_num, u16 free_head,
  u16 old_free_head, u16 used_idx, u16 old_used_idx, u8 used_wrap_counter,
  u8 old_used_wrap_counter, u8 pad[7]`` and 32-byte ``{u8 inflight, u8 pad, u16 next,
  u16 last, u16 num, u64 counter, u16 id, u16 flags, u32 len, u64 addr}`` entries taken
  from a free list: one per buffer of the chain, the first marked inflight with ``num`` =
  ring slots the chain took. Recovery rebuilds the free list from the in-flight chains.

The region's file is sealed against shrinking before it is mapped, and refused if it
cannot be (emu's own and libvhost-user's come sealed; docs/vhost-user.md). Its content
comes from the frontend and is not trusted either: every index read from it is bounds
checked, and recovered chains go through emu's ring core again (split: the guest's own
descriptor table; packed: the recorded buffers as a direct chain) before a device sees
them. ``desc_num`` is the device's largest queue, not the frontend's ``queue_size``, which
can be smaller than the ring really used (QEMU on virtio-mmio: 128 against 1024).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable

from emu import ringlayout
from emu.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from emu.queue import ring_module
from emu.ringdefs import (
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_RING_PACKED,
    Batch,
    InflightChain,
    RingError,
    RingState,
)
from emu.vhost_user._split_inflight import SplitArea
from emu.vhost_user.sealing import seal_shrink

log = logging.getLogger(__name__)

SPLIT_HEAD = struct.Struct("<QHHHH")
SPLIT_DESC = struct.Struct("<B5xHQ")
PACKED_HEAD = struct.Struct("<QHHHHHHBB10x")  # 7 pad bytes, then C aligns desc[] to 8
PACKED_DESC = struct.Struct("<BxHHHQHHIQ")
#: PACKED_HEAD field offsets the request path updates in place
_FREE_HEAD, _OLD_FREE_HEAD, _USED_IDX, _OLD_USED_IDX = 12, 14, 16, 18
_USED_WRAP, _OLD_USED_WRAP = 20, 21
_ALIGN = 64
_END = 0xFFFF  # free-list terminator
#: emu's own region: its size is fixed for good (as libvhost-user seals its regions)
_SEALED = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def queue_area(packed: bool, desc_num: int) -> int:
    head, desc = (PACKED_HEAD, PACKED_DESC) if packed else (SPLIT_HEAD, SPLIT_DESC)
    return -(-(head.size + desc.size * desc_num) // _ALIGN) * _ALIGN


class InflightRegion:
    """The mapped region and one ``QueueInflight`` (a Virtqueue tracker) per queue."""

    def __init__(
        self, fd: int, size: int, offset: int, num_queues: int, desc_num: int, packed: bool
    ) -> None:
        """Maps ``size`` bytes of ``fd`` at ``offset``; takes the fd."""
        self.fd, self.size, self.offset = fd, size, offset
        self.num_queues, self.desc_num, self.packed = num_queues, desc_num, packed
        try:
            area = queue_area(packed, desc_num)
            if size != area * num_queues:
                raise GuestMemoryError(
                    f"inflight region of {size:#x} bytes, {num_queues} queues of "
                    f"{desc_num} need {area * num_queues:#x}"
                )
            if not seal_shrink(fd):  # a shrink under the mapping would be a SIGBUS
                raise GuestMemoryError("inflight region's file cannot be sealed against shrinking")
            if offset % mmap.ALLOCATIONGRANULARITY or os.fstat(fd).st_size < offset + size:
                raise GuestMemoryError("inflight region offset/size outside its file")
            try:
                self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
            except (OSError, ValueError) as e:  # e.g. a file open for writing only
                raise GuestMemoryError(f"inflight region cannot be mapped: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        cls = PackedInflight if packed else SplitInflight
        self.queues = [
            cls(memoryview(self.mm)[i * area : (i + 1) * area], desc_num) for i in range(num_queues)
        ]

    @classmethod
    def create(cls, num_queues: int, desc_num: int, packed: bool) -> InflightRegion:
        size = queue_area(packed, desc_num) * num_queues
        fd = os.memfd_create("emu-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALED)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, 0, num_queues, desc_num, packed)

    def close(self) -> None:
        for q in self.queues:
            q.release()
        self.mm.close()
        os.close(self.fd)


class QueueInflight:
    """One queue's area; the Virtqueue calls fetched/using/used on the request path."""

    def __init__(self, area: memoryview, desc_num: int) -> None:
        self.area = area
        self.desc_num = desc_num
        self.counter = 0
        self.queue_size = desc_num

    def release(self) -> None:
        self.area.release()

    def fetched(self, batch: Batch) -> None:
        raise NotImplementedError

    def using(self, heads: object) -> None:
        raise NotImplementedError

    def used(self, heads: object) -> None:
        raise NotImplementedError


class SplitInflight(QueueInflight):
    """The request path's writes are emu.vhost_user._split_inflight's, in C."""

    def __init__(self, area: memoryview, desc_num: int) -> None:
        self._c = SplitArea(area, desc_num)
        super().__init__(area, desc_num)

    @property
    def counter(self) -> int:
        return self._c.counter

    @counter.setter
    def counter(self, value: int) -> None:
        self._c.counter = value

    def release(self) -> None:
        self._c.close()  # it holds the area
        super().release()

    def _desc(self, head: int) -> int:
        if not 0 <= head < self.desc_num:
            raise GuestMemoryError(f"inflight head {head} >= desc_num {self.desc_num}")
        return SPLIT_HEAD.size + SPLIT_DESC.size * head

    def _head(self) -> tuple[int, int, int, int, int]:
        return SPLIT_HEAD.unpack_from(self.area)

    def fetched(self, batch: Batch) -> None:
        self._c.fetched(batch.heads)

    def using(self, heads: object) -> None:
        """Link the batch: each head's ``next`` is the head before it (the first: itself)."""
        self._c.using(heads)

    def used(self, heads: object) -> None:
        self._c.used(heads)

    def recover(self, ring_used_idx: int) -> list[int]:
        """Heads still in flight, oldest first; initialises an area never used before."""
        _, version, desc_num, last_batch, used_idx = self._head()
        if version == 0:
            SPLIT_HEAD.pack_into(self.area, 0, 0, 1, self.desc_num, 0, ring_used_idx)
            for h in range(self.desc_num):
                SPLIT_DESC.pack_into(self.area, self._desc(h), 0, 0, 0)
            self.counter = 0
            return []
        if desc_num != self.desc_num:
            raise GuestMemoryError(f"inflight area for {desc_num} heads, expected {self.desc_num}")
        # published but not cleared: walk back through the last batch
        head = last_batch
        for _ in range((ring_used_idx - used_idx) & 0xFFFF):
            off = self._desc(head)
            self.area[off] = 0
            head = SPLIT_DESC.unpack_from(self.area, off)[1]
        struct.pack_into("<H", self.area, 14, ring_used_idx)
        live = []
        for h in range(self.desc_num):
            flag, _, counter = SPLIT_DESC.unpack_from(self.area, self._desc(h))
            if flag == 1:
                live.append((counter, h))
        live.sort()
        if live and live[-1][0] == 2**64 - 1:  # the frontend's memory: no next counter
            raise GuestMemoryError("inflight area: a head's counter is at its limit")
        self.counter = live[-1][0] + 1 if live else 0
        return [h for _, h in live]


class PackedInflight(QueueInflight):
    """Packed entries live on a free list; ``slots()`` maps in-flight buffer ids to the
    ring slots each took (the ring's state), which the used index advances by."""

    def __init__(self, area: memoryview, desc_num: int) -> None:
        super().__init__(area, desc_num)
        self.slots: Callable[[], dict[int, int]] = dict
        self._first: dict[int, int] = {}  # buffer id -> its first entry

    def _entry(self, i: int) -> int:
        if not 0 <= i < self.desc_num:
            raise GuestMemoryError(f"inflight entry {i} >= desc_num {self.desc_num}")
        return PACKED_HEAD.size + PACKED_DESC.size * i

    def _set(self, field_off: int, value: int) -> None:
        struct.pack_into("<H", self.area, field_off, value)

    def _get(self, field_off: int) -> int:
        return struct.unpack_from("<H", self.area, field_off)[0]

    def fetched(self, batch: Batch) -> None:
        slots = self.slots()
        for i, buf_id in enumerate(batch.heads.tolist()):
            addr, length, writable = batch.segments(i)
            n = len(addr)
            free = self._get(_FREE_HEAD)
            self._set(_OLD_FREE_HEAD, free)
            entries = []
            for _ in range(n):
                if free == _END:
                    log.warning("vhost-user inflight: no room to record buffer %d", buf_id)
                    return
                entries.append(free)
                free = self._get(self._entry(free) + 2)
            for k, e in enumerate(entries):
                nxt = entries[k + 1] if k + 1 < n else _END
                flags = DESC_F_WRITE if writable[k] else 0
                PACKED_DESC.pack_into(
                    self.area,
                    self._entry(e),
                    0,
                    nxt,
                    entries[-1],
                    slots.get(buf_id, 1),
                    self.counter,
                    buf_id,
                    flags,
                    int(length[k]),
                    int(addr[k]),
                )
            self.area[self._entry(entries[0])] = 1
            self._first[buf_id] = entries[0]
            self._set(_FREE_HEAD, free)
            self.counter += 1

    def using(self, heads: object) -> None:
        self._set(_OLD_USED_IDX, self._get(_USED_IDX))
        self.area[_OLD_USED_WRAP] = self.area[_USED_WRAP]

    def used(self, heads: object) -> None:
        used_idx, wrap = self._get(_USED_IDX), self.area[_USED_WRAP]
        for buf_id in heads.tolist():  # type: ignore[attr-defined]
            first = self._first.pop(buf_id, None)
            if first is None:  # not recorded (no room)
                continue
            off = self._entry(first)
            self.area[off] = 0
            _, _, last, num, *_ = PACKED_DESC.unpack_from(self.area, off)
            self._set(self._entry(last) + 2, self._get(_FREE_HEAD))
            self._set(_FREE_HEAD, first)
            used_idx += num
            if used_idx >= self.queue_size:
                used_idx -= self.queue_size
                wrap ^= 1
        self._set(_USED_IDX, used_idx)
        self.area[_USED_WRAP] = wrap
        self._set(_OLD_FREE_HEAD, self._get(_FREE_HEAD))

    def recover(self, ring_used_idx: int) -> list[InflightChain]:
        """Chains in flight, oldest first, with their buffers; rebuilds the free list."""
        head = PACKED_HEAD.unpack_from(self.area)
        if head[1] == 0 or head[2] != self.desc_num:
            if head[1]:
                log.warning("vhost-user inflight: packed area for %d entries ignored", head[2])
            self._reset(ring_used_idx)
            return []
        live, owned = [], set()
        self._first.clear()
        for i in range(self.desc_num):
            off = self._entry(i)
            if self.area[off] != 1:
                continue
            chain, e = [], i
            for _ in range(self.desc_num):
                _, nxt, _, num, counter, buf_id, flags, length, addr = PACKED_DESC.unpack_from(
                    self.area, self._entry(e)
                )
                if e in owned:
                    raise GuestMemoryError(f"inflight entry {e} belongs to two chains")
                owned.add(e)
                chain.append((addr, length, bool(flags & DESC_F_WRITE)))
                if nxt == _END:
                    break
                e = nxt
            _, _, _, num, counter, buf_id, *_ = PACKED_DESC.unpack_from(self.area, off)
            live.append((counter, InflightChain(buf_id, num, chain)))
            self._first[buf_id] = i
        live.sort(key=lambda t: t[0])
        self.counter = live[-1][0] + 1 if live else 0
        free = [i for i in range(self.desc_num) if i not in owned]
        for k, e in enumerate(free):
            self._set(self._entry(e) + 2, free[k + 1] if k + 1 < len(free) else _END)
        self._set(_FREE_HEAD, free[0] if free else _END)
        self._set(_OLD_FREE_HEAD, self._get(_FREE_HEAD))
        return [c for _, c in live]

    def _reset(self, used_idx: int) -> None:
        PACKED_HEAD.pack_into(self.area, 0, 0, 1, self.desc_num, 0, 0, used_idx, used_idx, 1, 1)
        self._first.clear()
        for i in range(self.desc_num):
            nxt = i + 1 if i + 1 < self.desc_num else _END
            PACKED_DESC.pack_into(self.area, self._entry(i), 0, nxt, 0, 0, 0, 0, 0, 0, 0)
        self.counter = 0


def reparse(
    mem: GuestMemory, features: int, size: int, desc: int | None, chains: list[InflightChain]
) -> list[InflightChain]:
    """Chains recovered from the region, re-read by emu's ring core so the device gets only
    what a live ring would have handed it. Split (``desc`` = the guest's table): the heads
    are looked up in it again. Packed (``desc`` None): each recorded chain is laid out as
    direct descriptors in a private ring. A hostile entry raises RingError."""
    if not chains:
        return []
    packed = desc is None
    features &= ~(1 << F_EVENT_IDX)
    nslots = sum(len(c.segments) for c in chains) if packed else len(chains)
    rsize = max(size, nslots)
    scratch_gpa = -(-max(r.end for r in mem.regions) // PAGE_SIZE) * PAGE_SIZE
    scratch = GuestMemory()
    scratch.regions = list(mem.regions)
    mine = scratch.add_region(scratch_gpa, 3 * PAGE_SIZE + 16 * rsize + 16 * nslots, "anon")
    try:
        drv, dev = scratch_gpa, scratch_gpa + PAGE_SIZE
        tail = scratch_gpa + 2 * PAGE_SIZE
        if packed:
            slot, wrap = 0, True
            for c in chains:
                segs = [(a, n, DESC_F_WRITE if w else 0) for a, n, w in c.segments]
                slot, wrap = ringlayout.offer_packed(scratch, tail, rsize, slot, wrap, c.head, segs)
            ring = ring_module().PackedRing(
                scratch, rsize, tail, drv, dev, features | 1 << F_RING_PACKED
            )
        else:
            ringlayout.offer_split(scratch, drv, size, 0, [c.head for c in chains])
            ring = ring_module().SplitRing(
                scratch, size, desc, drv, tail, features & ~(1 << F_RING_PACKED)
            )
        batch = ring.pop(len(chains))
        if len(batch) != len(chains):
            raise RingError(f"{len(chains)} in-flight chains, {len(batch)} parse")
        ndesc = dict(ring.state().inflight)
        out = []
        for i, c in enumerate(chains):
            addr, length, writable = batch.segments(i)
            segs = list(
                zip(addr.tolist(), length.tolist(), map(bool, writable.tolist()), strict=True)
            )
            out.append(InflightChain(c.head, c.ndesc if packed else ndesc[c.head], segs))
        return out
    finally:
        scratch.regions.remove(mine)
        mine.close()


def restore_state(state: RingState, chains: list[InflightChain]) -> RingState:
    """``state`` with ``chains`` marked in flight (fetch order)."""
    return RingState(
        state.next_avail,
        state.next_used,
        state.avail_wrap,
        state.used_wrap,
        state.signalled_used,
        [(c.head, c.ndesc) for c in chains],
    )
