"""Ring core behaviour, for both the pure-Python reference and the Cython core."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
from ringbuilder import BUF, RAM0, PackedBuilder, SplitBuilder, make_memory

from emu import _ring, pyring
from emu.memory import GuestMemory, GuestMemoryError
from emu.pyring import IOV_MAX
from emu.ringdefs import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_USED,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_F_NO_NOTIFY,
    Batch,
    RingAlignmentError,
    RingState,
)

INDIRECT = 1 << F_INDIRECT_DESC
EVENT_IDX = 1 << F_EVENT_IDX
IN_ORDER = 1 << F_IN_ORDER
W = DESC_F_WRITE


@pytest.fixture(params=[pyring, _ring], ids=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_memory()
    yield m
    m.close()


def split(impl: ModuleType, mem: GuestMemory, size: int = 8, features: int = 0):
    b = SplitBuilder(mem, size)
    return b, impl.SplitRing(mem, size, *b.areas(), features)


def packed(impl: ModuleType, mem: GuestMemory, size: int = 8, features: int = 0):
    b = PackedBuilder(mem, size)
    return b, impl.PackedRing(mem, size, *b.areas(), features)


def chains(batch: Batch) -> list[tuple[int, list[tuple[int, int, bool]]]]:
    """The batch as [(head, [(addr, len, writable), ...]), ...] for readable asserts."""
    out = []
    for i in range(len(batch)):
        a, n, w = batch.segments(i)
        segs = zip(a.tolist(), n.tolist(), map(bool, w), strict=True)
        out.append((int(batch.heads[i]), list(segs)))
    return out


def push(ring, heads: list[int], lengths: list[int]) -> bool:
    return ring.push(np.array(heads, np.uint16), np.array(lengths, np.uint32))


# -- construction --


@pytest.mark.parametrize("size", [0, 3, 6, 32769, 65536])
def test_split_rejects_bad_sizes(impl, mem, size):
    with pytest.raises(RingAlignmentError):
        impl.SplitRing(mem, size, 0x1000, 0x9000, 0xA000, 0)


def test_packed_accepts_any_size_up_to_32768(impl, mem):
    impl.PackedRing(mem, 3, 0x1000, 0x9000, 0x9004, 0)
    with pytest.raises(RingAlignmentError):
        impl.PackedRing(mem, 0, 0x1000, 0x9000, 0x9004, 0)
    with pytest.raises(RingAlignmentError):
        impl.PackedRing(mem, 32769, 0x1000, 0x9000, 0x9004, 0)


@pytest.mark.parametrize(
    "cls,areas",
    [
        ("SplitRing", (0x1008, 0x9000, 0xA000)),
        ("SplitRing", (0x1000, 0x9001, 0xA000)),
        ("SplitRing", (0x1000, 0x9000, 0xA002)),
        ("PackedRing", (0x1004, 0x9000, 0x9004)),
        ("PackedRing", (0x1000, 0x9002, 0x9004)),
        ("PackedRing", (0x1000, 0x9000, 0x9006)),
    ],
)
def test_misaligned_areas(impl, mem, cls, areas):
    with pytest.raises(RingAlignmentError):
        getattr(impl, cls)(mem, 8, *areas, 0)


# -- split ring --


def test_split_pop_chains_with_next_and_write(impl, mem):
    b, ring = split(impl, mem)
    b.chain(0, [(BUF, 16, 0), (BUF + 16, 100, W), (BUF + 200, 50, W)])
    b.chain(5, [(BUF + 0x1000, 7, 0)])
    b.offer(0, 5)
    assert ring.pending()
    batch = ring.pop(64)
    assert chains(batch) == [
        (0, [(BUF, 16, False), (BUF + 16, 100, True), (BUF + 200, 50, True)]),
        (5, [(BUF + 0x1000, 7, False)]),
    ]
    assert batch.heads.dtype == np.uint16 and batch.chain_start.dtype == np.uint32
    assert batch.addr.dtype == np.uint64 and batch.length.dtype == np.uint32
    assert batch.writable.dtype == np.uint8
    assert batch.chain_start.tolist() == [0, 3, 4]
    assert not ring.pending()
    assert ring.inflight() == [0, 5]
    assert len(ring.pop(64)) == 0


def test_split_next_may_jump_anywhere_in_the_table(impl, mem):
    b, ring = split(impl, mem)
    b.desc(6, BUF, 1, 1, 2)  # NEXT -> 2
    b.desc(2, BUF + 1, 2, 1 | W, 0)  # NEXT -> 0
    b.desc(0, BUF + 3, 3, W, 0)
    b.offer(6)
    assert chains(ring.pop(1)) == [(6, [(BUF, 1, False), (BUF + 1, 2, True), (BUF + 3, 3, True)])]
    assert ring.state().inflight == [(6, 3)]


def test_split_zero_length_descriptor_is_allowed(impl, mem):
    b, ring = split(impl, mem)
    b.chain(0, [(BUF, 0, 0), (BUF + 0x10000, 0, W)])  # zero bytes right at the region end
    b.offer(0)
    assert chains(ring.pop(8)) == [(0, [(BUF, 0, False), (BUF + 0x10000, 0, True)])]


def test_split_indirect_is_expanded_in_place(impl, mem):
    b, ring = split(impl, mem, features=INDIRECT)
    b.table(0x10000, [(BUF, 10, 1, 2), (BUF + 0x100, 30, W, 0), (BUF + 0x80, 20, 1 | W, 1)])
    b.desc(3, BUF + 0x800, 4, 1, 4)  # a direct descriptor, then the indirect one
    b.desc(4, 0x10000, 48, DESC_F_INDIRECT | W, 0)  # WRITE on the pointer is ignored
    b.offer(3)
    batch = ring.pop(4)
    assert chains(batch) == [
        (
            3,
            [
                (BUF + 0x800, 4, False),
                (BUF, 10, False),
                (BUF + 0x80, 20, True),
                (BUF + 0x100, 30, True),
            ],
        )
    ]
    assert ring.state().inflight == [(3, 2)]  # two descriptors of the main table


def test_split_pop_respects_max_chains_and_ring_order(impl, mem):
    b, ring = split(impl, mem)
    for h in range(8):
        b.chain(h, [(BUF + 0x100 * h, h + 1, W)])
    b.offer(7, 1, 4, 0, 2)
    assert ring.pop(0).heads.tolist() == []
    assert ring.pop(2).heads.tolist() == [7, 1]
    assert ring.pop(2).heads.tolist() == [4, 0]
    last = ring.pop(2)
    assert chains(last) == [(2, [(BUF + 0x200, 3, True)])]
    assert ring.inflight() == [7, 1, 4, 0, 2]


def test_batch_is_not_overwritten_by_the_next_pop(impl, mem):
    b, ring = split(impl, mem)
    b.chain(0, [(BUF, 1, W)])
    b.chain(1, [(BUF + 8, 2, W)])
    b.offer(0)
    first = ring.pop(8)
    b.offer(1)
    ring.pop(8)
    assert chains(first) == [(0, [(BUF, 1, True)])]


def test_split_push_writes_used_ring_in_push_order(impl, mem):
    b, ring = split(impl, mem)
    for h in range(4):
        b.chain(h, [(BUF + 0x100 * h, 64, W)])
    b.offer(0, 1, 2, 3)
    ring.pop(4)
    assert push(ring, [2, 0], [10, 20])
    assert b.used_idx() == 2
    assert [b.used(0), b.used(1)] == [(2, 10), (0, 20)]
    assert ring.inflight() == [1, 3]
    push(ring, [3, 1], [30, 0])
    assert b.used_idx() == 4 and [b.used(2), b.used(3)] == [(3, 30), (1, 0)]
    assert ring.state().next_used == 4
    assert push(ring, [], []) is False


def test_push_marks_used_pages_dirty(impl, mem):
    b, ring = split(impl, mem, size=256)
    b.chain(0, [(BUF, 1, W)])
    b.offer(0)
    ring.pop(1)
    mem.get_and_clear_dirty()
    push(ring, [0], [1])
    assert mem.get_and_clear_dirty() == [0xA]  # used ring page only; buffers are not ours
    ring.set_notify(False)
    assert mem.get_and_clear_dirty() == [0xA]


def test_split_used_ring_wraps_through_free_running_indexes(impl, mem):
    b, ring = split(impl, mem, size=4)
    for h in range(4):
        b.chain(h, [(BUF + h, 1, W)])
    for i in range(70000 // 3):  # past 2^16 on both avail and used idx
        heads = [(3 * i + k) % 4 for k in range(3)]
        b.offer(*heads)
        got = ring.pop(8).heads.tolist()
        assert got == heads
        push(ring, got[::-1], [1, 2, 3])
    assert ring.state().next_avail == b.avail_idx == (3 * (70000 // 3)) & 0xFFFF
    assert b.used_idx() == b.avail_idx
    assert b.used(b.used_idx() - 1) == (heads[0], 3)


def test_split_no_interrupt_flag_without_event_idx(impl, mem):
    b, ring = split(impl, mem)
    b.chain(0, [(BUF, 1, W)])
    b.chain(1, [(BUF, 1, W)])
    b.offer(0, 1)
    ring.pop(2)
    b.set_used_event(0)  # ignored without EVENT_IDX
    assert push(ring, [0], [1]) is True
    b.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert push(ring, [1], [1]) is False


@pytest.mark.parametrize(
    "used_event,expect",
    [
        (0, [True, False, False]),
        (1, [False, True, False]),
        (2, [False, False, True]),
        (5, [False, False, False]),
    ],
)
def test_split_event_idx_notifies_when_crossing_used_event(impl, mem, used_event, expect):
    b, ring = split(impl, mem, features=EVENT_IDX)
    for h in range(3):
        b.chain(h, [(BUF, 1, W)])
    b.offer(0, 1, 2)
    ring.pop(3)
    b.set_used_event(used_event)
    b.set_avail_flags(AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    assert [push(ring, [h], [1]) for h in range(3)] == expect


def test_split_event_idx_batch_push_crossing_counts_once(impl, mem):
    b, ring = split(impl, mem, features=EVENT_IDX)
    for h in range(4):
        b.chain(h, [(BUF, 1, W)])
    b.offer(0, 1, 2, 3)
    ring.pop(4)
    b.set_used_event(2)
    assert push(ring, [0, 1, 2], [1, 1, 1]) is True  # used idx 0 -> 3 crosses 2
    assert push(ring, [3], [1]) is False
    assert ring.state().signalled_used == 4


def test_split_set_notify_flags_without_event_idx(impl, mem):
    b, ring = split(impl, mem)
    assert ring.set_notify(False) is False
    assert b.used_flags() == USED_F_NO_NOTIFY
    b.chain(0, [(BUF, 1, W)])
    b.offer(0)
    assert ring.set_notify(True) is True  # the re-check sees the new chain
    assert b.used_flags() == 0
    assert b.avail_event() == 0


def test_split_set_notify_with_event_idx_writes_avail_event(impl, mem):
    b, ring = split(impl, mem, features=EVENT_IDX)
    for h in range(3):
        b.chain(h, [(BUF, 1, W)])
    b.offer(0, 1, 2)
    mem.write_int(b.device + 4 + 8 * 8, 2, 0xBEEF)
    ring.pop(2)
    assert b.avail_event() == 0xBEEF  # pop leaves avail_event alone
    assert ring.set_notify(True) is True  # head 2 still waiting
    assert b.avail_event() == 2
    ring.pop(1)
    assert ring.set_notify(False) is False
    assert b.avail_event() == 2 and b.used_flags() == 0  # disabling writes nothing
    assert ring.set_notify(True) is False
    assert b.avail_event() == 3


# -- packed ring --


def test_packed_pop_chains_and_push_used_descriptors(impl, mem):
    b, ring = packed(impl, mem)
    b.offer(5, [(BUF, 16, 0), (BUF + 16, 32, W)])
    b.offer(2, [(BUF + 64, 8, W)])
    assert ring.pending()
    batch = ring.pop(8)
    assert chains(batch) == [
        (5, [(BUF, 16, False), (BUF + 16, 32, True)]),
        (2, [(BUF + 64, 8, True)]),
    ]
    assert ring.state().inflight == [(5, 2), (2, 1)]
    assert not ring.pending()
    assert push(ring, [2, 5], [8, 0]) is True
    both = DESC_F_AVAIL | DESC_F_USED
    # used descriptors at slots 0 and 1 (chain 2 took one slot), WRITE only with a length
    assert b.read(0)[1:] == (8, 2, both | W)
    assert b.read(1)[1:] == (0, 5, both)
    assert b.read(0)[0] == BUF  # addr is not touched
    assert ring.state().next_used == 3


def test_packed_indirect_takes_one_slot(impl, mem):
    b, ring = packed(impl, mem, features=INDIRECT)
    b.table(0x10000, [(BUF, 10, 0), (BUF + 0x10, 20, W), (BUF + 0x40, 30, W)])
    b.offer(7, [(0x10000, 48, DESC_F_INDIRECT)])
    b.offer(1, [(BUF + 0x100, 1, W)])
    batch = ring.pop(8)
    assert chains(batch) == [
        (7, [(BUF, 10, False), (BUF + 0x10, 20, True), (BUF + 0x40, 30, True)]),
        (1, [(BUF + 0x100, 1, True)]),
    ]
    assert ring.state().inflight == [(7, 1), (1, 1)]


def test_packed_wrap_counters_across_many_laps(impl, mem):
    """Chains of 1..3 slots on a size-5 ring: chains straddle the end and the counters flip."""
    b, ring = packed(impl, mem, size=5)
    rng = np.random.default_rng(1)
    used_slot, used_wrap, laps = 0, True, 0
    for i in range(200):
        n = int(rng.integers(1, 4))
        buf_id = i % 5
        b.offer(buf_id, [(BUF + 0x100 * k, k + 1, W) for k in range(n)])
        batch = ring.pop(8)
        assert chains(batch) == [(buf_id, [(BUF + 0x100 * k, k + 1, True) for k in range(n)])]
        st = ring.state()
        assert (st.next_avail, st.avail_wrap) == (b.slot, b.wrap)
        push(ring, [buf_id], [i])
        bits = DESC_F_AVAIL | DESC_F_USED if used_wrap else 0
        assert b.read(used_slot)[1:] == (i, buf_id, bits | (W if i else 0))
        used_slot += n
        if used_slot >= 5:
            used_slot, used_wrap, laps = used_slot - 5, not used_wrap, laps + 1
        st = ring.state()
        assert (st.next_used, st.used_wrap) == (used_slot, used_wrap)
    assert laps > 20


def test_packed_batch_publishes_first_flags_last(impl, mem):
    """The head used descriptor's flags are what publish a batch: check the others first."""
    b, ring = packed(impl, mem, size=4)
    for i in range(3):
        b.offer(i, [(BUF, 1, W)])
    ring.pop(3)
    push(ring, [0, 1, 2], [1, 1, 1])
    both = DESC_F_AVAIL | DESC_F_USED
    assert [b.read(s)[3] for s in range(3)] == [both | W] * 3


