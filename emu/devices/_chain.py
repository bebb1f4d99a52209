"""One popped chain as the stream devices (net, console) see it, the copy loops, and
what a stream device must remember about chains a stop may leave in flight.

``ChainReader`` and ``ChainWriter`` move bytes out of a chain's device-readable buffers
and into its device-writable ones, front to back across segment boundaries, for devices
that parse a byte stream (headers, then payload, then a status). Every read or write is
checked against what the chain holds first: asking for more is a ``ChainError`` (a
``DeviceError``: the device needs a reset unless it answers with an error status itself)
and moves nothing.

The ring core already refused segments outside guest RAM; these helpers still go through
``GuestMemory`` for every access, so a length the guest lied about fails there, not here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from emu.devices.base import DeviceError
from emu.memory import GuestMemory
from emu.queue import CLOSED, Virtqueue
from emu.ringdefs import Batch

try:
    from emu._ring import split_chains as _split
except ImportError:  # not built: the Python split below
    _split = None

T = TypeVar("T")


class Chain(NamedTuple):
    """One popped chain: its head and its buffers as (gpa, length) pairs.

    A tuple, so that ``chains`` can make one in C for every request a device serves."""

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
    """Split a batch into chains: in C by the ring core when it is built, else one
    ``tolist`` per array rather than numpy per segment."""
    if _split is not None and (out := _split(batch, Chain)) is not None:
        return out
    return _chains(batch)


def _chains(batch: Batch) -> list[Chain]:
    """``chains`` in Python (the reference of emu._ring.split_chains)."""
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


class ChainError(DeviceError):
    """The chain holds fewer bytes (or less room) than the request needs."""


class _Cursor:
    """A position in a list of (gpa, length) segments."""

    def __init__(self, segments: list[tuple[int, int]], what: str) -> None:
        self._segs = segments
        self._i = 0
        self._off = 0  # into segment _i
        self.left = sum(n for _, n in segments)
        self._what = what

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` bytes as (gpa, length) pieces (for preadv/pwritev); ChainError
        (and nothing taken) when fewer are left."""
        if n < 0 or n > self.left:
            raise ChainError(f"chain has {self.left} {self._what} bytes left, {n} needed")
        out = []
        while n:
            gpa, length = self._segs[self._i]
            k = min(n, length - self._off)
            if k:
                out.append((gpa + self._off, k))
            n -= k
            self.left -= k
            self._off += k
            if self._off == length:
                self._i, self._off = self._i + 1, 0
        return out


class ChainReader:
    """Bytes out of a chain's device-readable buffers, front to back."""

    def __init__(self, mem: GuestMemory, chain: Chain) -> None:
        self.mem = mem
        self._cur = _Cursor(chain.readable, "readable")

    @property
    def left(self) -> int:
        """Readable bytes not read yet."""
        return self._cur.left

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (ChainError, nothing read, when the chain has fewer)."""
        return b"".join(self.mem.read(a, k) for a, k in self._cur.take(n))

    def read_upto(self, n: int) -> bytes:
        return self.read(min(n, self.left))

    def unpack(self, st: struct.Struct) -> tuple:
        """The next ``st.size`` bytes as ``st`` lays them out."""
        return st.unpack(self.read(st.size))

    def skip(self, n: int) -> None:
        self._cur.take(n)

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` bytes as (gpa, length) pieces, not copied."""
        return self._cur.take(n)


class ChainWriter:
    """Bytes into a chain's device-writable buffers, front to back; ``written`` is what
    the used entry's length must say."""

    def __init__(self, mem: GuestMemory, chain: Chain) -> None:
        self.mem = mem
        self._cur = _Cursor(chain.writable, "writable")
        self.written = 0

    @property
    def room(self) -> int:
        """Writable bytes not written yet."""
        return self._cur.left

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """All of ``data`` (ChainError, nothing written, when it does not fit)."""
        src = memoryview(data).cast("B")
        off = 0
        for a, k in self._cur.take(len(src)):
            self.mem.view(a, k, write=True)[:] = src[off : off + k]
            off += k
        self.written += off

    def write_upto(self, data: bytes | bytearray | memoryview) -> int:
        """As much of ``data`` as fits; returns how much that was."""
        n = min(len(data), self.room)
        self.write(memoryview(data)[:n])
        return n

    def pack(self, st: struct.Struct, *values: object) -> None:
        self.write(st.pack(*values))

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` bytes as (gpa, length) pieces, for the caller to fill (counted
        as written)."""
        pieces = self._cur.take(n)
        self.written += n
        return pieces


def gather(mem: GuestMemory, chain: Chain, limit: int) -> bytes | None:
    """The chain's readable bytes, or None (nothing copied) when there are more than ``limit``."""
    if chain.out_len > limit:
        return None
    r = ChainReader(mem, chain)
    return r.read(r.left)


def scatter(mem: GuestMemory, chain: Chain, data: bytes | bytearray | memoryview) -> int:
    """Copy as much of ``data`` as fits into the writable segments; returns bytes written."""
    return ChainWriter(mem, chain).write_upto(data)


def abandoning(q: Virtqueue) -> bool:
    """A report stop (or a reset) is under way: leave the rest of a batch in flight, not
    executed. A drain stop halts the queue too, but finishes every chain already fetched.
    """
    return q.gate is CLOSED


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


def serve_output(
    q: Virtqueue,
    batch_size: int,
    out: Unpublished[int],
    sent: set[int],
    act: Callable[[Chain], None],
    full: Callable[[], bool] | None = None,
) -> bool:
    """Serve a queue of output chains (net, console and vsock tx) until the driver has no
    more, ``act`` on each once. A chain acted on whose used entry a report stop kept back
    is in ``sent`` (``out`` settled at the stop): handed out again, it is only completed.
    ``full``, asked after each batch: True ends serving early, kicks left off, until the
    device has made room (vsock's replies); what this returns."""
    while True:
        q.set_kicks(False)
        while len(batch := q.pop(batch_size)):
            out.popped(batch.heads.tolist())
            done = 0
            for c in chains(batch):
                if abandoning(q):  # report stop: the rest stays in flight, not acted on
                    break
                if c.head in sent:
                    sent.discard(c.head)
                else:
                    act(c)
                out.record([c.head], c.head)
                done += 1
            q.push(batch.heads[:done], [0] * done)
            if full is not None and full():
                return True
        if not q.set_kicks(True):
            return False


def inflight_heads(q: Virtqueue) -> list[int]:
    return [head for head, _ in q.state().inflight]
