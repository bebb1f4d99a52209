"""The reference driver: the guest side of virtio-mmio, in Python, without a VM.

Tests, benchmarks and the demo use it to drive emu's devices through the same registers and
rings a Linux guest would use: split or packed rings, with or without EVENT_IDX and
INDIRECT_DESC, on the modern (v2) or the legacy (v1) transport.

Interrupts: ``VirtioMmioDriver`` installs itself as the transport's ``irq`` callback (any
callback already installed, e.g. a test's counter, is still called after it). When the line
goes high it sets a ``threading.Event``; ``wait`` sleeps on that event, then reads
InterruptStatus and ACKs it, like Linux's ``vm_interrupt``, and polls the used ring.

Guest RAM for rings and buffers comes from a bump allocator; each queue recycles its
buffers by size class, so long runs don't exhaust guest memory.

Stopping (docs/stop.md): ``stop``/``resume`` drive the STOP status bit, ``suspend``/``resume``
virtio 1.4 SUSPEND, ``ring_state``/``inflight``/``set_ring_state`` the extension registers.
``save``/``load`` carry the driver's own state (a real guest keeps it in its RAM) into a
fresh transport or another process, after the VMM restored the device there.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

from emu import ringlayout
from emu.memory import PAGE_SIZE, GuestMemory
from emu.ringdefs import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_USED,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    F_NOTIFICATION_DATA,
    F_RING_PACKED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    USED_F_NO_NOTIFY,
    RingState,
)
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

#: features this driver cannot honour, left out when the caller does not choose features
_UNSUPPORTED = 1 << F_IN_ORDER | 1 << 39  # NOTIF_CONFIG_DATA
_LEGACY_ALIGN = PAGE_SIZE
_MIN_BUF = 64

__all__ = [
    "Completion",
    "DeviceNeedsReset",
    "DriverError",
    "DriverQueue",
    "GuestAllocator",
    "QueueFullError",
    "VirtioMmioDriver",
]


class DriverError(Exception):
    """The device did something a driver cannot go on from."""


class DeviceNeedsReset(DriverError):
    """The device set DEVICE_NEEDS_RESET (and raised a config interrupt)."""


class QueueFullError(DriverError):
    """Not enough free descriptors for the request; poll completions first."""


def _need_event(event: int, new: int, old: int) -> bool:
    """Did the index move past ``event`` going from ``old`` to ``new`` (16-bit, wrapping)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _align(value: int, align: int) -> int:
    return (value + align - 1) & -align


class GuestAllocator:
    """Bump allocator over guest RAM; page 0 is skipped so a zero gpa is always a bug."""

    def __init__(self, mem: GuestMemory, start: int | None = None, end: int | None = None) -> None:
        region = mem.regions[0]
        self.start = region.gpa + PAGE_SIZE if start is None else start
        self.end = region.end if end is None else end
        self.next = self.start

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = _align(self.next, align)
        if gpa + size > self.end:
            raise MemoryError(f"guest allocator full: {size:#x} bytes wanted at {gpa:#x}")
        self.next = gpa + size
        return gpa


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
            total = _align(avail_end, _LEGACY_ALIGN) + 6 + 8 * size
            self.desc = alloc.alloc(total, PAGE_SIZE)
            self.driver = self.desc + 16 * size
            self.device = self.desc + _align(avail_end, _LEGACY_ALIGN)
            self._free_descs = list(range(size - 1, -1, -1))
            self._avail_idx = self._last_used = 0
            mem.write(self.desc, bytes(total))

    # -- making buffers available --

    def free_slots(self) -> int:
        return self._free_slots if self.packed else len(self._free_descs)

    def add(self, out: list[bytes], in_sizes: list[int], *, indirect: bool | None = None) -> int:
        """Queue one request; ``indirect`` forces (True) or forbids (False) an indirect table,
        None uses one for multi-descriptor chains when INDIRECT_DESC was negotiated."""
        n = len(out) + len(in_sizes)
        if n == 0:
            raise ValueError("a request needs at least one buffer")
        use_indirect = self.indirect and n > 1 if indirect is None else indirect
        slots = 1 if use_indirect else n
        if slots > self.free_slots():
            raise QueueFullError(
                f"queue {self.index}: {slots} descriptors wanted, {self.free_slots()} free"
            )
        req = _Request(self._tokens, slots, [])
        self._tokens += 1
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
        if use_indirect:
            table = self._buffer(req, 16 * n)
            self.mem.write(table, ringlayout.indirect_table(segs, self.packed))
            segs = [(table, 16 * n, DESC_F_INDIRECT)]
        if self.packed:
            self._add_packed(req, segs)
        else:
            self._add_split(req, segs)
        self._added += slots
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