@pytest.mark.parametrize(
    "mode,off,wrap,expect",
    [
        (RING_EVENT_FLAGS_ENABLE, 0, False, [True, True, True]),
        (RING_EVENT_FLAGS_DISABLE, 0, False, [False, False, False]),
        (RING_EVENT_FLAGS_DESC, 0, True, [True, False, False]),
        (RING_EVENT_FLAGS_DESC, 1, True, [False, True, False]),
        (RING_EVENT_FLAGS_DESC, 3, True, [False, False, False]),
    ],
)
def test_packed_driver_event_suppression(impl, mem, mode, off, wrap, expect):
    b, ring = packed(impl, mem, size=4, features=EVENT_IDX)
    for i in range(3):
        b.offer(i, [(BUF, 1, W)])
    ring.pop(3)
    b.set_driver_event(mode, off, wrap)
    assert [push(ring, [i], [1]) for i in range(3)] == expect


def test_packed_desc_event_in_previous_lap_and_across_the_wrap(impl, mem):
    b, ring = packed(impl, mem, size=4, features=EVENT_IDX)
    for i in range(3):
        b.offer(i, [(BUF, 1, W)])
    ring.pop(3)
    push(ring, [0, 1, 2], [1, 1, 1])  # used position 3, lap 1
    for i in range(3):
        b.offer(i, [(BUF, 1, W)])
    ring.pop(3)
    # the driver asks for an event at slot 3 of lap 1; the push goes 3 -> 0 (lap 0) -> 1:
    b.set_driver_event(RING_EVENT_FLAGS_DESC, 3, True)
    assert push(ring, [0, 1], [1, 1]) is True
    assert ring.state().used_wrap is False
    # slot 3 of lap 1 is behind us now: no more events for it
    assert push(ring, [2], [1]) is False
    # the next push writes slot 2 of lap 0 (the current one)
    b.offer(0, [(BUF, 1, W)])
    ring.pop(1)
    b.set_driver_event(RING_EVENT_FLAGS_DESC, 2, False)
    assert push(ring, [0], [1]) is True


