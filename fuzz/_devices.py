"""Fresh emu devices for the targets, with backends that stay in the process.

The blk image is one small temp file for the whole run: what a guest writes to it does
not matter to any property checked, only that every request is answered safely.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from emu.backends.chardev import BufferChar
from emu.devices.base import VirtioDevice
from emu.devices.blk import BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.rng import RngDevice

IMAGE_BYTES = 64 * 1024
_dir = tempfile.mkdtemp(prefix="emu-fuzz-")
atexit.register(shutil.rmtree, _dir, True)
IMAGE = os.path.join(_dir, "disk.img")
with open(IMAGE, "wb") as f:
    f.truncate(IMAGE_BYTES)

#: virtio device id -> the variants a target may ask for
KINDS = {1: "net", 2: "blk", 3: "console", 4: "rng"}


class NullNet:
    """A net backend that keeps the last frames sent (bounded) and delivers nothing itself."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.device: NetDevice | None = None

    def attach(self, device: NetDevice) -> None:
        self.device = device

    def send(self, frame: bytes) -> None:
        self.sent = [*self.sent[-7:], frame]

    def close(self) -> None:
        self.device = None


def make(device_id: int, variant: int = 0, queue_max_size: int = 16) -> VirtioDevice:
    """A device of virtio type ``device_id`` (rng for anything unknown); ``variant`` picks
    constructor options (multiqueue, multiport, read-only, ...)."""
    q = queue_max_size
    if device_id == 1:
        return NetDevice(
            NullNet(),
            queue_pairs=1 + variant % 2,
            mrg_rxbuf=variant & 2 == 0,
            queue_max_size=q,
            backlog=8,
        )
    if device_id == 2:
        return BlkDevice(
            IMAGE,
            readonly=bool(variant & 1),
            num_queues=1 + (variant >> 1 & 1),
            logical_block_size=512 << (variant >> 2 & 1),
            seg_max=8,
            queue_max_size=q,
        )
    if device_id == 3:
        if variant & 1:
            return ConsoleDevice(
                BufferChar(),
                multiport=True,
                max_ports=3,
                ports={1: ("fuzz", BufferChar())},
                queue_max_size=q,
            )
        return ConsoleDevice(BufferChar(), queue_max_size=q)
    return RngDevice(queue_max_size=q)
