"""One popped chain as the stream devices (net, console) see it, and the copy loops.

The ring core already refused segments outside guest RAM; these helpers still go through
``GuestMemory`` for every access, so a length the guest lied about fails there, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.memory import GuestMemory
from emu.ringdefs import Batch


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
