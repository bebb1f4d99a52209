"""virtio-mmio register sequences: whatever a guest writes or reads, nothing reaches the vCPU.

A device (rng, blk, net or console, in any of their variants) behind a modern or legacy
transport; the input is a list of register reads and writes (any offset, size and value,
with the registers and values that matter made likely), guest memory writes, kicks, and
the VMM's calls (stop, resume, and save plus restore into a fresh transport and device,
which then carries on). Properties: no read or write raises; no exception is caught by a
device thread's last line of defence; a device may go NEEDS_RESET; a save of a stopped
device restores; at the end a reset (Status = 0) reads back 0, and closing the device
leaves no thread and no fd behind.
"""

from __future__ import annotations

from emu.memory import GuestMemory
from emu.state.format import StateError, decode, encode
from emu.transport import mmio_regs as mmio
from emu.transport.mmio import MmioTransport
from fuzz import _devices
from fuzz._draw import Draw
from fuzz._oracle import Finding, Watch

MAX_LEN = 2048
MAX_OPS = 96
MEM = GuestMemory.create(0x10000)
#: where the queue set-up shortcut puts queue i's rings (size <= 16, both formats fit)
RINGS = 0x1000
RING_STRIDE = 0x800

REGISTERS = [
    getattr(mmio, name)
    for name in dir(mmio)
    if name.isupper()
    and isinstance(getattr(mmio, name), int)
    and getattr(mmio, name) < mmio.CONFIG
    and name.startswith(
        ("MAGIC_", "VERSION", "DEVICE_", "VENDOR_", "DRIVER_", "GUEST_", "QUEUE_", "INTERRUPT_")
    )
    or name in ("STATUS", "SHM_SEL", "CONFIG_GENERATION")
]
STATUS_VALUES = [0, 1, 3, 0xB, 0xF, 0x1F, 0x2F, 0x4F, 0x8F, 0x10, 0x20, 0x40, 0x80, 0xFF]


class Guest:
    def __init__(self, d: Draw) -> None:
        how = d.u8()
        self.device_id = 1 + how % 4
        self.variant = how >> 2 & 3
        self.version = 1 if how & 0x10 else 2
        self.stop_bit = None if how & 0x20 else mmio.F_EMU_STOP
        self.d = d
        self.t = self._new()

    def _new(self) -> MmioTransport:
        dev = _devices.make(self.device_id, self.variant)
        return MmioTransport(dev, MEM, version=self.version, stop_feature_bit=self.stop_bit)

    def close(self) -> None:
        self.t.write(mmio.STATUS, 4, 0)
        if self.t.read(mmio.STATUS, 4) != 0:
            raise Finding("Status reads nonzero after a reset")
        self.t.device.close()

    def value(self) -> int:
        d = self.d
        k = d.u8()
        if k < 0x40:
            return STATUS_VALUES[k % len(STATUS_VALUES)]
        if k < 0x80:  # a subset of the offered features, one 32-bit half
            half = self.t.offered_features >> (32 * (k & 1)) & 0xFFFFFFFF
            return half & d.u32() if k & 2 else half
        if k < 0xA0:
            return RINGS + RING_STRIDE * (k & 7) + 0x100 * (k >> 3 & 3)
        if k < 0xC0:
            return k & 0x1F
        return d.u32()

    def offset(self) -> tuple[int, int]:
        d = self.d
        k = d.u8()
        if k < 0xC0:
            return REGISTERS[k % len(REGISTERS)], 4
        if k < 0xF0:
            return mmio.CONFIG + (k & 0x3F), (1, 2, 4, 8)[d.u8() & 3]
        return d.u16() & 0x1FF, d.pick((1, 2, 3, 4, 8))

    # -- shortcuts a fuzzer would take long to find --

    def negotiate(self) -> None:
        t, d = self.t, self.d
        t.write(mmio.STATUS, 4, 0)
        t.write(mmio.STATUS, 4, 3)
        want = t.offered_features & (d.u64() | 1 << 32) if d.flag() else t.offered_features
        for sel in (0, 1):
            t.write(mmio.DRIVER_FEATURES_SEL, 4, sel)
            t.write(mmio.DRIVER_FEATURES, 4, want >> (32 * sel) & 0xFFFFFFFF)
        if self.version == 1:
            t.write(mmio.GUEST_PAGE_SIZE, 4, 4096)
        else:
            t.write(mmio.STATUS, 4, 0xB)

    def setup_queue(self) -> None:
        t, d = self.t, self.d
        i = d.below(len(t.device.queues) + 1)
        base = RINGS + RING_STRIDE * (i % 8)
        t.write(mmio.QUEUE_SEL, 4, i)
        t.write(mmio.QUEUE_SIZE, 4, 1 << d.below(5))
        if self.version == 1:
            t.write(mmio.QUEUE_ALIGN, 4, 1 << d.below(13))
            t.write(mmio.QUEUE_PFN, 4, base >> 12 if d.u8() < 0xF0 else d.u32())
            return
        for reg, off in ((mmio.QUEUE_DESC_LOW, 0), (mmio.QUEUE_DRIVER_LOW, 0x200)):
            t.write(reg, 4, base + off)
        t.write(mmio.QUEUE_DEVICE_LOW, 4, base + 0x400)
        t.write(mmio.QUEUE_READY, 4, 1)

    # -- the VMM --

    def save_restore(self) -> None:
        t = self.t
        try:
            t.vmm_stop(self.d.pick(("drain", "report")), timeout=5)
        except TimeoutError as e:
            raise Finding(f"vmm_stop: {e}") from e
        try:
            data = encode(t.save())
        except StateError as e:
            raise Finding(f"save of a VMM-stopped device refused: {e}") from e
        self.close()
        self.t = self._new()
        try:
            self.t.restore(decode(data))
        except StateError as e:
            raise Finding(f"emu refused its own snapshot: {e}") from e

    def vmm(self) -> None:
        k = self.d.u8() % 3
        try:
            if k == 0:
                self.t.vmm_stop(self.d.pick(("drain", "report")), timeout=5)
            elif k == 1:
                self.t.vmm_resume()
            else:
                self.save_restore()
        except TimeoutError as e:
            raise Finding(f"vmm_stop: {e}") from e


