"""The descriptor budget of ``pop(max_chains, max_descs)``, in both ring cores.

The rule (emu/pyring.py docstring): every descriptor read counts, the INDIRECT one and
indirect-table entries included; once the batch holds a chain and ``max_descs`` have been
read, the pop stops and a chain under way stays available. ``Batch.walked`` is the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from ringbuilder import BUF, PackedBuilder, SplitBuilder, make_memory

from emu import _ring, pyring
from emu.memory import GuestMemory
from emu.ringdefs import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_INDIRECT_DESC,
    RingAddressError,
)

INDIRECT = 1 << F_INDIRECT_DESC
N, W, IND = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
TABLE = 0x10000
HOLE = 0x50000  # not RAM (ringbuilder's layout)
SIZE = 8


@pytest.fixture(params=[pyring, _ring], ids=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_memory()
    yield m
    m.close()


def split_chains(impl, mem, lengths: list[int], features: int = 0):
    """Chain k has lengths[k] descriptors and starts where chain k-1 ended; all offered."""
    b = SplitBuilder(mem, 16)
    ring = impl.SplitRing(mem, 16, *b.areas(), features)
    head = 0
    for n in lengths:
        b.chain(head, [(BUF + 0x10 * head, 1, W)] * n)
        b.offer(head)
        head += n
    return b, ring


def test_a_batch_stops_before_the_chain_that_would_exceed_the_budget(impl, mem):
    _, ring = split_chains(impl, mem, [3, 3, 3, 3])
    first = ring.pop(16, max_descs=7)
    # 3 + 3 read, then one descriptor of the third chain: the eighth read is refused
    assert first.heads.tolist() == [0, 3] and first.walked == 7
    assert first.chain_start.tolist() == [0, 3, 6] and len(first.addr) == 6
    assert ring.state().next_avail == 2 and ring.inflight() == [0, 3]
    second = ring.pop(16, max_descs=7)
    assert second.heads.tolist() == [6, 9] and second.walked == 6


def test_a_first_chain_longer_than_the_budget_still_pops_alone(impl, mem):
    _, ring = split_chains(impl, mem, [5, 1])
    batch = ring.pop(16, max_descs=2)
    assert batch.heads.tolist() == [0] and batch.walked == 5  # the next one is not started
    assert ring.pop(16, max_descs=0).heads.tolist() == [5]  # 0: one chain per pop


@pytest.mark.parametrize("budget", [None, 6, 100])
def test_a_budget_that_covers_everything_takes_everything(impl, mem, budget):
    _, ring = split_chains(impl, mem, [2, 2, 2])
    batch = ring.pop(16, max_descs=budget)
    assert batch.heads.tolist() == [0, 2, 4] and batch.walked == 6


def test_negative_budget_is_refused(impl, mem):
    _, ring = split_chains(impl, mem, [1])
    with pytest.raises(ValueError):
        ring.pop(16, max_descs=-1)
    b = PackedBuilder(mem, SIZE, desc=0x4000, driver=0x6000, device=0x6004)
    with pytest.raises(ValueError):
        impl.PackedRing(mem, SIZE, *b.areas(), 0).pop(SIZE, max_descs=-1)


def test_indirect_pointer_and_table_entries_all_count(impl, mem):
    b = SplitBuilder(mem, SIZE)
    ring = impl.SplitRing(mem, SIZE, *b.areas(), INDIRECT)
    b.table(TABLE, [(BUF, 1, N, 1), (BUF, 1, N, 2), (BUF, 1, W, 0)])
    b.desc(0, BUF, 4, N, 1)
    b.desc(1, TABLE, 48, IND, 0)
    b.chain(2, [(BUF, 1, W)])
    b.offer(0, 2)
    batch = ring.pop(SIZE, max_descs=5)  # 2 in the table + 3 in the indirect one
    assert batch.heads.tolist() == [0] and batch.walked == 5
    assert ring.pop(SIZE, max_descs=5).heads.tolist() == [2]


def test_packed_budget_counts_slots_and_table_entries(impl, mem):
    b = PackedBuilder(mem, SIZE)
    ring = impl.PackedRing(mem, SIZE, *b.areas(), INDIRECT)
    b.table(TABLE, [(BUF, 1, 0)] * 4)
    b.offer(1, [(BUF, 1, 0), (BUF, 1, W)])
    b.offer(2, [(TABLE, 64, IND)])
    b.offer(3, [(BUF, 1, W)])
    batch = ring.pop(SIZE, max_descs=6)  # 2 slots, then 1 slot + 3 of 4 entries: cut
    assert batch.heads.tolist() == [1] and batch.walked == 6 and len(batch.addr) == 2
    assert ring.state().next_avail == 2 and ring.state().inflight == [(1, 2)]
    batch = ring.pop(SIZE, max_descs=6)
    assert batch.heads.tolist() == [2, 3] and batch.walked == 6
    assert ring.state().inflight == [(1, 2), (2, 1), (3, 1)]


def test_a_bad_descriptor_beyond_the_cut_is_found_by_the_next_pop(impl, mem):
    b = SplitBuilder(mem, SIZE)
    ring = impl.SplitRing(mem, SIZE, *b.areas(), 0)
    b.chain(0, [(BUF, 1, W)])
    b.chain(1, [(BUF, 1, 0), (HOLE, 1, W)])
    b.offer(0, 1)
    assert ring.pop(SIZE, max_descs=2).heads.tolist() == [0]
    with pytest.raises(RingAddressError):
        ring.pop(SIZE, max_descs=2)
