"""What both ring cores share: layout constants, the batch and state types, and the errors.

The Cython core (``emu._ring``) and the pure-Python reference (``emu.pyring``) import these,
so a differential test can compare their results and their failures one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# descriptor flags (split and packed)
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# packed-only descriptor flags
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15

# split ring flags
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

# packed event suppression flags
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# transport / ring feature bits
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_PACKED = 34
F_IN_ORDER = 35
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40

MAX_SPLIT_SIZE = 32768
MAX_PACKED_SIZE = 32768


# -- errors: each one is a distinct guest mistake; the device answers with NEEDS_RESET --


class RingError(Exception):
    """The driver put something into the ring that a device must refuse."""


class RingAddressError(RingError):
    """A ring area, descriptor table or buffer lies (partly) outside guest RAM."""


class RingAlignmentError(RingError):
    """A ring area is not aligned as the spec requires, or the queue size is invalid."""


class DescriptorIndexError(RingError):
    """A head or NEXT index points past the end of the descriptor table."""


class ChainLoopError(RingError):
    """A chain loops or has more descriptors than the queue (or indirect table) holds."""


class ChainLengthError(RingError):
    """A chain's total length does not fit in 32 bits."""


class IndirectError(RingError):
    """Nested indirect, bad table length, INDIRECT with NEXT, or INDIRECT not negotiated."""


class DescriptorOrderError(RingError):
    """A device-readable descriptor follows a device-writable one."""


class AvailIndexError(RingError):
    """The avail index moved by more than the queue size."""


class BufferIdError(RingError):
    """A buffer id (split head or packed id) is out of range or already in flight."""


@dataclass(slots=True)
class Batch:
    """Chains popped in one call, as flat arrays: no Python object per descriptor.

    Chain i owns segments ``chain_start[i]:chain_start[i+1]`` of ``addr``/``length``/``writable``.
    ``heads`` holds the split head index or the packed buffer id: what ``push`` takes back.
    """

    heads: np.ndarray  # uint16[n]
    chain_start: np.ndarray  # uint32[n+1]
    addr: np.ndarray  # uint64[m]
    length: np.ndarray  # uint32[m]
    writable: np.ndarray  # uint8[m]
    #: descriptors the pop read to build this batch (budget accounting; 0 when not popped)
    walked: int = 0

    def __len__(self) -> int:
        return len(self.heads)

    def segments(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.chain_start[i], self.chain_start[i + 1]
        return self.addr[a:b], self.length[a:b], self.writable[a:b]

    @classmethod
    def from_chains(cls, chains: list[tuple[int, list[tuple[int, int, bool]]]]) -> Batch:
        """A Batch rebuilt from saved chains (in-flight requests handed out again)."""
        segs = [s for _, chain in chains for s in chain]
        starts = np.cumsum([0] + [len(chain) for _, chain in chains], dtype=np.uint32)
        return cls(
            np.array([h for h, _ in chains], np.uint16),
            starts,
            np.array([s[0] for s in segs], np.uint64),
            np.array([s[1] for s in segs], np.uint32),
            np.array([s[2] for s in segs], np.uint8),
        )

    @classmethod
    def empty(cls) -> Batch:
        return cls(
            np.zeros(0, np.uint16),
            np.zeros(1, np.uint32),
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint32),
            np.zeros(0, np.uint8),
        )


@dataclass
class InflightChain:
    """A chain fetched and not yet used: what a restored device must submit again."""

    head: int
    ndesc: int
    segments: list[tuple[int, int, bool]]  # (addr, length, writable)


@dataclass
class RingState:
    """Device-private ring state: what cannot be read back from guest memory.

    ``inflight`` lists (head, ndesc) for every chain fetched and not yet used, in fetch
    order; ndesc is how many ring slots the chain took (packed rings skip that many on use).
    """

    next_avail: int = 0
    next_used: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True
    signalled_used: int = 0
    inflight: list[tuple[int, int]] = field(default_factory=list)
