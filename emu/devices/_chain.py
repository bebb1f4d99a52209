"""One popped chain as the stream devices (net, console) see it, the copy loops, and
what a stream device must remember about chains a stop may leave in flight.

The ring core already refused segments outside guest RAM; these helpers still go through
``GuestMemory`` for every access, so a length the guest lied about fails there, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from emu.memory import GuestMemory
from emu.queue import Gate, Virtqueue
from emu.ringdefs import Batch

T = TypeVar("T")


@dataclass(slots=True)
class Chain:
    head: int
    readable: list[tuple[int, int]]  # (gpa, length), driver -> device
    writable: list[tuple[int, int]]  # (gpa, length), device -> driver

    @property
    def in_len(self) -> int:
        """Bytes the device may write."""
        return sum(n for _, n in self.writable)

    @property
    def out_len(self) -> int:
        """Bytes the device may read."""
        return sum(n for _, n in self.readable)


def chains(batch: Batch) -> list[Chain]:
    """Split a batch into chains (one ``tolist`` per array rather than numpy per segment)."""
    starts = batch.chain_start.tolist()
    addr = batch.addr.tolist()
    length = batch.length.tolist()
    writable = batch.writable.tolist()
    out = []
    for i, head in enumerate(batch.heads.tolist()):
        r: list[tuple[int, int]] = []
        w: list[tuple[int, int]] = []
        for j in range(starts[i], starts[i + 1]):
            (w if writable[j] else r).append((addr[j], length[j]))
        out.append(Chain(head, r, w))
    return out


def gather(mem: GuestMemory, chain: Chain, limit: int) -> bytes | None:
    """The chain's readable bytes, or None (nothing copied) when there are more than ``limit``."""
    if chain.out_len > limit:
        return None
    return b"".join(mem.read(a, n) for a, n in chain.readable)


def scatter(mem: GuestMemory, chain: Chain, data: bytes | bytearray | memoryview) -> int:
    """Copy as much of ``data`` as fits into the writable segments; returns bytes written."""
    src = memoryview(data)
    off = 0
    for a, n in chain.writable:
        k = min(n, len(src) - off)
        if k <= 0:
            break
        mem.view(a, k, write=True)[:] = src[off : off + k]
        off += k
    return off


def abandoning(q: Virtqueue) -> bool:
    """A report stop (or a reset) is under way: leave the rest of a batch in flight, not
    executed. A drain stop halts the queue too, but finishes every chain already fetched.
    """
    return q.gate is Gate.CLOSED


@dataclass(slots=True)
class _Entry(Generic[T]):
    seq: int
    heads: list[int]
    item: T


class Unpublished(Generic[T]):
    """What a device did with chains whose used entries may not have reached the guest.

    A report stop drops pushes and delayed completions, so such chains stay in flight and
    the queue hands them out again after resume or restore. Whatever they carried must
    not be lost (rx: the frame or bytes go back to the device's backlog) nor done twice
    (tx: the chain is completed without sending again). ``popped`` forgets heads the
    driver has handed over anew (their earlier use was published), so at most one entry
    per head is kept: the tracker is bounded by the queue size.
    """

    def __init__(self) -> None:
        self._by_head: dict[int, _Entry[T]] = {}
        self._seq = 0

    def popped(self, heads: list[int]) -> None:
        for h in heads:
            self._drop(h)

    def record(self, heads: list[int], item: T) -> None:
        """``item`` went into chains ``heads`` (pushed together, so published together)."""
        entry = _Entry(self._seq, heads, item)
        self._seq += 1
        for h in heads:
            self._drop(h)
            self._by_head[h] = entry

    def settle(self, inflight: list[int]) -> list[T]:
        """At stop: the items of chains still in flight, in the order recorded; clears."""
        found = {id(e): e for h in inflight if (e := self._by_head.get(h)) is not None}
        self._by_head.clear()
        return [e.item for e in sorted(found.values(), key=lambda e: e.seq)]

    def clear(self) -> None:
        self._by_head.clear()

    def _drop(self, head: int) -> None:
        old = self._by_head.get(head)
        if old is not None:
            for h in old.heads:
                if self._by_head.get(h) is old:
                    del self._by_head[h]


def inflight_heads(q: Virtqueue) -> list[int]:
    return [head for head, _ in q.state().inflight]
