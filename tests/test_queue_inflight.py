"""Virtqueue.inflight over many batches: a chain held across more pops than the queue
keeps whole batches for (``KEEP_BATCHES``) still reports its own segments, and so do
chains whose heads were used and fetched again since."""

from __future__ import annotations

import pytest

from emu.memory import GuestMemory
from emu.queue import KEEP_BATCHES, Virtqueue
from emu.ringdefs import F_VERSION_1, InflightChain
from tests.ringbuilder import BUF, SplitBuilder, make_memory

SIZE = 8


def offer(ring: SplitBuilder, head: int, n: int) -> list[tuple[int, int, bool]]:
    """A chain of two buffers at ``head`` whose addresses say which offer it was."""
    bufs = [(BUF + 64 * (n % 64), 16, 0), (BUF + 0x8000 + 64 * (n % 64), 8, 2)]
    ring.chain(head, bufs)
    ring.offer(head)
    return [(a, ln, bool(f)) for a, ln, f in bufs]


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_inflight_after_many_batches(impl: str) -> None:
    mem: GuestMemory = make_memory()
    ring = SplitBuilder(mem, SIZE)
    q = Virtqueue(0, SIZE)
    q.impl = impl
    q.desc, q.driver, q.device = ring.areas()
    q.start(mem, 1 << F_VERSION_1)
    held = offer(ring, 0, 0)  # the chain a device keeps all along (a net rx buffer, say)
    q.begin_pass()
    assert q.pop(1).heads.tolist() == [0]
    expected: dict[int, list[tuple[int, int, bool]]] = {0: held}
    for n in range(1, 3 * KEEP_BATCHES):
        head = 2 * (1 + n % 3)  # heads 2, 4, 6 again and again; head 6 stays out below
        expected[head] = offer(ring, head, n)
        q.begin_pass()
        assert q.pop(1).heads.tolist() == [head]
        if n < 3 * KEEP_BATCHES - 3:
            q.push([head], [0])
            del expected[head]
    assert len(q._batches) <= KEEP_BATCHES  # folded, not one batch kept per pop
    got = q.inflight()
    assert [c.head for c in got] == [h for h, _ in q.state().inflight]
    assert {c.head: c.segments for c in got} == expected
    assert all(isinstance(c, InflightChain) and c.ndesc == 2 for c in got)
    q.push([c.head for c in got], [0] * len(got))
    assert q.inflight() == [] and q._batches == []
    q.stop()
    q.close()
    mem.close()
