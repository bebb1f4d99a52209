"""Hostile rings: every guest mistake raises its own RingError subclass, in both cores.

Each case writes a broken ring with the test's own builder and checks the exact error class
(not just RingError), so the two cores cannot drift apart in how they classify input. None
of these may crash the process or hang: loops are bounded by the queue size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
from ringbuilder import BUF, RAM1, PackedBuilder, SplitBuilder, make_memory

from emu import _ring, pyring
from emu.memory import GuestMemory
from emu.ringdefs import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_INDIRECT_DESC,
    AvailIndexError,
    BufferIdError,
    ChainLengthError,
    ChainLoopError,
    DescriptorIndexError,
    DescriptorOrderError,
    IndirectError,
    RingAddressError,
    RingError,
)

N, W, IND = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
INDIRECT = 1 << F_INDIRECT_DESC
TABLE = 0x10000  # indirect tables go here (RAM0)
HOLE = 0x50000  # between RAM0 and RAM1: not RAM
RAM1_END = RAM1[0] + RAM1[1]
SIZE = 8


@pytest.fixture(params=[pyring, _ring], ids=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_memory()
    yield m
    m.close()


# -- construction --


@pytest.mark.parametrize(
    "cls,areas",
    [
        ("SplitRing", (HOLE, 0x9000, 0xA000)),  # desc table in the hole
        ("SplitRing", (0x1FF90, 0x9000, 0xA000)),  # desc table straddles RAM0's end
        ("SplitRing", (0x1000, 0x1FFF8, 0xA000)),  # avail ring straddles the end
        ("SplitRing", (0x1000, 0x9000, RAM1_END - 8)),  # used ring straddles RAM1's end
        ("SplitRing", (0x1000, 0x9000, -16)),
        ("SplitRing", (2**64 - 16, 0x9000, 0xA000)),  # wraps 2^64
        ("SplitRing", (2**64, 0x9000, 0xA000)),
        ("PackedRing", (HOLE, 0x9000, 0x9004)),
        ("PackedRing", (0x1000, RAM1_END, 0x9004)),
        ("PackedRing", (0x1000, 0x9000, 0x1FFFC + 4)),
    ],
)
def test_ring_areas_outside_ram(impl, mem, cls, areas):
    with pytest.raises(RingAddressError):
        getattr(impl, cls)(mem, SIZE, *areas, 0)


# -- split rings: one broken ring per case --


def _split_cases() -> list[tuple[str, int, Callable[[SplitBuilder], None], type[RingError]]]:
    def chain(*bufs):
        return lambda b: (b.chain(0, list(bufs)), b.offer(0))

    def descs(*entries, head=0):
        def build(b):
            for i, e in entries:
                b.desc(i, *e)
            b.offer(head)

        return build

    def indirect(table, length=None, flags=IND):
        def build(b):
            b.table(TABLE, table)
            b.desc(0, TABLE, 16 * len(table) if length is None else length, flags, 1)
            b.desc(1, BUF, 1, W, 0)
            b.offer(0)

        return build

    return [
        ("buffer in the hole", 0, chain((HOLE, 16, 0)), RingAddressError),
        ("buffer past the end", 0, chain((RAM1_END, 1, W)), RingAddressError),
        ("buffer straddles region end", 0, chain((RAM1_END - 8, 16, W)), RingAddressError),
        ("zero-length buffer outside RAM", 0, chain((HOLE, 0, 0)), RingAddressError),
        ("addr+len wraps 2^64", 0, chain((2**64 - 16, 32, 0)), RingAddressError),
        ("addr at 2^64-1", 0, chain((2**64 - 1, 1, W)), RingAddressError),
        ("NEXT cycle", 0, descs((0, (BUF, 1, N, 1)), (1, (BUF, 1, N, 0))), ChainLoopError),
        ("NEXT to itself", 0, descs((3, (BUF, 1, N, 3)), head=3), ChainLoopError),
        ("NEXT past the table", 0, descs((0, (BUF, 1, N, SIZE))), DescriptorIndexError),
        ("head >= size", 0, lambda b: b.offer(SIZE), DescriptorIndexError),
        ("head 0xFFFF", 0, lambda b: b.offer(0xFFFF), DescriptorIndexError),
        (
            "head already in flight",
            0,
            lambda b: (b.chain(2, [(BUF, 1, W)]), b.offer(2, 2)),
            BufferIdError,
        ),
        ("avail idx jumps by size+1", 0, lambda b: b.set_avail_idx(SIZE + 1), AvailIndexError),
        ("avail idx goes backwards", 0, lambda b: b.set_avail_idx(0xFFFF), AvailIndexError),
        (
            "readable after writable",
            0,
            chain((BUF, 1, W), (BUF, 1, 0)),
            DescriptorOrderError,
        ),
        ("INDIRECT not negotiated", 0, indirect([(BUF, 1, 0, 0)]), IndirectError),
        ("INDIRECT with NEXT", INDIRECT, indirect([(BUF, 1, 0, 0)], flags=IND | N), IndirectError),
        ("indirect table len 0", INDIRECT, indirect([], length=0), IndirectError),
        ("indirect table len 24", INDIRECT, indirect([(BUF, 1, 0, 0)], 24), IndirectError),
        (
            "indirect table > size entries",
            INDIRECT,
            indirect([(BUF, 1, 0, 0)] * (SIZE + 1)),
            IndirectError,
        ),
        (
            "nested indirect",
            INDIRECT,
            indirect([(BUF, 1, N, 1), (TABLE, 16, IND, 0)]),
            IndirectError,
        ),
        (
            "indirect table outside RAM",
            INDIRECT,
            lambda b: (b.desc(0, HOLE, 32, IND, 0), b.offer(0)),
            RingAddressError,
        ),
        (
            "indirect table straddles RAM end",
            INDIRECT,
            lambda b: (b.desc(0, 0x20000 - 16, 32, IND, 0), b.offer(0)),
            RingAddressError,
        ),
        (
            "indirect NEXT cycle",
            INDIRECT,
            indirect([(BUF, 1, N, 1), (BUF, 1, N, 0)]),
            ChainLoopError,
        ),
        (
            "indirect NEXT past the table",
            INDIRECT,
            indirect([(BUF, 1, N, 2), (BUF, 1, 0, 0)]),
            DescriptorIndexError,
        ),
        (
            "indirect buffer outside RAM",
            INDIRECT,
            indirect([(HOLE, 1, 0, 0)]),
            RingAddressError,
        ),
        (
            "indirect: readable after writable",
            INDIRECT,
            indirect([(BUF, 1, W | N, 1), (BUF, 1, 0, 0)]),
            DescriptorOrderError,
        ),
        (
            "writable direct, then readable indirect",
            INDIRECT,
            lambda b: (
                b.table(TABLE, [(BUF, 1, 0, 0)]),
                b.desc(0, BUF, 1, W | N, 1),
                b.desc(1, TABLE, 16, IND, 0),
                b.offer(0),
            ),
            DescriptorOrderError,
        ),
    ]


SPLIT_CASES = _split_cases()


@pytest.mark.parametrize(
    "features,build,error", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES]
)
def test_split_hostile(impl, mem, features, build, error):
    b = SplitBuilder(mem, SIZE)
    ring = impl.SplitRing(mem, SIZE, *b.areas(), features)
    build(b)
    with pytest.raises(error):
        ring.pop(SIZE)


def test_chain_of_2_pow_32_bytes(impl):
    """Two 2 GiB buffers (both in RAM: a sparse region) add up to 2^32 > 0xFFFFFFFF."""
    mem = make_memory()
    big = mem.add_region(0x1_0000_0000, 0x8000_0000)
    try:
        b = SplitBuilder(mem, SIZE)
        ring = impl.SplitRing(mem, SIZE, *b.areas(), 0)
        b.chain(0, [(big.gpa, 0x8000_0000, 0), (big.gpa, 0x7FFF_FFFF, W)])  # exactly 2^32 - 1
        b.chain(2, [(big.gpa, 0x8000_0000, 0), (big.gpa, 0x8000_0000, W)])
        b.offer(0, 2)
        with pytest.raises(ChainLengthError):
            ring.pop(SIZE)
        assert ring.inflight() == [0]  # the chain before the bad one was fetched
    finally:
        mem.close()


# -- packed rings --


def _packed_cases() -> list[tuple[str, int, Callable[[PackedBuilder], None], type[RingError]]]:
    def indirect(table, length=None, flags=IND):
        def build(b):
            b.table(TABLE, table)
            b.offer(0, [(TABLE, 16 * len(table) if length is None else length, flags)])

        return build

    def all_next(b):
        for s in range(SIZE):
            b.raw(s, BUF, 1, 0, N | b.avail_bits(True))

    return [
        ("buffer in the hole", 0, lambda b: b.offer(0, [(HOLE, 1, W)]), RingAddressError),
        (
            "buffer straddles region end",
            0,
            lambda b: b.offer(0, [(BUF, 1, 0), (RAM1_END - 1, 2, W)]),
            RingAddressError,
        ),
        ("addr+len wraps 2^64", 0, lambda b: b.offer(0, [(2**64 - 1, 2, W)]), RingAddressError),
        ("NEXT on every slot", 0, all_next, ChainLoopError),
        ("buffer id >= size", 0, lambda b: b.offer(SIZE, [(BUF, 1, W)]), BufferIdError),
        (
            "buffer id in flight",
            0,
            lambda b: (b.offer(3, [(BUF, 1, W)]), b.offer(3, [(BUF, 1, W)])),
            BufferIdError,
        ),
        (
            "readable after writable",
            0,
            lambda b: b.offer(0, [(BUF, 1, W), (BUF, 1, 0)]),
            DescriptorOrderError,
        ),
        ("INDIRECT not negotiated", 0, indirect([(BUF, 1, 0)]), IndirectError),
        ("INDIRECT with NEXT", INDIRECT, indirect([(BUF, 1, 0)], flags=IND | N), IndirectError),
        ("indirect table len 0", INDIRECT, indirect([], length=0), IndirectError),
        ("indirect table len 8", INDIRECT, indirect([(BUF, 1, 0)], length=8), IndirectError),
        (
            "indirect table > size entries",
            INDIRECT,
            indirect([(BUF, 1, 0)] * (SIZE + 1)),
            IndirectError,
        ),
        ("nested indirect", INDIRECT, indirect([(BUF, 1, 0), (TABLE, 16, IND)]), IndirectError),
        (
            "indirect table outside RAM",
            INDIRECT,
            lambda b: b.offer(0, [(HOLE, 16, IND)]),
            RingAddressError,
        ),
        (
            "indirect: readable after writable",
            INDIRECT,
            indirect([(BUF, 1, W), (BUF, 1, 0)]),
            DescriptorOrderError,
        ),
    ]


PACKED_CASES = _packed_cases()


@pytest.mark.parametrize(
    "features,build,error", [c[1:] for c in PACKED_CASES], ids=[c[0] for c in PACKED_CASES]
)
def test_packed_hostile(impl, mem, features, build, error):
    b = PackedBuilder(mem, SIZE)
    ring = impl.PackedRing(mem, SIZE, *b.areas(), features)
    build(b)
    with pytest.raises(error):
        ring.pop(SIZE)


def test_packed_chain_of_size_slots_is_fine(impl, mem):
    """The longest legal packed chain uses every slot; one more NEXT makes it a loop."""
    b = PackedBuilder(mem, SIZE)
    ring = impl.PackedRing(mem, SIZE, *b.areas(), 0)
    b.offer(5, [(BUF, 1, 0)] * SIZE)
    batch = ring.pop(SIZE)
    assert batch.heads.tolist() == [5] and batch.chain_start.tolist() == [0, SIZE]
    assert ring.state().inflight == [(5, SIZE)]
    assert ring.state().avail_wrap is False


def test_split_chain_of_size_descriptors_is_fine(impl, mem):
    b = SplitBuilder(mem, SIZE)
    ring = impl.SplitRing(mem, SIZE, *b.areas(), 0)
    b.chain(3, [(BUF, 1, 0)] * SIZE)
    b.offer(3)
    assert ring.pop(SIZE).chain_start.tolist() == [0, SIZE]


def test_indirect_table_of_size_entries_is_fine(impl, mem):
    b = SplitBuilder(mem, SIZE)
    ring = impl.SplitRing(mem, SIZE, *b.areas(), INDIRECT)
    b.table(TABLE, [(BUF, 1, N, k + 1) for k in range(SIZE - 1)] + [(BUF, 1, 0, 0)])
    b.desc(0, TABLE, 16 * SIZE, IND, 0)
    b.offer(0)
    assert ring.pop(SIZE).chain_start.tolist() == [0, SIZE]


# -- a full ring whose chains all share descriptors: legal one by one, quadratic together --


def _shared_tail(mem: GuestMemory, impl: ModuleType, size: int):
    """Descriptor i links to i+1, and every head is offered: chain k walks size - k."""
    b = SplitBuilder(mem, size, desc=0x1000, driver=0x11000, device=0x14000)
    ring = impl.SplitRing(mem, size, *b.areas(), 0)
    for i in range(size):
        b.desc(i, BUF, 1, N if i < size - 1 else 0, i + 1)
    b.offer(*range(size))
    return ring, [size - k for k in range(size)]


def _shared_table(mem: GuestMemory, impl: ModuleType, size: int):
    """Every split head points at the same indirect table of ``size`` entries."""
    b = SplitBuilder(mem, size, desc=0x1000, driver=0x11000, device=0x14000)
    ring = impl.SplitRing(mem, size, *b.areas(), INDIRECT)
    b.table(BUF, [(BUF, 1, N, k + 1) for k in range(size - 1)] + [(BUF, 1, 0, 0)])
    for i in range(size):
        b.desc(i, BUF, 16 * size, IND)
    b.offer(*range(size))
    return ring, [size + 1] * size


def _packed_shared_table(mem: GuestMemory, impl: ModuleType, size: int):
    """Every packed slot is a chain pointing at the same indirect table."""
    b = PackedBuilder(mem, size, desc=0x1000, driver=0x11000, device=0x11004)
    ring = impl.PackedRing(mem, size, *b.areas(), INDIRECT)
    b.table(BUF, [(BUF, 1, 0)] * size)
    for i in range(size):
        b.offer(i, [(BUF, 16 * size, IND)])
    return ring, [size + 1] * size


SHARED = {"tail": _shared_tail, "table": _shared_table, "packed-table": _packed_shared_table}


def _bounded_pops(ring, cost: list[int], budget: int, pops: int | None = None) -> int:
    """Pop with a budget; every pop reads at most max(budget, its first chain's cost), takes
    the chains in ring order, and all of them come out, each once. Returns the pops."""
    taken = 0
    n = 0
    while taken < len(cost) and (pops is None or n < pops):
        batch = ring.pop(len(cost), max_descs=budget)
        n += 1
        assert len(batch) >= 1
        assert batch.walked <= max(budget, cost[taken])
        assert sum(cost[taken : taken + len(batch)]) <= max(budget, cost[taken])
        assert batch.heads.tolist() == list(range(taken, taken + len(batch)))
        taken += len(batch)
    return n


@pytest.mark.parametrize("kind", sorted(SHARED))
def test_4096_heads_sharing_descriptors_are_served_in_bounded_pops(impl, kind):
    """8.4 M descriptors behind one avail index (the review's case): each pop of a queue
    size budget reads about one queue size, whatever the guest shares."""
    mem = make_memory()
    try:
        ring, cost = SHARED[kind](mem, impl, 4096)
        assert sum(cost) > 4096 * 4096 // 2
        _bounded_pops(ring, cost, budget=4096, pops=4)
    finally:
        mem.close()


@pytest.mark.parametrize("kind", sorted(SHARED))
def test_a_ring_sharing_descriptors_is_served_to_the_end(impl, kind):
    mem = make_memory()
    try:
        ring, cost = SHARED[kind](mem, impl, 128)
        pops = _bounded_pops(ring, cost, budget=128)
        assert ring.pop(128, max_descs=128).walked == 0  # nothing left
        assert len(ring.inflight()) == 128 and pops >= sum(cost) // (2 * 128)
    finally:
        mem.close()
