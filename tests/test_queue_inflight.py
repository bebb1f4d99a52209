"""Virtqueue.inflight over many batches: the ring holds each chain's segments while it is
in flight, so a chain held across hundreds of pops still reports its own segments, and so
do chains whose heads were used and fetched again since; a restored chain reports the
segments it was restored with."""

from __future__ import annotations

import pytest

from emu.memory import GuestMemory
from emu.queue import Virtqueue
from emu.ringdefs import F_VERSION_1, InflightChain, RingState
from tests.ringbuilder import BUF, SplitBuilder, make_memory

SIZE = 8
POPS = 200


def offer(ring: SplitBuilder, head: int, n: int) -> list[tuple[int, int, bool]]:
    """A chain of two buffers at ``head`` whose addresses say which offer it was."""
    bufs = [(BUF + 64 * (n % 64), 16, 0), (BUF + 0x8000 + 64 * (n % 64), 8, 2)]
    ring.chain(head, bufs)
    ring.offer(head)
    return [(a, ln, bool(f)) for a, ln, f in bufs]


def queue(impl: str) -> tuple[GuestMemory, SplitBuilder, Virtqueue]:
    """Guest memory, the driver's side of a split ring in it, and a queue over it (not
    started) on the ring core ``impl``."""
    mem = make_memory()
    ring = SplitBuilder(mem, SIZE)
    q = Virtqueue(0, SIZE)
    q.impl = impl
    q.desc, q.driver, q.device = ring.areas()
    return mem, ring, q


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_inflight_after_many_batches(impl: str) -> None:
    mem, ring, q = queue(impl)
    q.start(mem, 1 << F_VERSION_1)
    held = offer(ring, 0, 0)  # the chain a device keeps all along (a net rx buffer, say)
    q.begin_pass()
    assert q.pop(1).heads.tolist() == [0]
    expected: dict[int, list[tuple[int, int, bool]]] = {0: held}
    for n in range(1, POPS):
        head = 2 * (1 + n % 3)  # heads 2, 4, 6 again and again; head 6 stays out below
        expected[head] = offer(ring, head, n)
        q.begin_pass()
        assert q.pop(1).heads.tolist() == [head]
        if n < POPS - 3:
            q.push([head], [0])
            del expected[head]
    got = q.inflight()
    assert [c.head for c in got] == [h for h, _ in q.state().inflight]
    assert {c.head: c.segments for c in got} == expected
    assert all(isinstance(c, InflightChain) and c.ndesc == 2 for c in got)
    q.push([c.head for c in got], [0] * len(got))
    assert q.inflight() == []
    q.stop()
    q.close()
    mem.close()


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_restored_chains_report_their_segments(impl: str) -> None:
    mem, ring, q = queue(impl)
    segs = {3: [(BUF, 16, 0), (BUF + 0x100, 8, 1)], 5: [(BUF + 0x200, 1, 1)]}
    chains = [InflightChain(h, len(s), s) for h, s in segs.items()]
    state = RingState(2, 0, True, True, 0, [(3, 2), (5, 1)])
    q.start(mem, 1 << F_VERSION_1, state, chains)
    assert q.inflight() == chains
    q.begin_pass()
    assert q.pop(8).heads.tolist() == [3, 5]  # handed out again, still reported
    assert q.inflight() == chains
    q.push([5], [1])
    assert q.inflight() == chains[:1]
    q.stop()
    with pytest.raises(ValueError, match="not in flight"):  # a chain the state does not hold
        q.start(mem, 1 << F_VERSION_1, RingState(2, 0, True, True, 0, [(3, 2)]), chains)
    q.close()
    mem.close()


@pytest.mark.parametrize("impl", ["python", "cython"])
@pytest.mark.parametrize("bad", [(-1, 16, 0), (BUF, 2**32, 1), (2**64, 1, 0)])
def test_a_restored_segment_out_of_range_is_refused(impl: str, bad: tuple) -> None:
    mem, ring, q = queue(impl)
    state = RingState(1, 0, True, True, 0, [(3, 1)])
    with pytest.raises(ValueError, match="out of range"):  # the device fails the queue
        q.start(mem, 1 << F_VERSION_1, state, [InflightChain(3, 1, [bad])])
    assert not q.started
    q.close()
    mem.close()
