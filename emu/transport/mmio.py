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
The registers themselves are ``emu.transport.mmio_regs``; what ``save`` keeps of them,
``emu.transport.mmio_snapshot``.

Stopping the device (modern transport only; docs/stop.md has the whole contract): the guest
can use virtio 1.4 SUSPEND (feature 43), or, only where the VMM asks for the experimental
extension (``stop_feature_bit``, e.g. 47), set the STOP status bit (VIRTIO_F_EMU_STOP) and
read ring state and in-flight counts through two extension registers; the VMM can stop the
device behind the guest's back with ``vmm_stop``/``vmm_resume`` and ``save``/``restore`` it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from emu.devices.base import Command, RunState, VirtioDevice
from emu.devices.snapshot import apply, check_restore, save_device
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
from emu.state.format import DeviceState, StateError
from emu.transport.mmio_regs import (
    CONFIG,
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    F_ANY_LAYOUT,
    F_SUSPEND,
    GUEST_PAGE_SIZE,
    INT_CONFIG,
    INT_VRING,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC,
    MAGIC_VALUE,
    QUEUE_ALIGN,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_INFLIGHT,
    QUEUE_NOTIFY,
    QUEUE_PFN,
    QUEUE_READY,
    QUEUE_RESET,
    QUEUE_RING_STATE,
    QUEUE_SEL,
    QUEUE_SIZE,
    QUEUE_SIZE_MAX,
    READABLE,
    S_ACKNOWLEDGE,
    S_DEVICE_NEEDS_RESET,
    S_DRIVER,
    S_DRIVER_OK,
    S_FAILED,
    S_FEATURES_OK,
    S_STOP,
    S_SUSPEND,
    SHM_BASE_HIGH,
    SHM_BASE_LOW,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_SEL,
    STATUS,
    VENDOR_ID,
    VERSION,
    WRITABLE,
    decode_ring_state,
    encode_ring_state,
    is_pow2,
)
from emu.transport.mmio_snapshot import REGISTERS, SAVED_REGISTERS, check_registers

log = logging.getLogger(__name__)

VENDOR_EMU = 0x554D4555  # "EMU"

#: bits a driver may set (NEEDS_RESET is the device's to set)
_DRIVER_BITS = S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK | S_FEATURES_OK | S_FAILED
_DRIVER_BITS |= S_SUSPEND | S_STOP
#: the guest's stop requests: while one is set, the guest holds the device stopped
_GUEST_HOLDS = S_STOP | S_SUSPEND

# legacy-only transport features. ANY_LAYOUT: a transitional device must offer it.
# NOTIFY_ON_EMPTY (a device "may" offer it) is not offered: the rings do not implement it,
# and Linux never accepts it (its virtio core keeps only the ring features it knows; the
# blk-legacy trace under QEMU shows QEMU offering it and Linux 6.1 declining).
_LEGACY_TRANSPORT_FEATURES = 1 << F_ANY_LAYOUT

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
#: how long a vCPU's reset, queue reset or queue stop waits for the device thread before
#: it returns anyway (the pass in progress ends after its current request, so this is
#: only reached when a backend call hangs); the driver then polls Status / QueueReset
PROMPT_S = 0.5
_U32 = 0xFFFFFFFF


def _wait_prompt(cmd: Command, what: str) -> None:
    try:
        cmd.wait(PROMPT_S)
    except TimeoutError:
        log.warning("virtio-mmio: %s still under way after %s s; carrying on", what, PROMPT_S)


