"""The virtio-mmio register layout: offsets, bit values and the QueueRingState encoding.

What the device side (``emu.transport.mmio``) and a driver (``emu.testing.driver``) agree
on, apart from what either does with it. Version 2 is the modern layout; version 1 the
legacy one (GuestPageSize/QueueAlign/QueuePFN instead of the queue address and ready
registers). QueueRingState and QueueInflight are emu's experimental extension, present
only with VIRTIO_F_EMU_STOP (docs/stop.md).
"""

from __future__ import annotations

from emu.ringdefs import RingState

MAGIC = 0x74726976  # "virt"

# device status bits
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_SUSPEND = 0x10  # virtio 1.4, with VIRTIO_F_SUSPEND
S_STOP = 0x20  # emu extension, with VIRTIO_F_EMU_STOP (docs/stop.md)
S_DEVICE_NEEDS_RESET = 0x40
S_FAILED = 0x80

# transport features of the stop interfaces (modern transport only)
F_SUSPEND = 43
#: the usual bit of VIRTIO_F_EMU_STOP when asked for (44-49 are reserved for future transport
#: features); experimental, so not offered unless the transport is built with it
F_EMU_STOP = 47

# legacy-only transport features
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27

# interrupt status bits
INT_VRING = 1
INT_CONFIG = 2

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
QUEUE_RING_STATE = 0x0C4  # emu extension (VIRTIO_F_EMU_STOP): ring indexes, per QueueSel
QUEUE_INFLIGHT = 0x0C8  # emu extension (VIRTIO_F_EMU_STOP): in-flight chains, per QueueSel
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

_COMMON_READ = {MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID, DEVICE_FEATURES, QUEUE_SIZE_MAX}
_COMMON_READ |= {INTERRUPT_STATUS, STATUS}
_COMMON_WRITE = {DEVICE_FEATURES_SEL, DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL}
_COMMON_WRITE |= {QUEUE_SIZE, QUEUE_NOTIFY, INTERRUPT_ACK, STATUS}
#: the readable control registers, by transport version
READABLE = {
    2: _COMMON_READ
    | {QUEUE_READY, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH}
    | {QUEUE_RESET, CONFIG_GENERATION, QUEUE_RING_STATE, QUEUE_INFLIGHT},
    1: _COMMON_READ | {QUEUE_PFN},
}
#: the writable control registers, by transport version
WRITABLE = {
    2: _COMMON_WRITE
    | {QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH}
    | {QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, SHM_SEL, QUEUE_RESET, QUEUE_RING_STATE},
    1: _COMMON_WRITE | {GUEST_PAGE_SIZE, QUEUE_ALIGN, QUEUE_PFN},
}


def is_pow2(n: int) -> bool:
    """GuestPageSize, QueueAlign and a split ring's QueueNum must be powers of 2."""
    return n > 0 and n & (n - 1) == 0


def encode_ring_state(rs: RingState, packed: bool) -> int:
    """QueueRingState: vhost-user's GET_VRING_BASE encoding, for both ends of the ring.

    split: bits 0-15 next avail index, 16-31 next used index (free-running 16-bit);
    packed: bits 0-14 next avail slot, 15 avail wrap counter, 16-30 next used slot,
    31 used wrap counter.
    """
    if packed:
        avail = rs.next_avail | int(rs.avail_wrap) << 15
        used = rs.next_used | int(rs.used_wrap) << 15
        return avail | used << 16
    return rs.next_avail & 0xFFFF | (rs.next_used & 0xFFFF) << 16


def decode_ring_state(value: int, packed: bool) -> RingState:
    """The inverse of ``encode_ring_state``; nothing in flight, nothing signalled since."""
    if packed:
        avail, used = value & 0x7FFF, value >> 16 & 0x7FFF
        return RingState(avail, used, bool(value >> 15 & 1), bool(value >> 31), used)
    avail, used = value & 0xFFFF, value >> 16
    return RingState(avail, used, True, True, used)