class VirtioMmioDriver:
    """Drives one ``MmioTransport`` the way Linux's virtio_mmio + virtio core do.

    ``stop_feature_bit``: where this driver expects the experimental VIRTIO_F_EMU_STOP.
    """

    def __init__(
        self,
        transport: MmioTransport,
        mem: GuestMemory,
        alloc: GuestAllocator | None = None,
        *,
        stop_feature_bit: int = mmio_regs.F_EMU_STOP,
    ) -> None:
        self.transport = transport
        self.mem = mem
        self.alloc = alloc or GuestAllocator(mem)
        self.stop_feature_bit = stop_feature_bit
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0
        self.config_interrupts = 0
        self._backlog: dict[int, list[Completion]] = {}
        self._irq = threading.Event()
        self._chained_irq = transport.irq
        transport.irq = self._on_irq

    def _on_irq(self, level: int) -> None:
        if level:
            self._irq.set()
        if self._chained_irq is not None:
            self._chained_irq(level)

    # -- registers --

    def _read(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def _write(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    @property
    def legacy(self) -> bool:
        return self.transport.version == 1

    @property
    def status(self) -> int:
        return self._read(mmio_regs.STATUS)

    def _add_status(self, bits: int) -> None:
        self._write(mmio_regs.STATUS, self.status | bits)

    # -- initialisation --

    def reset(self) -> None:
        self._write(mmio_regs.STATUS, 0)
        if self.status != 0:
            raise DriverError("device did not reset")
        self.queues.clear()
        self._backlog.clear()
        self.features = 0
        self._irq.clear()

    def init(
        self,
        features: int | None = None,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
    ) -> int:
        """Reset and negotiate features, up to FEATURES_OK; returns the negotiated set."""
        if (
            self._read(mmio_regs.MAGIC_VALUE) != mmio_regs.MAGIC
            or self._read(mmio_regs.DEVICE_ID) == 0
        ):
            raise DriverError("no virtio device behind this transport")
        if packed and self.legacy:
            raise DriverError("the legacy transport has no packed rings")
        self.reset()
        self._add_status(mmio_regs.S_ACKNOWLEDGE)
        self._add_status(mmio_regs.S_DRIVER)
        offered = 0
        for sel in (1, 0):
            self._write(mmio_regs.DEVICE_FEATURES_SEL, sel)
            offered |= self._read(mmio_regs.DEVICE_FEATURES) << (32 * sel)
        wanted = offered & ~_UNSUPPORTED if features is None else features
        for bit, on in (
            (F_RING_PACKED, packed),
            (F_EVENT_IDX, event_idx),
            (F_INDIRECT_DESC, indirect),
        ):
            wanted = wanted | 1 << bit if on else wanted & ~(1 << bit)
        accepted = wanted & offered
        if packed and not accepted >> F_RING_PACKED & 1:
            raise DriverError("device does not offer VIRTIO_F_RING_PACKED")
        for sel in (1, 0):
            self._write(mmio_regs.DRIVER_FEATURES_SEL, sel)
            self._write(mmio_regs.DRIVER_FEATURES, accepted >> (32 * sel) & 0xFFFFFFFF)
        if self.legacy:
            self._write(mmio_regs.GUEST_PAGE_SIZE, PAGE_SIZE)
        else:
            self._add_status(mmio_regs.S_FEATURES_OK)
            if not self.status & mmio_regs.S_FEATURES_OK:
                raise DriverError(f"device refused features {accepted:#x}")
        self.features = accepted
        return accepted

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self._write(mmio_regs.QUEUE_SEL, index)
        if self._read(mmio_regs.QUEUE_PFN if self.legacy else mmio_regs.QUEUE_READY):
            raise DriverError(f"queue {index} is already live")
        max_size = self._read(mmio_regs.QUEUE_SIZE_MAX)
        if max_size == 0:
            raise DriverError(f"queue {index} does not exist")
        size = size or max_size
        q = DriverQueue(
            self.mem,
            self.alloc,
            index,
            size,
            packed=self._has(F_RING_PACKED),
            event_idx=self._has(F_EVENT_IDX),
            indirect=self._has(F_INDIRECT_DESC),
        )
        self._program_queue(q)
        self.queues[index] = q
        return q

    def _program_queue(self, q: DriverQueue, ring_state: RingState | None = None) -> None:
        self._write(mmio_regs.QUEUE_SEL, q.index)
        self._write(mmio_regs.QUEUE_SIZE, q.size)
        if self.legacy:
            self._write(mmio_regs.QUEUE_ALIGN, _LEGACY_ALIGN)
            self._write(mmio_regs.QUEUE_PFN, q.desc // PAGE_SIZE)
            return
        for reg, gpa in (
            (mmio_regs.QUEUE_DESC_LOW, q.desc),
            (mmio_regs.QUEUE_DRIVER_LOW, q.driver),
            (mmio_regs.QUEUE_DEVICE_LOW, q.device),
        ):
            self._write(reg, gpa & 0xFFFFFFFF)
            self._write(reg + 4, gpa >> 32)
        if ring_state is not None:
            self.set_ring_state(q.index, ring_state)
        self._write(mmio_regs.QUEUE_READY, 1)

    def reinit(self, ring_states: dict[int, RingState]) -> None:
        """Initialise a fresh device again, keeping this driver's rings and requests.

        Negotiates the same features, points each queue at its areas in guest RAM and tells
        the device where each ring stands (QueueRingState) before DRIVER_OK: how a driver
        hands its rings to a device that replaced a stopped one.
        """
        queues, backlog = dict(self.queues), dict(self._backlog)  # init() clears both
        self.init(
            self.features,
            packed=self._has(F_RING_PACKED),
            event_idx=self._has(F_EVENT_IDX),
            indirect=self._has(F_INDIRECT_DESC),
        )
        for q in queues.values():
            self._program_queue(q, ring_states.get(q.index))
        self.queues, self._backlog = queues, backlog
        self.driver_ok()

    def driver_ok(self) -> None:
        self._add_status(mmio_regs.S_DRIVER_OK)
        if not self.status & mmio_regs.S_DRIVER_OK:
            raise DriverError("device refused DRIVER_OK")

    # -- requests --

    def submit(self, qidx: int, out: list[bytes], in_sizes: list[int]) -> int:
        q = self.queues[qidx]
        token = q.add(out, in_sizes)
        if q.kick_needed():
            self.kick(qidx)
        return token

    def kick(self, qidx: int) -> None:
        value = qidx
        if self._has(F_NOTIFICATION_DATA):
            value |= self.queues[qidx].notification_data() << 16
        self._write(mmio_regs.QUEUE_NOTIFY, value)

    def wait(self, qidx: int, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        """The next ``count`` completions of queue ``qidx``, sleeping on the interrupt."""
        q = self.queues[qidx]
        got = self._backlog.pop(qidx, [])
        deadline = time.monotonic() + timeout
        try:
            while True:
                got += q.poll()
                if len(got) >= count:
                    break
                if not self._irq.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"queue {qidx}: {len(got)} of {count} completions")
                self._irq.clear()
                self.handle_interrupt()
        finally:
            if len(got) > count:
                self._backlog[qidx] = got[count:]
            elif len(got) < count:
                self._backlog[qidx] = got
        return got[:count]

    def handle_interrupt(self) -> int:
        """Read and ACK InterruptStatus until it stays clear (a level-triggered line)."""
        seen = 0
        while isr := self._read(mmio_regs.INTERRUPT_STATUS):
            self._write(mmio_regs.INTERRUPT_ACK, isr)
            seen |= isr
            if isr & mmio_regs.INT_CONFIG:
                self.config_interrupts += 1
        if seen & mmio_regs.INT_CONFIG and self.status & mmio_regs.S_DEVICE_NEEDS_RESET:
            raise DeviceNeedsReset("device set DEVICE_NEEDS_RESET")
        return seen

    # -- stop, suspend, resume --

    def stop(self, timeout: float = 5.0) -> None:
        """Set STOP and poll Status until it reads back set (the device has quiesced).

        How it quiesces (drain or report) is the device's policy, not the driver's choice;
        afterwards ``inflight`` tells how many chains it holds.
        """
        if not self._has(self.stop_feature_bit):
            raise DriverError("VIRTIO_F_EMU_STOP was not negotiated")
        self._add_status(mmio_regs.S_STOP)
        self._poll_status(mmio_regs.S_STOP, mmio_regs.S_STOP, timeout)

    def suspend(self, timeout: float = 5.0) -> None:
        """virtio 1.4: set SUSPEND, then wait for SUSPEND=1 with DRIVER_OK=0."""
        if not self._has(mmio_regs.F_SUSPEND):
            raise DriverError("VIRTIO_F_SUSPEND was not negotiated")
        self._add_status(mmio_regs.S_SUSPEND)
        self._poll_status(mmio_regs.S_SUSPEND | mmio_regs.S_DRIVER_OK, mmio_regs.S_SUSPEND, timeout)

    def resume(self, timeout: float = 5.0) -> None:
        """Undo ``stop`` (clear STOP) or ``suspend`` (set DRIVER_OK, wait for SUSPEND=0)."""
        status = self.status
        if status & mmio_regs.S_STOP:
            self._write(mmio_regs.STATUS, status & ~mmio_regs.S_STOP)
            self._poll_status(mmio_regs.S_STOP, 0, timeout)
        elif status & mmio_regs.S_SUSPEND:
            self._write(mmio_regs.STATUS, status | mmio_regs.S_DRIVER_OK)
            self._poll_status(
                mmio_regs.S_SUSPEND | mmio_regs.S_DRIVER_OK, mmio_regs.S_DRIVER_OK, timeout
            )
        else:
            raise DriverError(f"device is neither stopped nor suspended (status {status:#x})")

    def _poll_status(self, mask: int, want: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.status) & mask != want:
            if status & mmio_regs.S_DEVICE_NEEDS_RESET:
                raise DeviceNeedsReset(f"device set DEVICE_NEEDS_RESET (status {status:#x})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"status {status:#x}: bits {mask:#x} not {want:#x}")
            time.sleep(0.0005)

    def ring_state(self, qidx: int) -> RingState:
        """QueueRingState of a stopped device, decoded (indexes and wrap counters only)."""
        self._write(mmio_regs.QUEUE_SEL, qidx)
        return mmio_regs.decode_ring_state(
            self._read(mmio_regs.QUEUE_RING_STATE), self._has(F_RING_PACKED)
        )

    def inflight(self, qidx: int) -> int:
        """QueueInflight of a stopped device: chains it fetched and has not used."""
        self._write(mmio_regs.QUEUE_SEL, qidx)
        return self._read(mmio_regs.QUEUE_INFLIGHT)

    def set_ring_state(self, qidx: int, state: RingState) -> None:
        """Before DRIVER_OK: where the device is to continue on this queue."""
        self._write(mmio_regs.QUEUE_SEL, qidx)
        value = mmio_regs.encode_ring_state(state, self._has(F_RING_PACKED))
        self._write(mmio_regs.QUEUE_RING_STATE, value)

    # -- carrying on elsewhere --

    def save(self) -> dict:
        """The driver's own state, picklable (no memory or transport in it)."""
        queues = {
            i: {k: v for k, v in vars(q).items() if k not in ("mem", "alloc")}
            for i, q in self.queues.items()
        }
        alloc = (self.alloc.start, self.alloc.end, self.alloc.next)
        return dict(
            features=self.features,
            stop_feature_bit=self.stop_feature_bit,
            alloc=alloc,
            queues=queues,
            backlog=self._backlog,
        )

    @classmethod
    def load(cls, transport: MmioTransport, mem: GuestMemory, saved: dict) -> VirtioMmioDriver:
        """Carry on from ``save`` over a restored transport and the same guest RAM."""
        start, end, nxt = saved["alloc"]
        alloc = GuestAllocator(mem, start, end)
        alloc.next = nxt
        drv = cls(transport, mem, alloc, stop_feature_bit=saved["stop_feature_bit"])
        drv.features = saved["features"]
        for i, fields in saved["queues"].items():
            q = DriverQueue.__new__(DriverQueue)
            vars(q).update(fields, mem=mem, alloc=alloc)
            drv.queues[i] = q
        drv._backlog = saved["backlog"]
        drv._irq.set()  # an interrupt may be pending from before: look once
        return drv

    # -- configuration space --

    def config_read(self, offset: int, size: int) -> int:
        if size != 8:
            return self.transport.read(mmio_regs.CONFIG + offset, size)
        while True:  # a 64-bit field is two reads: retry if the device changed it between
            gen = 0 if self.legacy else self._read(mmio_regs.CONFIG_GENERATION)
            low = self.transport.read(mmio_regs.CONFIG + offset, 4)
            high = self.transport.read(mmio_regs.CONFIG + offset + 4, 4)
            if self.legacy or gen == self._read(mmio_regs.CONFIG_GENERATION):
                return low | high << 32

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.transport.write(mmio_regs.CONFIG + offset, 4, value & 0xFFFFFFFF)
            self.transport.write(mmio_regs.CONFIG + offset + 4, 4, value >> 32)
        else:
            self.transport.write(mmio_regs.CONFIG + offset, size, value)
