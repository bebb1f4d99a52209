"""The reference driver: the guest side of virtio-mmio, in Python, without a VM.

Tests, benchmarks and the demo use it to drive emu's devices through the same registers and
rings a Linux guest would use: split or packed rings, with or without EVENT_IDX and
INDIRECT_DESC, on the modern (v2) or the legacy (v1) transport.

Interrupts: ``VirtioMmioDriver`` installs itself as the transport's ``irq`` callback (any
callback already installed, e.g. a test's counter, is still called after it). When the line
goes high it sets a ``threading.Event``; ``wait`` sleeps on that event, then reads
InterruptStatus and ACKs it, like Linux's ``vm_interrupt``, and polls the used ring.

The rings and buffers are ``DriverQueue``'s (``emu.testing.driver_queue``), in guest RAM
from a ``GuestAllocator`` (``emu.testing.guest_alloc``); this module is the transport side.

Stopping (docs/stop.md): ``stop``/``resume`` drive the STOP status bit, ``suspend``/``resume``
virtio 1.4 SUSPEND, ``ring_state``/``inflight``/``set_ring_state`` the extension registers.
``save``/``load`` carry the driver's own state (a real guest keeps it in its RAM) into a
fresh transport or another process, after the VMM restored the device there.
"""

from __future__ import annotations

import threading
import time

from emu.memory import PAGE_SIZE, GuestMemory
from emu.ringdefs import (
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    F_NOTIFICATION_DATA,
    F_RING_PACKED,
    RingState,
)
from emu.testing.driver_queue import (
    LEGACY_ALIGN,
    Completion,
    DriverError,
    DriverQueue,
    QueueUser,
)
from emu.testing.guest_alloc import GuestAllocator
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

#: features this driver cannot honour, left out when the caller does not choose features
_UNSUPPORTED = 1 << F_IN_ORDER | 1 << 39  # NOTIF_CONFIG_DATA

__all__ = ["DeviceNeedsReset", "VirtioMmioDriver"]


class DeviceNeedsReset(DriverError):
    """The device set DEVICE_NEEDS_RESET (and raised a config interrupt)."""


class VirtioMmioDriver(QueueUser):
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
            self._write(mmio_regs.QUEUE_ALIGN, LEGACY_ALIGN)
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

    def kick(self, qidx: int) -> None:
        value = qidx
        if self._has(F_NOTIFICATION_DATA):
            value |= self.queues[qidx].notification_data() << 16
        self._write(mmio_regs.QUEUE_NOTIFY, value)

    def sleep(self, qidx: int, timeout: float) -> bool:
        """Until the interrupt line goes high, then read and ACK InterruptStatus."""
        if not self._irq.wait(timeout):
            return False
        self._irq.clear()
        self.handle_interrupt()
        return True

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