def test_packed_desc_mode_without_event_idx_notifies(impl, mem):
    b, ring = packed(impl, mem)
    b.offer(0, [(BUF, 1, W)])
    ring.pop(1)
    b.set_driver_event(RING_EVENT_FLAGS_DESC, 5, True)
    assert push(ring, [0], [1]) is True


def test_packed_set_notify_writes_device_event_area(impl, mem):
    b, ring = packed(impl, mem, size=4, features=EVENT_IDX)
    assert ring.set_notify(False) is False
    assert b.device_event() == (0, RING_EVENT_FLAGS_DISABLE)
    for i in range(2):
        b.offer(i, [(BUF, 1, W), (BUF, 1, W)])  # all 4 slots: the driver is in lap 0 now
    ring.pop(1)
    assert ring.set_notify(True) is True  # chain 1 is still waiting
    assert b.device_event() == (2 | 1 << 15, RING_EVENT_FLAGS_DESC)
    ring.pop(1)
    assert ring.set_notify(True) is False
    assert b.device_event() == (0, RING_EVENT_FLAGS_DESC)  # slot 0 of lap 0
    b2, plain = packed(impl, mem, size=4)
    plain.set_notify(True)
    assert b2.device_event()[1] == RING_EVENT_FLAGS_ENABLE


