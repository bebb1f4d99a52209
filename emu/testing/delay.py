"""The delay model: a backend whose completions arrive ``latency`` seconds after the
request ran, so stops find requests in flight with exact control over how many.

Fault injection for tests, benchmarks and ``emu demo``, not a backend a device runs on:
real latency comes from real storage (``blk:nbd://...`` on nbdkit's delay filter, see
emu.testing.nbdkit). Queues publish at once unless a backend defers (emu.queue.Deferred).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import numpy as np

from emu.queue import Virtqueue


class Delay:
    fd = None  # due by time

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self._due: deque[tuple[float, np.ndarray, np.ndarray]] = deque()

    def defer(self, heads: np.ndarray, lengths: np.ndarray) -> None:
        self._due.append((time.monotonic() + self.latency, heads, lengths))

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def take_due(self, now: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while self._due and self._due[0][0] <= now:
            _, heads, lengths = self._due.popleft()
            yield heads, lengths

    def take_all(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while self._due:
            time.sleep(max(0.0, self._due[0][0] - time.monotonic()))
            _, heads, lengths = self._due.popleft()
            yield heads, lengths

    def cancel(self) -> None:
        """The requests already ran: nothing to fence."""
        self._due.clear()

    def drop(self) -> None:
        self._due.clear()

    def take_uncertain(self) -> int:
        return 0  # the requests ran before their completions were held

    def count(self) -> int:
        return sum(len(heads) for _, heads, _ in self._due)


def hold_completions(q: Virtqueue, latency: float) -> None:
    """Publish ``q``'s used entries ``latency`` seconds after each request ran (0: at once).

    Set it before the device serves the queue, or while it is stopped.
    """
    if isinstance(q.deferred, Delay):  # keep what it holds
        q.deferred.latency = latency
    elif latency > 0:
        q.deferred = Delay(latency)
