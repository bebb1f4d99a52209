"""The guest side of one virtqueue, split or packed: what a driver writes and reads in RAM.

Shared by the reference drivers over virtio-mmio (``emu.testing.driver``) and over
vhost-user (``emu.testing.vhost_user``): requests in (``add``), notifications
(``kick_needed``, EVENT_IDX or flags), completions out (``poll``), with or without
INDIRECT_DESC. Rings and buffers come from a ``GuestAllocator``; buffers are recycled by
size class.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emu import ringlayout
from emu.memory import PAGE_SIZE, GuestMemory
from emu.ringdefs import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_USED,
    DESC_F_WRITE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    USED_F_NO_NOTIFY,
)
from emu.testing.guest_alloc import GuestAllocator, align_up

#: the split ring's one-block layout aligns the used ring to this (legacy QueueAlign)
LEGACY_ALIGN = PAGE_SIZE
_MIN_BUF = 64


class DriverError(Exception):
    """The device did something a driver cannot go on from."""


class QueueFullError(DriverError):
    """Not enough free descriptors for the request; poll completions first."""


def _need_event(event: int, new: int, old: int) -> bool:
    """Did the index move past ``event`` going from ``old`` to ``new`` (16-bit, wrapping)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass
class Completion:
    token: int  # what add()/submit() returned
    length: int  # used length written by the device
    data: bytes  # the device-writable buffers' bytes concatenated (full in_sizes)


@dataclass
class _Request:
    token: int
    slots: int  # ring descriptors the chain took
    descs: list[int]  # split: descriptor indices to free
    bufs: list[tuple[int, int]] = field(default_factory=list)  # (gpa, size class) to recycle
    ins: list[tuple[int, int]] = field(default_factory=list)  # writable (gpa, size)
    indirect: bool = False  # the chain goes in an indirect table