def one_input(data: bytes) -> None:
    d = Draw(data)
    MEM.regions[0].array[:] = 0
    with Watch(fds=True, threads=True):
        g = Guest(d)
        try:
            for _ in range(MAX_OPS):
                if not d.left:
                    break
                _step(g, d)
        finally:
            g.close()


def _step(g: Guest, d: Draw) -> None:
    op = d.below(16)
    t = g.t
    try:
        if op < 6:
            off, size = g.offset()
            t.write(off, size, g.value())
        elif op < 8:
            off, size = g.offset()
            t.read(off, size)
        elif op == 8:
            g.negotiate()
        elif op == 9:
            g.setup_queue()
        elif op == 10:
            t.write(mmio.STATUS, 4, t.read(mmio.STATUS, 4) | d.pick((4, 0x10, 0x20)))
        elif op in (11, 12):
            MEM.write(RINGS + d.u16() % (0x10000 - RINGS - 64), d.blob(64))
        elif op == 13:
            t.write(mmio.QUEUE_NOTIFY, 4, d.below(len(t.device.queues) + 1))
        elif op == 14:
            g.vmm()
        else:
            t.write(mmio.INTERRUPT_ACK, 4, t.read(mmio.INTERRUPT_STATUS, 4))
    except Finding:
        raise
    except Exception as e:
        raise Finding(f"op {op}: {e!r:.300} escaped into the caller") from e


def seeds() -> dict[str, bytes]:
    """Each device brought up (negotiate, a queue, DRIVER_OK), then a kick and a save."""
    out = {}
    for how in range(0x40):
        if how >> 2 & 3 > 1:
            continue
        legacy = bytes([12, 0]) if how & 0x10 else b""  # QueueAlign 4096, the sane PFN
        prog = bytes([how])
        prog += bytes([8, 0])  # negotiate everything
        prog += bytes([9, 0, 3]) + legacy  # queue 0, size 8
        prog += bytes([9, 1, 3]) + legacy  # queue 1
        prog += bytes([10, 0])  # DRIVER_OK
        prog += bytes([13, 0, 13, 1])  # kicks
        prog += bytes([14, 2, 1])  # save + restore (report)
        out[f"{how:02x}"] = prog
    return out
