"""A device behind its own virtio-mmio transport and guest RAM, the reference driver on top:
what each driver helper's ``demo`` (``emu demo --in-process``) and many tests start from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

GUEST_RAM = 16 << 20


@contextmanager
def attached(device: VirtioDevice) -> Iterator[VirtioMmioDriver]:
    """The driver of ``device`` in fresh guest RAM; closes both afterwards."""
    mem = GuestMemory.create(GUEST_RAM)
    try:
        yield VirtioMmioDriver(MmioTransport(device, mem), mem)
    finally:
        device.close()
        mem.close()


def rings(features: int) -> str:
    """The negotiated ring format, e.g. "packed+event-idx+indirect"."""
    fmt = "packed" if features >> F_RING_PACKED & 1 else "split"
    extra = [
        n
        for b, n in ((F_EVENT_IDX, "event-idx"), (F_INDIRECT_DESC, "indirect"))
        if features >> b & 1
    ]
    return "+".join([fmt, *extra])