# -- state, IN_ORDER, device bugs --


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_state_round_trip_and_restored_ring_continues(impl, mem, kind):
    make = split if kind == "split" else packed
    b, ring = make(impl, mem, size=8, features=EVENT_IDX)
    offer = (lambda h: b.offer(h)) if kind == "split" else (lambda h: b.offer(h, [(BUF, 1, W)]))
    if kind == "split":
        for h in range(8):
            b.chain(h, [(BUF + h, 1, W)])
    for rnd in range(3):  # move the indexes (and packed wrap counters) along
        for h in range(6):
            offer(h)
        ring.pop(6)
        push(ring, list(range(6)), [rnd] * 6)
    for h in (4, 1, 6):
        offer(h)
    assert ring.pop(3).heads.tolist() == [4, 1, 6]
    push(ring, [1], [1])
    st = ring.state()
    assert st.inflight == [(4, 1), (6, 1)]
    assert ring.inflight() == [4, 6]

    # a fresh ring over the same memory, restored, behaves like the original
    restored = (impl.SplitRing if kind == "split" else impl.PackedRing)(
        mem, 8, *b.areas(), EVENT_IDX
    )
    restored.set_state(RingState(**vars(st)))
    assert restored.state() == st
    offer(2)
    assert restored.pop(8).heads.tolist() == [2]
    push(restored, [6, 2, 4], [7, 8, 9])
    assert restored.inflight() == []
    with pytest.raises(ValueError):
        push(restored, [4], [1])
    after = restored.state()
    assert after.next_avail == (st.next_avail + 1) % (65536 if kind == "split" else 8)


