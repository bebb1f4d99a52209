"""One virtqueue, whatever ring format the driver chose.

The transport fills in the configuration (size, addresses, ready); the device only pops
chains and pushes used entries. ``pop``/``push`` go straight to the ring core, and ``push``
raises the used-buffer notification itself when the ring says the driver wants one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from emu import pyring
from emu.memory import GuestMemory
from emu.ringdefs import F_RING_PACKED, Batch, RingState

try:
    from emu import _ring as _cring
except ImportError:  # not built: the pure-Python twin still works, only slower
    _cring = None


def ring_module(impl: str | None = None) -> Any:
    """The ring core to use: "cython" (default when built) or "python" (EMU_RING overrides)."""
    impl = impl or os.environ.get("EMU_RING") or ("cython" if _cring else "python")
    if impl == "python":
        return pyring
    if impl == "cython":
        if _cring is None:
            raise RuntimeError(
                "emu._ring is not built; run `pip install -e .` or set EMU_RING=python"
            )
        return _cring
    raise ValueError(f"unknown ring implementation {impl!r}")


class Virtqueue:
    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.notify: Callable[[], None] = lambda: None
        self.ring: Any = None
        self.impl: str | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the power-on configuration (spec: on device or queue reset)."""
        self.size = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0
        self.ring = None

    @property
    def packed(self) -> bool:
        return bool(self.features >> F_RING_PACKED & 1) if self.ring is not None else False

    def start(self, mem: GuestMemory, features: int, state: RingState | None = None) -> None:
        """Build the ring over guest memory once the driver has set the queue up.

        Raises RingError when the configured areas are not usable (outside RAM, misaligned).
        """
        self.features = features
        mod = ring_module(self.impl)
        cls = mod.PackedRing if features >> F_RING_PACKED & 1 else mod.SplitRing
        self.ring = cls(mem, self.size, self.desc, self.driver, self.device, features)
        if state is not None:
            self.ring.set_state(state)

    def stop(self) -> None:
        self.ring = None

    @property
    def started(self) -> bool:
        return self.ring is not None

    def pop(self, max_chains: int = 64) -> Batch:
        return self.ring.pop(max_chains)

    def push(self, heads: np.ndarray | list[int], lengths: np.ndarray | list[int]) -> None:
        if self.ring.push(np.asarray(heads, np.uint16), np.asarray(lengths, np.uint32)):
            self.notify()

    def set_kicks(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not); True when chains are waiting already."""
        return self.ring.set_notify(enabled)

    def state(self) -> RingState:
        return self.ring.state()

    def clear_kick(self) -> None:
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def close(self) -> None:
        os.close(self.kick_fd)