class MmioTransport:
    """``stop_feature_bit``: the bit the experimental VIRTIO_F_EMU_STOP (STOP status bit and
    ring-state registers) is offered as, e.g. ``F_EMU_STOP``; None (default): not offered.
    ``stop_policy``: how a guest STOP quiesces ("drain"/"report"; None: the device's)."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        version: int = 2,
        irq: Callable[[int], None] | None = None,
        vendor_id: int = VENDOR_EMU,
        stop_feature_bit: int | None = None,
        stop_policy: str | None = None,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"virtio-mmio version must be 1 or 2, not {version}")
        if stop_feature_bit is not None and (
            not 0 <= stop_feature_bit < 64
            or stop_feature_bit == F_SUSPEND
            or device.features >> stop_feature_bit & 1
        ):
            raise ValueError(f"stop feature bit {stop_feature_bit} is taken or out of range")
        self.device = device
        self.mem = mem
        self.version = version
        self.irq = irq
        self.vendor_id = vendor_id
        self.stop_feature_bit = stop_feature_bit
        self.stop_policy = stop_policy
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.guest_page_size = 0  # legacy; survives a reset (Linux writes it before one)
        #: the VMM holds the device stopped (vmm_stop); the guest does not see it
        self.vmm_stopped = False
        #: the guest asked for STOP/SUSPEND while the VMM held the device: issued at vmm_resume
        self._guest_stop_pending = False
        #: a config change while the device was stopped, announced when it runs again
        self._config_pending = False
        self._lock = threading.RLock()
        #: a device reset the guest asked for and the device thread has not finished
        self._resetting: Command | None = None
        #: queue resets under way, by queue index (QueueReset reads 1 until done)
        self._queue_resets: dict[int, Command] = {}
        self._reset_registers()
        device.on_config_change = self._config_changed
        device.on_needs_reset = self._needs_reset
        for q in device.queues:
            q.notify = self._used_buffer

    @property
    def legacy(self) -> bool:
        return self.version == 1

    @property
    def transport_features(self) -> int:
        """Bits the transport itself offers and implements; the device never sees them."""
        if self.legacy:
            return _LEGACY_TRANSPORT_FEATURES
        stop = 0 if self.stop_feature_bit is None else 1 << self.stop_feature_bit
        return 1 << F_SUSPEND | stop

    @property
    def offered_features(self) -> int:
        if self.legacy:
            device = self.device.features | self.device.legacy_features
            return device & _U32 | _LEGACY_TRANSPORT_FEATURES
        return self.device.features | self.transport_features

    def _has(self, bit: int | None) -> bool:
        return bit is not None and bool(self.driver_features >> bit & 1)

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
        if offset not in READABLE[self.version]:
            what = "write-only" if offset in WRITABLE[self.version] else "unknown"
            log.warning("virtio-mmio: read of %s register %#x ignored", what, offset)
            return 0
        return self._read_register(offset) & _U32

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self._config_write(offset - CONFIG, size, value)
            return
        if not self._control_access_ok("write", offset, size):
            return
        if offset not in WRITABLE[self.version]:
            what = "read-only" if offset in READABLE[self.version] else "unknown"
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
            ready = q is not None and q.ready and self.guest_page_size
            return q.desc // self.guest_page_size if ready else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.guest_status()
        if offset in (QUEUE_RING_STATE, QUEUE_INFLIGHT):
            return self._read_stopped_queue(offset, q)
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return _U32  # no shared memory regions
        if offset == QUEUE_RESET:
            pending = self._queue_resets.get(self.queue_sel)
            return int(pending is not None and not pending.done())
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
            if is_pow2(value):
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
        elif offset == QUEUE_RING_STATE:
            self._write_ring_state(q, value)
        elif q.ready and offset in _QUEUE_CONFIG:
            if offset == QUEUE_PFN and value == 0:
                self._stop_queue(q)
            else:
                log.warning("virtio-mmio: queue %d: write to %#x while live", q.index, offset)
        elif offset == QUEUE_SIZE:
            self._write_queue_size(q, value)
        elif offset == QUEUE_ALIGN:
            if is_pow2(value):
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
        if not 0 < value <= limit or not (packed or is_pow2(value)):
            log.warning("virtio-mmio: queue %d: size %d refused (max %d)", q.index, value, limit)
            return
        q.size = value

    def _write_queue_ready(self, q: Virtqueue, value: int) -> None:
        if value == 1 and not q.ready:
            q.ready = True
            if self.status & S_DRIVER_OK:
                _wait_prompt(self.device.start_queue(q, wait=False), f"queue {q.index} start")
        elif value == 0:
            self._stop_queue(q)
        elif value != 1:
            log.warning("virtio-mmio: queue %d: QueueReady %#x ignored", q.index, value)

    def _stop_queue(self, q: Virtqueue) -> None:
        """QueueReady=0: the device must be off the ring before the driver reuses it, so
        wait for the pass in progress (it ends after its current request)."""
        q.ready = False
        _wait_prompt(self.device.request_stop_queue(q), f"queue {q.index} stop")
        if self.legacy:
            q.desc = 0  # QueuePFN reads back 0

    def _write_queue_reset(self, q: Virtqueue, value: int) -> None:
        if not self._has(F_RING_RESET):
            log.warning("virtio-mmio: QueueReset without VIRTIO_F_RING_RESET ignored")
        elif value == 1:
            cmd = self.device.request_stop_queue(q, reset=True)
            self._queue_resets[q.index] = cmd
            _wait_prompt(cmd, f"queue {q.index} reset")
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

    def _read_stopped_queue(self, offset: int, q: Virtqueue | None) -> int:
        """QueueRingState / QueueInflight: only meaningful while the guest sees STOP/SUSPEND."""
        if not self._has(self.stop_feature_bit) or not self._guest_sees_stopped():
            log.warning("virtio-mmio: %#x read while not stopped (or without the feature)", offset)
            return 0
        ring = q.ring if q is not None else None  # one look: another vCPU may stop it now
        if ring is None:
            return 0
        rs = ring.state()
        if offset == QUEUE_INFLIGHT:
            return len(rs.inflight)
        return encode_ring_state(rs, q.packed)

    def _write_ring_state(self, q: Virtqueue, value: int) -> None:
        """Where a restored queue continues: applied when the queue starts at DRIVER_OK."""
        if not self._has(self.stop_feature_bit) or not self.status & S_FEATURES_OK:
            log.warning("virtio-mmio: QueueRingState without VIRTIO_F_EMU_STOP ignored")
            return
        if self.status & S_DRIVER_OK or q.started:
            log.warning("virtio-mmio: queue %d: QueueRingState after DRIVER_OK ignored", q.index)
            return
        packed = self._has(F_RING_PACKED)
        rs = decode_ring_state(value, packed)
        if packed and not (rs.next_avail < q.size and rs.next_used < q.size):
            log.warning(
                "virtio-mmio: queue %d: ring state %#x beyond size %d", q.index, value, q.size
            )
            return
        # the register carries no in-flight list, so the ring must have nothing in flight:
        # otherwise the device would run a ring that no snapshot of it could describe
        if (rs.next_avail, rs.avail_wrap) != (rs.next_used, rs.used_wrap):
            log.warning(
                "virtio-mmio: queue %d: ring state %#x leaves chains in flight; refused",
                q.index,
                value,
            )
            return
        self.device.restore_queue(q.index, rs, [])

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
    #
    # ``self.status`` holds what the driver established (DRIVER_OK stays set while
    # suspended) plus the device's NEEDS_RESET, and the guest's STOP/SUSPEND request while it
    # holds one. ``guest_status`` derives what a Status read returns. Three holders can keep
    # the device stopped: the guest's STOP, the guest's SUSPEND, and the VMM (vmm_stop);
    # the device runs again only when none is left.

    def guest_status(self) -> int:
        """Status as the guest reads it: STOP reads set only once the device has stopped
        (the driver polls), a suspended device presents SUSPEND=1 with DRIVER_OK=0, a VMM
        stop shows nowhere, and a reset under way reads nonzero until it is done."""
        if not self._reset_done():
            return self.status
        s = self.status
        if not self._guest_sees_stopped():
            return s & ~S_STOP
        return s & ~S_DRIVER_OK if s & S_SUSPEND else s

    def _guest_sees_stopped(self) -> bool:
        return (
            bool(self.status & _GUEST_HOLDS)
            and not self._guest_stop_pending
            and self.device.stopped
        )

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        with self._lock:
            if not self._reset_done():
                log.warning("virtio-mmio: status %#x ignored: the reset is not done", value)
                return
            seen = self.guest_status()  # the no-clear rule is about what the driver can see
            cleared = seen & ~value & _DRIVER_BITS
            if cleared & ~S_STOP:
                log.warning("virtio-mmio: status %#x would clear bits of %#x; refused", value, seen)
                return
            new = value & ~seen
            if new & ~_DRIVER_BITS:
                log.warning("virtio-mmio: status bits %#x ignored", new & ~_DRIVER_BITS)
                new &= _DRIVER_BITS
            if cleared:  # STOP, once it read back set: the one bit the driver may clear
                self._guest_resume()
            elif new & S_DRIVER_OK and self.status & S_SUSPEND:  # suspended: DRIVER_OK resumes
                self._guest_resume()
                new &= ~S_DRIVER_OK
            new &= ~self._refused_holds(new)
            if new & S_FEATURES_OK and not self._features_acceptable():
                new &= ~S_FEATURES_OK  # the driver's read-back tells it we refused
            if new & S_DRIVER_OK and not self._may_activate(self.status | new):
                new &= ~S_DRIVER_OK
            self.status |= new
            activated = self._activate(self.vmm_stopped) if new & S_DRIVER_OK else None
            if new & _GUEST_HOLDS:
                self._guest_stop()
        if activated is not None:  # outside the lock: the device's callbacks take it
            _wait_prompt(activated, "activation")

    def _activate(self, stopped: bool) -> Command:
        """Called with the lock held: the device activates on its thread, unwaited."""
        return self.device.activate(self.mem, self._negotiated(), stopped, wait=False)

    def _refused_holds(self, new: int) -> int:
        """The STOP/SUSPEND bits of ``new`` the device must ignore (and logs why)."""
        refused = 0
        for bit, feature, name in (
            (S_STOP, self.stop_feature_bit, "STOP"),
            (S_SUSPEND, F_SUSPEND, "SUSPEND"),
        ):
            if not new & bit:
                continue
            if not self._has(feature):
                why = "its feature was not negotiated"
            elif not self.status & S_DRIVER_OK:
                why = "DRIVER_OK is not set"
            elif self.status & (_GUEST_HOLDS | S_DEVICE_NEEDS_RESET) or new & _GUEST_HOLDS != bit:
                # a broken device cannot suspend: it already presents DEVICE_NEEDS_RESET,
                # which is what the spec asks of a device that fails to
                why = "the device is stopped, stopping or needs a reset"
            else:
                continue
            log.warning("virtio-mmio: %s ignored: %s", name, why)
            refused |= bit
        return refused

    def _guest_policy(self) -> str | None:
        """SUSPEND always drains (the spec wants every in-process buffer used)."""
        return "drain" if self.status & S_SUSPEND else self.stop_policy

    def _guest_stop(self) -> None:
        if self.vmm_stopped:  # already stopped under the VMM: quiesce the guest's way later
            self._guest_stop_pending = True
        else:
            self.device.request_stop(self._guest_policy())

    def _guest_resume(self) -> None:
        self.status &= ~_GUEST_HOLDS
        if not self.vmm_stopped:
            self._resume_device()

    def _resume_device(self) -> None:
        self.device.resume()
        if self._config_pending:  # a config change while stopped is announced now
            self._config_pending = False
            self._raise(INT_CONFIG)

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        if self.legacy:
            log.warning("virtio-mmio: FEATURES_OK on a legacy transport refused")
            return False
        if not features >> F_VERSION_1 & 1:
            log.warning("virtio-mmio: driver features %#x lack VERSION_1; refused", features)
            return False
        device_part = features & ~self.transport_features
        if features & ~self.offered_features or not self.device.accept_features(device_part):
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
        """Features handed to the device; transport-only bits stay here."""
        return self.driver_features & self.offered_features & ~self.transport_features

    def _reset(self) -> None:
        """Status=0. The device lets go of its rings on its own thread; the vCPU waits a
        bounded time, and Status reads nonzero until the device is done (spec: the driver
        waits for 0), so a busy queue never holds the vCPU and a racing DRIVER_OK from
        another vCPU is refused rather than interleaved with the reset."""
        with self._lock:
            self._resetting = self.device.request_reset()
            self._queue_resets.clear()
            self._reset_registers()
            self._guest_stop_pending = self._config_pending = False
        _wait_prompt(self._resetting, "reset")
        self._reset_done()

    def _reset_done(self) -> bool:
        """True once no reset is under way; the first look after one finishes clears Status
        and whatever interrupt the device raised meanwhile."""
        with self._lock:
            if self._resetting is None:
                return True
            if not self._resetting.done():
                return False
            self._resetting = None
            self.status = 0
            if self.interrupt_status:
                self.interrupt_status = 0
                self._set_irq(0)
            return True

    # -- the VMM's side: stop without the guest seeing it, save, restore --

    def vmm_stop(self, policy: str | None = None, timeout: float | None = 30.0) -> None:
        """Stop the device behind the guest's back and wait until it has.

        The guest keeps reading the Status it wrote and every register keeps working; a
        QueueNotify meanwhile stays pending in the queue's eventfd and is served after
        ``vmm_resume``. ``policy`` defaults to the transport's ``stop_policy``, then the
        device's. A VMM stop does not survive ``restore``: the restored device runs.
        """
        with self._lock:
            self.device.request_stop(policy or self.stop_policy)
            self.vmm_stopped = True
        if not self.device.wait_stopped(timeout):
            raise TimeoutError(f"{self.device.name}: not stopped after {timeout} s")

    def vmm_resume(self) -> None:
        """Let the device run again, unless the guest holds it stopped itself; returns once
        the device has."""
        with self._lock:
            self._vmm_release()
        self.device.sync()

    def _vmm_release(self) -> None:
        """The VMM's hold goes (lock held: posts commands, never waits)."""
        if self.vmm_stopped:
            self.vmm_stopped = False
            if self._guest_stop_pending:  # the guest asked meanwhile: now it gets its stop
                self._guest_stop_pending = False
                self.device.resume()
                self.device.request_stop(self._guest_policy())
            elif not self.status & _GUEST_HOLDS:
                self._resume_device()

    def save(self) -> DeviceState:
        """The device's snapshot with this transport's registers in its TRANSPORT part.

        The device must be stopped (by any of the three interfaces) or not started.
        """
        with self._lock:
            regs = {name: getattr(self, name) for name in SAVED_REGISTERS}
            regs.update(
                transport="virtio-mmio",
                guest_stop_pending=self._guest_stop_pending,
                config_pending=self._config_pending,
            )
            return save_device(self.device, self.status, regs, REGISTERS)

    def restore(self, state: DeviceState) -> None:
        """Carry on from ``save`` on this fresh transport over a fresh device of that type.

        Everything is checked (every part, every register, the rings against guest RAM)
        before anything is applied. A device saved stopped by the guest (STOP/SUSPEND)
        comes back stopped, waiting for the guest's resume; one saved under a VMM stop
        comes back running.
        """
        if self.status or self.device.run_state is not RunState.IDLE:
            raise StateError("restore needs a fresh transport and device")
        checked = check_restore(self.device, state, REGISTERS, self.mem)
        regs = check_registers(
            checked.transport,
            self.version,
            self.offered_features,
            len(self.device.queues),
            checked.status,
        )
        restored = apply(self.device, checked)
        with self._lock:
            for name in SAVED_REGISTERS:
                setattr(self, name, regs[name])
            self.queue_align = list(self.queue_align)
            self._guest_stop_pending = regs["guest_stop_pending"]
            self._config_pending = regs["config_pending"]
            self.status = restored.status
            if self.status & S_DEVICE_NEEDS_RESET:  # saved broken: it stays so, rings untouched
                self.device.fail("restored from a state saved needing a reset", wait=False)
            elif self.status & S_DRIVER_OK:
                self._activate(bool(self.vmm_stopped or self.status & _GUEST_HOLDS))
            if self.interrupt_status:
                self._set_irq(1)
            self._vmm_release()
        self.device.sync()  # activation and resume done: the device runs as it was saved

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
            if not self.status & S_DRIVER_OK:
                return
            if self.device.run_state in (RunState.STOPPING, RunState.STOPPED):
                self._config_pending = True  # no interrupt while stopped
            else:
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
        if self.status & _GUEST_HOLDS:  # a stopped or suspended device's config is frozen
            log.warning("virtio-mmio: config write at +%#x while stopped ignored", offset)
            return
        if size == 8:
            self.device.write_config(offset, 4, value & _U32)
            self.device.write_config(offset + 4, 4, value >> 32 & _U32)
        else:
            self.device.write_config(offset, size, value & ((1 << 8 * size) - 1))