@pytest.mark.parametrize(
    "bad",
    [
        RingState(next_avail=70000),
        RingState(inflight=[(8, 1)]),
        RingState(inflight=[(1, 0)]),
        RingState(inflight=[(1, 1), (1, 1)]),
    ],
)
def test_set_state_refuses_impossible_state(impl, mem, bad):
    _, ring = split(impl, mem)
    with pytest.raises(ValueError):
        ring.set_state(bad)
    assert ring.state() == RingState()


def test_packed_set_state_indexes_are_ring_offsets(impl, mem):
    _, ring = packed(impl, mem)
    with pytest.raises(ValueError):
        ring.set_state(RingState(next_used=8))


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_in_order_requires_fetch_order(impl, mem, kind):
    make = split if kind == "split" else packed
    b, ring = make(impl, mem, features=IN_ORDER)
    for h in range(3):
        if kind == "split":
            b.chain(h, [(BUF, 1, W)])
            b.offer(h)
        else:
            b.offer(h, [(BUF, 1, W)])
    ring.pop(3)
    with pytest.raises(ValueError):
        push(ring, [1], [1])
    with pytest.raises(ValueError):
        push(ring, [0, 2], [1, 1])
    assert ring.inflight() == [0, 1, 2]  # a refused push changes nothing
    push(ring, [0, 1], [1, 1])
    push(ring, [2], [1])
    assert ring.inflight() == []


