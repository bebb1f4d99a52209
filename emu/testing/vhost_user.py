"""The reference driver over vhost-user: emu's frontend with the reference driver's rings.

``VhostUserDriver`` has the methods of ``VirtioMmioDriver`` the device helpers use (init,
setup_queue, driver_ok, submit, kick, wait, config_read, queues), so BlkDriver,
RngDriver, GuestNet and GuestConsole drive a vhost-user backend (emu's or a C one)
exactly as they drive an in-process device. The protocol is the bridge's
(``emu.vhost_user.frontend``); the rings and buffers are ``DriverQueue``'s.
"""

from __future__ import annotations

import time
from typing import Any

from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.testing.driver_queue import Completion, DriverQueue
from emu.testing.guest_alloc import GuestAllocator
from emu.vhost_user.frontend import VhostUserFrontend


class VhostUserDriver(VhostUserFrontend):
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

    def submit(self, qidx: int, out: list[bytes], in_sizes: list[int]) -> int:
        q = self.queues[qidx]
        token = q.add(out, in_sizes)
        if q.kick_needed():
            self.kick(qidx)
        return token

    def wait(self, qidx: int, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        """The next ``count`` completions of queue ``qidx``, sleeping on its call eventfd."""
        q = self.queues[qidx]
        got = self._backlog.pop(qidx, [])
        deadline = time.monotonic() + timeout
        try:
            while True:
                got += q.poll()
                if len(got) >= count:
                    break
                if not self.wait_call(qidx, deadline - time.monotonic()):
                    raise TimeoutError(f"queue {qidx}: {len(got)} of {count} completions")
        finally:
            if len(got) > count:
                self._backlog[qidx] = got[count:]
            elif len(got) < count:
                self._backlog[qidx] = got
        return got[:count]
