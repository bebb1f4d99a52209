"""virtio-mmio register file over a ``VirtioDevice``: what a VMM's MMIO exit handler calls.

``read``/``write`` run on the caller's (vCPU) thread and never block on device work: a
QueueNotify only writes the queue's kick eventfd. The device thread raises used-buffer and
config interrupts through callbacks, so interrupt state sits behind a lock, and the level
of the (level-triggered) interrupt line follows InterruptStatus: ``irq(1)`` when it becomes
nonzero, ``irq(0)`` when an ACK or a reset clears it.

Whatever the guest does, nothing is raised into the caller: bad accesses are logged and
ignored, as a real device would.

Version 2 is the modern layout; version 1 is the legacy one (GuestPageSize/QueueAlign/
QueuePFN, no FEATURES_OK, 32 feature bits) that Linux still uses by default under QEMU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.queue import Virtqueue
from emu.ringdefs import (
    F_NOTIFICATION_DATA,
    F_RING_PACKED,
    F_RING_RESET,
    F_VERSION_1,
    MAX_PACKED_SIZE,
    MAX_SPLIT_SIZE,
)

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VENDOR_EMU = 0x554D4555  # "EMU"

# device status bits
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_DEVICE_NEEDS_RESET = 0x40
S_FAILED = 0x80
#: bits a driver may set (NEEDS_RESET is the device's to set)
_DRIVER_BITS = S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK | S_FEATURES_OK | S_FAILED

# interrupt status bits
INT_VRING = 1
INT_CONFIG = 2

# legacy-only transport features a legacy device offers (QEMU does the same)
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
_LEGACY_TRANSPORT_FEATURES = 1 << F_NOTIFY_ON_EMPTY | 1 << F_ANY_LAYOUT

# register offsets
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
GUEST_PAGE_SIZE = 0x028  # legacy
QUEUE_SEL = 0x030
QUEUE_SIZE_MAX = 0x034
QUEUE_SIZE = 0x038
QUEUE_ALIGN = 0x03C  # legacy
QUEUE_PFN = 0x040  # legacy
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

_COMMON_READ = {MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID, DEVICE_FEATURES, QUEUE_SIZE_MAX}
_COMMON_READ |= {INTERRUPT_STATUS, STATUS}
_COMMON_WRITE = {DEVICE_FEATURES_SEL, DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL}
_COMMON_WRITE |= {QUEUE_SIZE, QUEUE_NOTIFY, INTERRUPT_ACK, STATUS}
_READ = {
    2: _COMMON_READ
    | {QUEUE_READY, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH}
    | {QUEUE_RESET, CONFIG_GENERATION},
    1: _COMMON_READ | {QUEUE_PFN},
}
_WRITE = {
    2: _COMMON_WRITE
    | {QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH}
    | {QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, SHM_SEL, QUEUE_RESET},
    1: _COMMON_WRITE | {GUEST_PAGE_SIZE, QUEUE_ALIGN, QUEUE_PFN},
}
#: queue registers a driver must not write while the queue is live
_QUEUE_CONFIG = {QUEUE_SIZE, QUEUE_ALIGN, QUEUE_PFN, QUEUE_DESC_LOW, QUEUE_DESC_HIGH}
_QUEUE_CONFIG |= {QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH}
_ADDR_FIELD = {
    QUEUE_DESC_LOW: "desc",
    QUEUE_DESC_HIGH: "desc",
    QUEUE_DRIVER_LOW: "driver",
    QUEUE_DRIVER_HIGH: "driver",
    QUEUE_DEVICE_LOW: "device",
    QUEUE_DEVICE_HIGH: "device",
}

_LEGACY_DEFAULT_ALIGN = 4096
_U32 = 0xFFFFFFFF


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class MmioTransport:
    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        version: int = 2,
        irq: Callable[[int], None] | None = None,
        vendor_id: int = VENDOR_EMU,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"virtio-mmio version must be 1 or 2, not {version}")
        self.device = device
        self.mem = mem
        self.version = version
        self.irq = irq
        self.vendor_id = vendor_id
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.guest_page_size = 0  # legacy; survives a reset (Linux writes it before one)
        self._lock = threading.RLock()
        self._reset_registers()
        device.on_config_change = self._config_changed
        device.on_needs_reset = self._needs_reset
        for q in device.queues:
            q.notify = self._used_buffer

    @property
    def legacy(self) -> bool:
        return self.version == 1

    @property
    def offered_features(self) -> int:
        if self.legacy:
            device = self.device.features | self.device.legacy_features
            return device & _U32 | _LEGACY_TRANSPORT_FEATURES
        return self.device.features

    def _has(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def _reset_registers(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.queue_align = [_LEGACY_DEFAULT_ALIGN] * len(self.device.queues)

    # -- the MMIO entry points --

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            return self._config_read(offset - CONFIG, size)
        if not self._control_access_ok("read", offset, size):
            return 0
        if offset not in _READ[self.version]:
            what = "write-only" if offset in _WRITE[self.version] else "unknown"
            log.warning("virtio-mmio: read of %s register %#x ignored", what, offset)
            return 0
        return self._read_register(offset) & _U32

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self._config_write(offset - CONFIG, size, value)
            return
        if not self._control_access_ok("write", offset, size):
            return
        if offset not in _WRITE[self.version]:
            what = "read-only" if offset in _READ[self.version] else "unknown"
            log.warning("virtio-mmio: write of %#x to %s register %#x ignored", value, what, offset)
            return
        self._write_register(offset, value & _U32)

    def _control_access_ok(self, op: str, offset: int, size: int) -> bool:
        if size != 4 or offset % 4:
            log.warning("virtio-mmio: %d-byte %s at %#x ignored (must be 32-bit)", size, op, offset)
            return False
        return True

    # -- registers --

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return self.version
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return self.vendor_id
        if offset == DEVICE_FEATURES:
            return self.offered_features >> (32 * self.device_features_sel)
        if offset == QUEUE_SIZE_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == QUEUE_PFN:
            return q.desc // self.guest_page_size if q is not None and q.ready else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return _U32  # no shared memory regions
        if offset == QUEUE_RESET:
            return 0  # a queue reset completes inside the write
        assert offset == CONFIG_GENERATION
        return self.config_generation

    def _write_register(self, offset: int, value: int) -> None:
        if offset == STATUS:
            self._write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == GUEST_PAGE_SIZE:
            if _pow2(value):
                self.guest_page_size = value
            else:
                log.warning("virtio-mmio: GuestPageSize %#x is not a power of 2", value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            self._ack(value)
        else:
            self._write_queue_register(offset, value)

    def _selected_queue(self) -> Virtqueue | None:
        if self.queue_sel < len(self.device.queues):
            return self.device.queues[self.queue_sel]
        return None

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            log.warning("virtio-mmio: write to %#x for absent queue %d", offset, self.queue_sel)
            return
        if offset == QUEUE_READY:
            self._write_queue_ready(q, value)
        elif offset == QUEUE_RESET:
            self._write_queue_reset(q, value)
        elif q.ready and offset in _QUEUE_CONFIG:
            if offset == QUEUE_PFN and value == 0:
                self._stop_queue(q)
            else:
                log.warning("virtio-mmio: queue %d: write to %#x while live", q.index, offset)
        elif offset == QUEUE_SIZE:
            self._write_queue_size(q, value)
        elif offset == QUEUE_ALIGN:
            if _pow2(value):
                self.queue_align[q.index] = value
            else:
                log.warning(
                    "virtio-mmio: queue %d: QueueAlign %#x not a power of 2", q.index, value
                )
        elif offset == QUEUE_PFN:
            self._write_queue_pfn(q, value)
        else:
            field = _ADDR_FIELD[offset]
            old = getattr(q, field)
            if offset & 4:  # the High half
                setattr(q, field, old & _U32 | value << 32)
            else:
                setattr(q, field, old & ~_U32 | value)

    def _write_queue_size(self, q: Virtqueue, value: int) -> None:
        packed = self._has(F_RING_PACKED)
        limit = min(q.max_size, MAX_PACKED_SIZE if packed else MAX_SPLIT_SIZE)
        if not 0 < value <= limit or not (packed or _pow2(value)):
            log.warning("virtio-mmio: queue %d: size %d refused (max %d)", q.index, value, limit)
            return
        q.size = value

    def _write_queue_ready(self, q: Virtqueue, value: int) -> None:
        if value == 1 and not q.ready:
            q.ready = True
            if self.status & S_DRIVER_OK:
                self.device.start_queue(q)
        elif value == 0:
            self._stop_queue(q)
        elif value != 1:
            log.warning("virtio-mmio: queue %d: QueueReady %#x ignored", q.index, value)

    def _stop_queue(self, q: Virtqueue) -> None:
        q.ready = False
        self.device.stop_queue(q)
        if self.legacy:
            q.desc = 0  # QueuePFN reads back 0

    def _write_queue_reset(self, q: Virtqueue, value: int) -> None:
        if not self._has(F_RING_RESET):
            log.warning("virtio-mmio: QueueReset without VIRTIO_F_RING_RESET ignored")
        elif value == 1:
            self.device.stop_queue(q)
            q.reset()
            q.clear_kick()
        elif value != 0:
            log.warning("virtio-mmio: QueueReset %#x ignored", value)

    def _write_queue_pfn(self, q: Virtqueue, pfn: int) -> None:
        """Legacy: one contiguous ring; used ring aligned up to QueueAlign."""
        if pfn == 0:
            return
        if not self.guest_page_size:
            log.warning("virtio-mmio: queue %d: QueuePFN before GuestPageSize", q.index)
            return
        align = self.queue_align[q.index]
        q.desc = pfn * self.guest_page_size
        q.driver = q.desc + 16 * q.size
        q.device = (q.driver + 6 + 2 * q.size + align - 1) & -align
        self._write_queue_ready(q, 1)

    def _write_driver_features(self, value: int) -> None:
        if self.status & S_FEATURES_OK:
            log.warning("virtio-mmio: DriverFeatures written after FEATURES_OK ignored")
            return
        sel = self.driver_features_sel
        if self.legacy and sel > 0:
            if value:  # Linux writes 0 here; anything else has no meaning in legacy
                log.warning(
                    "virtio-mmio: legacy DriverFeatures %#x with sel %d ignored", value, sel
                )
            return
        if sel > 1:
            if value:
                log.warning("virtio-mmio: DriverFeatures %#x for sel %d ignored", value, sel)
            return
        shift = 32 * sel
        self.driver_features = self.driver_features & ~(_U32 << shift) | value << shift

    def _notify(self, value: int) -> None:
        index = value & 0xFFFF if self._has(F_NOTIFICATION_DATA) else value
        if index >= len(self.device.queues):
            log.warning("virtio-mmio: notify for absent queue %d ignored", index)
            return
        self.device.queues[index].kick()

    # -- device status: the one place the state machine lives --

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        with self._lock:
            old = self.status
            if old & ~value & _DRIVER_BITS:
                log.warning("virtio-mmio: status %#x would clear bits of %#x; refused", value, old)
                return
            new = value & ~old
            if new & ~_DRIVER_BITS:
                log.warning("virtio-mmio: status bits %#x ignored", new & ~_DRIVER_BITS)
                new &= _DRIVER_BITS
        if new & S_FEATURES_OK and not self._features_acceptable():
            new &= ~S_FEATURES_OK  # the driver's read-back tells it we refused
        if new & S_DRIVER_OK and not self._may_activate(old | new):
            new &= ~S_DRIVER_OK
        with self._lock:
            self.status |= new
        if new & S_DRIVER_OK:
            self.device.activate(self.mem, self._negotiated())

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        if self.legacy:
            log.warning("virtio-mmio: FEATURES_OK on a legacy transport refused")
            return False
        if not features >> F_VERSION_1 & 1:
            log.warning("virtio-mmio: driver features %#x lack VERSION_1; refused", features)
            return False
        if features & ~self.offered_features or not self.device.accept_features(features):
            log.warning("virtio-mmio: %s refused driver features %#x", self.device.name, features)
            return False
        return True

    def _may_activate(self, status: int) -> bool:
        if self.legacy:
            # legacy-only device bits (net GSO) are outside the device's modern set
            if not self.device.accept_features(self._negotiated() & self.device.features):
                log.warning("virtio-mmio: %s refused legacy features", self.device.name)
                return False
            return True
        if not status & S_FEATURES_OK:
            log.warning("virtio-mmio: DRIVER_OK without FEATURES_OK refused")
            return False
        return True

    def _negotiated(self) -> int:
        """Features handed to the device; legacy transport-only bits stay here."""
        transport_only = _LEGACY_TRANSPORT_FEATURES if self.legacy else 0
        return self.driver_features & self.offered_features & ~transport_only

    def _reset(self) -> None:
        self.device.reset()  # joins the device thread: no lock held here
        self._reset_registers()
        with self._lock:
            self.status = 0
            if self.interrupt_status:
                self.interrupt_status = 0
                self._set_irq(0)

    # -- interrupts (called from the device thread too) --

    def _raise(self, bits: int) -> None:
        with self._lock:
            was = self.interrupt_status
            self.interrupt_status |= bits
            if not was:
                self._set_irq(1)

    def _ack(self, bits: int) -> None:
        with self._lock:
            was = self.interrupt_status
            self.interrupt_status &= ~bits
            if was and not self.interrupt_status:
                self._set_irq(0)

    def _set_irq(self, level: int) -> None:
        if self.irq is not None:
            self.irq(level)

    def _used_buffer(self) -> None:
        self._raise(INT_VRING)

    def _config_changed(self) -> None:
        with self._lock:
            self.config_generation = self.config_generation + 1 & _U32
            if self.status & S_DRIVER_OK:
                self._raise(INT_CONFIG)

    def _needs_reset(self, reason: str) -> None:
        with self._lock:
            self.status |= S_DEVICE_NEEDS_RESET
            if self.status & S_DRIVER_OK:
                self._raise(INT_CONFIG)

    # -- device-specific configuration space --

    def _config_access_ok(self, op: str, offset: int, size: int) -> bool:
        if size not in (1, 2, 4, 8) or offset % min(size, 4):
            log.warning("virtio-mmio: %d-byte config %s at +%#x ignored", size, op, offset)
            return False
        return True

    def _config_read(self, offset: int, size: int) -> int:
        if not self._config_access_ok("read", offset, size):
            return 0
        if size == 8:
            low = self.device.read_config(offset, 4)
            return low | self.device.read_config(offset + 4, 4) << 32
        return self.device.read_config(offset, size)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if not self._config_access_ok("write", offset, size):
            return
        if size == 8:
            self.device.write_config(offset, 4, value & _U32)
            self.device.write_config(offset + 4, 4, value >> 32 & _U32)
        else:
            self.device.write_config(offset, size, value & ((1 << 8 * size) - 1))