def test_gather_and_scatter_copy_chain_buffers_through_the_region_table(impl, mem):
    """A device's copy in and out of a popped chain's buffers: front to back across
    buffers and regions, pages written marked dirty, nothing read over the limit, too
    little room refused before writing, a buffer outside RAM a GuestMemoryError."""
    _, ring = split(impl, mem)
    mem.write(BUF, b"head" + bytes(60))
    mem.write(0x1F000, b"tail-of-ram0")
    segs = [(BUF, 4), (0x1F000, 12), (BUF + 0x4000, 0)]
    assert ring.gather(segs, 16) == (b"headtail-of-ram0", 16)
    assert ring.gather(segs, 15) == (None, 16)
    assert ring.gather([], 0) == (b"", 0)
    for r in mem.regions:
        r.dirty[:] = 0
    out = [(BUF + 0x0FFE, 4), (0x10, 3), (BUF + 0x3000, 100)]  # first one spans two pages
    ring.scatter(out, b"abcdefghij")
    assert mem.read(BUF + 0x0FFE, 4) == b"abcd" and mem.read(0x10, 3) == b"efg"
    assert mem.read(BUF + 0x3000, 4) == b"hij\0"
    dirty = {(r.gpa, int(p)) for r in mem.regions for p in np.flatnonzero(r.dirty)}
    assert dirty == {(BUF, 0), (BUF, 1), (0, 0), (BUF, 3)}
    before = bytes(mem.read(BUF, 0x100))
    with pytest.raises(ValueError):
        ring.scatter([(BUF, 2), (BUF + 8, 2)], b"12345")
    assert bytes(mem.read(BUF, 0x100)) == before
    gap = RAM0[1] + 0x100  # between the two regions
    with pytest.raises(GuestMemoryError):
        ring.gather([(BUF, 4), (gap, 4)], 100)
    with pytest.raises(GuestMemoryError):
        ring.scatter([(gap, 8)], b"x")
    with pytest.raises(GuestMemoryError):  # straddles the end of a region
        ring.gather([(RAM0[1] - 2, 4)], 100)


