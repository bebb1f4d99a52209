"""Guest-side virtio-rng: post one device-writable buffer, get back what the device used."""

from __future__ import annotations

from collections.abc import Callable

from emu.devices.rng import RngDevice
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import attached


class RngDriver:
    def __init__(self, drv: VirtioMmioDriver) -> None:
        self.drv = drv

    @classmethod
    def open(
        cls,
        drv: VirtioMmioDriver,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = None,
    ) -> RngDriver:
        drv.init(packed=packed, event_idx=event_idx, indirect=indirect)
        drv.setup_queue(0, queue_size)
        drv.driver_ok()
        return cls(drv)

    def read(self, n: int) -> bytes:
        """Up to ``n`` random bytes: the used length of one ``n``-byte buffer."""
        self.drv.submit(0, [], [n])
        (c,) = self.drv.wait(0)
        return c.data[: c.length]


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process rng``: 64 bytes of the host's entropy."""
    with attached(RngDevice()) as drv:
        data = RngDriver.open(drv, **opts).read(64)
        say(f"rng: {len(data)} bytes from the host's entropy: {data[:8].hex()}...")
