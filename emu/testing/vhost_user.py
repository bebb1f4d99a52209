"""The reference driver over vhost-user: emu's frontend with the reference driver's rings.

``VhostUserDriver`` has the methods of ``VirtioMmioDriver`` the device helpers use (init,
setup_queue, driver_ok, submit, kick, wait, config_read, queues), so BlkDriver,
RngDriver, GuestNet and GuestConsole drive a vhost-user backend (emu's or a C one)
exactly as they drive an in-process device. The protocol is the bridge's
(``emu.vhost_user.frontend``); the rings and buffers are ``DriverQueue``'s.
"""

from __future__ import annotations

from typing import Any

from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.testing.driver_queue import Completion, DriverQueue, QueueUser
from emu.testing.guest_alloc import GuestAllocator
from emu.vhost_user.frontend import VhostUserFrontend


class VhostUserDriver(QueueUser, VhostUserFrontend):
    queues: dict[int, DriverQueue]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``VhostUserFrontend``'s arguments."""
        super().__init__(*args, **kwargs)
        self.alloc = GuestAllocator(self.mem)
        self._backlog: dict[int, list[Completion]] = {}

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        q = DriverQueue(
            self.mem,
            self.alloc,
            index,
            size or 256,
            packed=bool(self.features >> F_RING_PACKED & 1),
            event_idx=bool(self.features >> F_EVENT_IDX & 1),
            indirect=bool(self.features >> F_INDIRECT_DESC & 1),
        )
        self.setup_vring(q)
        return q

    def sleep(self, qidx: int, timeout: float) -> bool:
        return self.wait_call(qidx, timeout)