class DriverQueue:
    """Guest side of one virtqueue, split or packed."""

    def __init__(
        self,
        mem: GuestMemory,
        alloc: GuestAllocator,
        index: int,
        size: int,
        *,
        packed: bool,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        self.mem = mem
        self.alloc = alloc
        self.index = index
        self.size = size
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect
        self._free_bufs: dict[int, list[int]] = {}
        self._inflight: dict[int, _Request] = {}
        self._tokens = 0
        self._added = 0  # slots made available since the last kick_needed()
        if packed:
            self.desc = alloc.alloc(16 * size, 16)
            self.driver = alloc.alloc(4, 4)
            self.device = alloc.alloc(4, 4)
            self._next_avail = self._next_used = 0
            self._avail_wrap = self._used_wrap = 1
            self._free_slots = size
            self._free_ids = list(range(size - 1, -1, -1))
            mem.write(self.desc, bytes(16 * size))
            mem.write(self.driver, bytes(4))
            mem.write(self.device, bytes(4))
        else:
            # the legacy layout (one block, used ring page aligned) suits the modern
            # transport as well, so both share it
            avail_end = 16 * size + 6 + 2 * size
            total = align_up(avail_end, LEGACY_ALIGN) + 6 + 8 * size
            self.desc = alloc.alloc(total, PAGE_SIZE)
            self.driver = self.desc + 16 * size
            self.device = self.desc + align_up(avail_end, LEGACY_ALIGN)
            self._free_descs = list(range(size - 1, -1, -1))
            self._avail_idx = self._last_used = 0
            mem.write(self.desc, bytes(total))

    def start_at(self, index: int, wrap: bool = True) -> None:
        """Take over a ring whose saved state has both indexes at ``index`` (and, packed,
        both wrap counters at ``wrap``): nothing in flight, as after a drained stop. What
        a driver restored from a snapshot hands a fresh device.

        Split: the avail and used indexes in RAM and both event fields are ``index``, so
        the first request made available needs a kick and the first used one an
        interrupt. Packed: every descriptor looks used in the lap it was last used in
        (the slots before ``index`` in this lap, the others in the one before), so none
        is available to the device and none looks newly used to the driver."""
        if self._inflight:
            raise DriverError(f"queue {self.index}: start_at takes a ring with nothing in flight")
        if self.packed:
            if not 0 <= index < self.size:
                raise DriverError(f"queue {self.index}: slot {index} beyond {self.size}")
            this_lap = DESC_F_AVAIL | DESC_F_USED if wrap else 0
            last_lap = this_lap ^ (DESC_F_AVAIL | DESC_F_USED)
            for slot in range(self.size):
                flags = this_lap if slot < index else last_lap
                self.mem.write(self.desc + 16 * slot + 14, struct.pack("<H", flags))
            self._next_avail = self._next_used = index
            self._avail_wrap = self._used_wrap = int(wrap)
            return
        index &= 0xFFFF
        self._avail_idx = self._last_used = index
        for gpa in (
            self.driver + 2,  # avail idx
            self.driver + 4 + 2 * self.size,  # used_event
            self.device + 2,  # used idx
            self.device + 4 + 8 * self.size,  # avail_event
        ):
            self.mem.write(gpa, struct.pack("<H", index))

    # -- making buffers available --

    def free_slots(self) -> int:
        return self._free_slots if self.packed else len(self._free_descs)

    def add(self, out: list[bytes], in_sizes: list[int], *, indirect: bool | None = None) -> int:
        """Queue one request; ``indirect`` forces (True) or forbids (False) an indirect table,
        None uses one for multi-descriptor chains when INDIRECT_DESC was negotiated."""
        req = self._request(len(out) + len(in_sizes), indirect)
        segs: list[tuple[int, int, int]] = []
        for data in out:
            gpa = self._buffer(req, len(data))
            self.mem.write(gpa, data)
            segs.append((gpa, len(data), 0))
        for size in in_sizes:
            gpa = self._buffer(req, size)
            self.mem.write(gpa, bytes(size))
            req.ins.append((gpa, size))
            segs.append((gpa, size, DESC_F_WRITE))
        return self._offer(req, segs)

    def add_segments(
        self, segments: list[tuple[int, int, bool]], *, indirect: bool | None = None
    ) -> int:
        """Queue one chain of (gpa, length, writable) buffers the caller laid out in guest
        RAM itself (a balloon's free pages), unchecked: nothing is copied or recycled,
        and the completion's ``data`` is empty."""
        req = self._request(len(segments), indirect)
        segs = [(gpa, n, DESC_F_WRITE if w else 0) for gpa, n, w in segments]
        return self._offer(req, segs)

    def _request(self, n: int, indirect: bool | None) -> _Request:
        if n == 0:
            raise ValueError("a request needs at least one buffer")
        use_indirect = self.indirect and n > 1 if indirect is None else indirect
        slots = 1 if use_indirect else n
        if slots > self.free_slots():
            raise QueueFullError(
                f"queue {self.index}: {slots} descriptors wanted, {self.free_slots()} free"
            )
        req = _Request(self._tokens, slots, [], indirect=use_indirect)
        self._tokens += 1
        return req

    def _offer(self, req: _Request, segs: list[tuple[int, int, int]]) -> int:
        n = len(segs)
        if req.indirect:
            table = self._buffer(req, 16 * n)
            self.mem.write(table, ringlayout.indirect_table(segs, self.packed))
            segs = [(table, 16 * n, DESC_F_INDIRECT)]
        if self.packed:
            self._add_packed(req, segs)
        else:
            self._add_split(req, segs)
        self._added += req.slots
        return req.token

    def _buffer(self, req: _Request, size: int) -> int:
        cls = max(_MIN_BUF, 1 << (size - 1).bit_length())
        free = self._free_bufs.get(cls)
        gpa = free.pop() if free else self.alloc.alloc(cls, 16)
        req.bufs.append((gpa, cls))
        return gpa

    def _add_split(self, req: _Request, segs: list[tuple[int, int, int]]) -> None:
        req.descs = [self._free_descs.pop() for _ in segs]
        head = ringlayout.write_split_chain(self.mem, self.desc, req.descs, segs)
        self._inflight[head] = req
        self._avail_idx = ringlayout.offer_split(
            self.mem, self.driver, self.size, self._avail_idx, [head]
        )

    def _add_packed(self, req: _Request, segs: list[tuple[int, int, int]]) -> None:
        buf_id = self._free_ids.pop()
        self._inflight[buf_id] = req
        slot, wrap = ringlayout.offer_packed(
            self.mem, self.desc, self.size, self._next_avail, bool(self._avail_wrap), buf_id, segs
        )
        self._next_avail, self._avail_wrap = slot, int(wrap)
        self._free_slots -= len(segs)

    # -- notifications --

    def kick_needed(self) -> bool:
        """Does the device want a notification for what was added since the last call?"""
        added, self._added = self._added, 0
        if self.packed:
            new = self._next_avail
            old = (new - added) & 0xFFFF
            off_wrap, flags = struct.unpack("<HH", self.mem.read(self.device, 4))
            if flags != RING_EVENT_FLAGS_DESC:
                return flags != RING_EVENT_FLAGS_DISABLE
            event = off_wrap & 0x7FFF
            if off_wrap >> 15 != self._avail_wrap:
                event -= self.size
            return _need_event(event & 0xFFFF, new, old)
        new = self._avail_idx
        old = (new - added) & 0xFFFF
        if self.event_idx:
            avail_event = self.mem.read_int(self.device + 4 + 8 * self.size, 2)
            return _need_event(avail_event, new, old)
        return not self.mem.read_int(self.device, 2) & USED_F_NO_NOTIFY

    def notification_data(self) -> int:
        """The upper 16 bits of a VIRTIO_F_NOTIFICATION_DATA notify: next_off | next_wrap."""
        if self.packed:
            return self._next_avail | self._avail_wrap << 15
        return self._avail_idx

    # -- collecting used buffers --

    def poll(self) -> list[Completion]:
        """Everything the device has used so far; re-arms the used-buffer interrupt."""
        done: list[Completion] = []
        while True:
            if self.packed:
                self._poll_packed(done)
            else:
                self._poll_split(done)
            if not self._rearm():
                return done

    def _poll_split(self, done: list[Completion]) -> None:
        used_idx = self.mem.read_int(self.device + 2, 2)
        if (used_idx - self._last_used) & 0xFFFF > self.size:
            raise DriverError(f"queue {self.index}: used idx jumped to {used_idx}")
        while self._last_used != used_idx:
            elem = self.device + 4 + 8 * (self._last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(elem, 8))
            req = self._complete(head, length, done)
            self._free_descs.extend(reversed(req.descs))
            self._last_used = (self._last_used + 1) & 0xFFFF

    def _poll_packed(self, done: list[Completion]) -> None:
        while True:
            gpa = self.desc + 16 * self._next_used
            _, length, buf_id, flags = ringlayout.DESC.unpack(self.mem.read(gpa, 16))
            used = bool(flags & DESC_F_USED)
            if used != bool(flags & DESC_F_AVAIL) or used != bool(self._used_wrap):
                return
            req = self._complete(buf_id, length, done)
            self._free_ids.append(buf_id)
            self._free_slots += req.slots
            self._next_used += req.slots
            if self._next_used >= self.size:
                self._next_used -= self.size
                self._used_wrap ^= 1

    def _complete(self, key: int, length: int, done: list[Completion]) -> _Request:
        req = self._inflight.pop(key, None)
        if req is None:
            raise DriverError(f"queue {self.index}: device used buffer {key}, not in flight")
        data = b"".join(self.mem.read(gpa, size) for gpa, size in req.ins)
        done.append(Completion(req.token, length, data))
        for gpa, cls in req.bufs:
            self._free_bufs.setdefault(cls, []).append(gpa)
        return req

    def _rearm(self) -> bool:
        """Ask for an interrupt at the next used buffer; True if one slipped in meanwhile."""
        if not self.event_idx:
            return False
        if self.packed:
            off_wrap = self._next_used | self._used_wrap << 15
            self.mem.write(self.driver, struct.pack("<HH", off_wrap, RING_EVENT_FLAGS_DESC))
            flags = self.mem.read_int(self.desc + 16 * self._next_used + 14, 2)
            used = bool(flags & DESC_F_USED)
            return used == bool(flags & DESC_F_AVAIL) == bool(self._used_wrap)
        self.mem.write_int(self.driver + 4 + 2 * self.size, 2, self._last_used)
        return self.mem.read_int(self.device + 2, 2) != self._last_used


class QueueUser:
    """``submit`` and ``wait`` over a driver's queues, whatever carries kicks and
    interrupts: the transport's driver supplies ``kick`` and ``sleep``."""

    queues: dict[int, DriverQueue]
    _backlog: dict[int, list[Completion]]
    #: notify the device of queue ``qidx``
    kick: Callable[[int], None]
    #: sleep until queue ``qidx`` may have news (interrupt, call eventfd); False on timeout
    sleep: Callable[[int, float], bool]

    def submit(self, qidx: int, out: list[bytes], in_sizes: list[int]) -> int:
        q = self.queues[qidx]
        token = q.add(out, in_sizes)
        if q.kick_needed():
            self.kick(qidx)
        return token

    def wait(self, qidx: int, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        """The next ``count`` completions of queue ``qidx``."""
        q = self.queues[qidx]
        got = self._backlog.pop(qidx, [])
        deadline = time.monotonic() + timeout
        try:
            while True:
                got += q.poll()
                if len(got) >= count:
                    break
                if not self.sleep(qidx, max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"queue {qidx}: {len(got)} of {count} completions")
        finally:
            if len(got) > count:
                self._backlog[qidx] = got[count:]
            elif len(got) < count:
                self._backlog[qidx] = got
        return got[:count]