def test_readv_and_writev_move_file_bytes_to_and_from_chain_buffers(impl, mem, tmp_path):
    """preadv / pwritev between a host file and a chain's buffers, from a byte offset into
    them: at most IOV_MAX buffers for a read (a short read), all of them for a write (a
    call per IOV_MAX); read pages marked dirty; OSError and GuestMemoryError as raised."""
    _, ring = split(impl, mem)
    path = tmp_path / "f"
    data = bytes(range(256)) * 32
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for r in mem.regions:
            r.dirty[:] = 0
        segs = [(BUF, 16), (BUF + 0x1000, 100), (0x100, 50), (BUF + 0x2FF0, 0x20)]
        assert ring.readv(fd, segs, 16, 170, 7) == 170  # skips the first buffer (a header)
        got = mem.read(BUF + 0x1000, 100) + mem.read(0x100, 50) + mem.read(BUF + 0x2FF0, 20)
        assert got == data[7:177]
        dirty = {(r.gpa, int(p)) for r in mem.regions for p in np.flatnonzero(r.dirty)}
        assert dirty == {(BUF, 1), (0, 0), (BUF, 2), (BUF, 3)}  # written to, not the first
        assert ring.readv(fd, segs, 16, 1000, len(data) - 5) == 5  # end of file
        assert ring.readv(fd, segs, 1000, 10, 0) == 0  # nothing past the buffers
        many = [(BUF + k, 1) for k in range(IOV_MAX + 10)]
        assert ring.readv(fd, many, 0, 1 << 20, 0) == IOV_MAX
        mem.write(BUF + 0x4000, b"written!")
        assert ring.writev(fd, [(BUF, 3), (BUF + 0x4000, 8)], 3, 8, 100) == 8
        assert os.pread(fd, 8, 100) == b"written!"
        assert ring.writev(fd, many, 0, len(many), 0) == len(many)  # over two calls
        assert os.pread(fd, len(many), 0) == bytes(mem.read(BUF, len(many)))
        with pytest.raises(OSError) as e:
            ring.readv(-1, segs, 0, 10, 0)
        assert e.value.errno == errno.EBADF
        for call in (ring.readv, ring.writev):  # not "the file position", as os.preadv's -1
            with pytest.raises(OSError) as e:
                call(fd, segs, 0, 10, -1)
            assert e.value.errno == errno.EINVAL
        gap = RAM0[1] + 0x100
        with pytest.raises(GuestMemoryError):
            ring.readv(fd, [(gap, 4)], 0, 4, 0)
        with pytest.raises(GuestMemoryError):
            ring.writev(fd, [(BUF, 4), (gap, 4)], 0, 8, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_push_takes_lists_as_it_takes_arrays(impl, mem, kind):
    """Lists of ints are read without numpy by the Cython core: same used entries, the
    same refusals (nothing taken), and numpy's OverflowError for a value out of range."""
    make = split if kind == "split" else packed
    b, ring = make(impl, mem)
    if kind == "split":
        for h in range(3):
            b.chain(h, [(BUF + 0x100 * h, 64, W)])
        b.offer(0, 1, 2)
    else:
        for h in range(3):
            b.offer(h, [(BUF + 0x100 * h, 64, W)])
    ring.pop(3)
    for heads, lengths, error in (
        ([0], [1 << 32], OverflowError),
        ([1 << 16], [0], OverflowError),
        ([-1], [0], OverflowError),
        ([0, 1], [5], ValueError),
        ([7], [0], ValueError),
    ):
        with pytest.raises(error):
            ring.push(heads, lengths)
    assert sorted(ring.inflight()) == [0, 1, 2]
    ring.push([1], [11])
    ring.push([np.uint16(0)], [np.uint32(22)])  # not ints: the numpy path
    ring.push(np.array([2], np.uint16), np.array([33], np.uint32))
    assert ring.inflight() == []
    if kind == "split":
        assert [b.used(i) for i in range(3)] == [(1, 11), (0, 22), (2, 33)]


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_push_refuses_heads_not_in_flight(impl, mem, kind):
    make = split if kind == "split" else packed
    b, ring = make(impl, mem)
    if kind == "split":
        b.chain(0, [(BUF, 1, W)])
        b.chain(1, [(BUF, 1, W)])
        b.offer(0, 1)
    else:
        b.offer(0, [(BUF, 1, W)])
        b.offer(1, [(BUF, 1, W)])
    ring.pop(2)
    before = bytes(mem.read(0, 0x10000))
    for heads, lengths in ([[3], [1]], [[0, 0], [1, 1]], [[0, 1], [1]], [[9], [0]]):
        with pytest.raises(ValueError):
            push(ring, heads, lengths)
    with pytest.raises(ValueError):
        ring.push(np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.uint32))
    assert bytes(mem.read(0, 0x10000)) == before
    assert ring.inflight() == [0, 1]
    # other integer arrays and lists are converted
    assert ring.push([1], np.array([5], np.int64)) is True
    assert ring.push(np.array([0], ">u2"), [5]) is True
