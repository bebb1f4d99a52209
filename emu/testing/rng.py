"""Guest-side virtio-rng: post one device-writable buffer, get back what the device used."""

from __future__ import annotations

from emu.testing.driver import VirtioMmioDriver


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
