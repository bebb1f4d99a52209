"""Differential test: the Cython core must behave exactly like the pure-Python reference.

Hypothesis drives two identical guest memories, one per core, with the same sequence of
driver writes (mostly valid chains, sometimes hostile bytes) and device operations (pop with
random batch sizes and descriptor budgets, push of random in-flight subsets in random order,
set_notify, driver event settings, a state()/set_state() round trip onto a fresh ring).
After every step the results (with each batch's count of descriptors read), the exception
class (if any), every byte of guest memory with its dirty map, and the ring state must be
identical.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ringbuilder import BUF, RAM1, PackedBuilder, SplitBuilder, make_memory

from emu import _ring, pyring
from emu.memory import GuestMemory
from emu.ringdefs import (
    DESC_F_INDIRECT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    Batch,
    RingError,
)

TABLES = 0x10000  # one indirect table slot of 0x200 bytes per head / buffer id
HOSTILE_ADDRS = [0x50000, RAM1[0] + RAM1[1] - 1, 2**64 - 1, 2**64 - 16, 0x1FFF8, 0]
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def same_memory(a: GuestMemory, b: GuestMemory) -> bool:
    return all(
        np.array_equal(ra.array, rb.array) and np.array_equal(ra.dirty, rb.dirty)
        for ra, rb in zip(a.regions, b.regions, strict=True)
    )


def same_result(a: object, b: object) -> bool:
    if isinstance(a, Batch) and isinstance(b, Batch):
        return a.walked == b.walked and all(
            x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in zip(
                (a.heads, a.chain_start, a.addr, a.length, a.writable),
                (b.heads, b.chain_start, b.addr, b.length, b.writable),
                strict=True,
            )
        )
    return a == b


class Pair:
    """The same ring in two memories, one per core; every call goes to both and must agree."""

    def __init__(self, packed: bool, size: int, features: int) -> None:
        self.packed, self.size, self.features = packed, size, features
        self.mems = [make_memory(), make_memory()]
        make = PackedBuilder if packed else SplitBuilder
        self.drivers = [make(m, size) for m in self.mems]
        self.rings = [self._ring(mod, m) for mod, m in zip((pyring, _ring), self.mems, strict=True)]
        self.broken = False

    def _ring(self, mod, mem):
        cls = mod.PackedRing if self.packed else mod.SplitRing
        return cls(mem, self.size, *self.drivers[0].areas(), self.features)

    def close(self) -> None:
        for m in self.mems:
            m.close()

    def driver(self, fn) -> None:
        """A driver-side write, applied to both memories."""
        for d in self.drivers:
            fn(d)

    def call(self, name: str, *args) -> object:
        outcomes = []
        for ring in self.rings:
            try:
                outcomes.append(("ok", getattr(ring, name)(*args)))
            except (RingError, ValueError) as e:
                outcomes.append(("raise", type(e)))
        (ka, a), (kb, b) = outcomes
        assert ka == kb, (name, args, outcomes)
        assert same_result(a, b), (name, args, a, b)
        assert same_memory(*self.mems), (name, args)
        sa, sb = (r.state() for r in self.rings)
        assert sa == sb, (name, args, sa, sb)
        event(f"{name}: {a.__name__ if ka == 'raise' else 'ok'}")
        if ka == "raise" and issubclass(a, RingError):
            self.broken = True
        return a if ka == "ok" else None

    def restore(self) -> None:
        """Rebuild both rings from state(): migration in miniature."""
        states = [r.state() for r in self.rings]
        self.rings = [self._ring(mod, m) for mod, m in zip((pyring, _ring), self.mems, strict=True)]
        for ring, s in zip(self.rings, states, strict=True):
            ring.set_state(s)
        assert self.rings[0].state() == self.rings[1].state() == states[0]


@st.composite
def segments(draw, hostile: bool) -> list[tuple[int, int, int]]:
    """(addr, len, flags): readable ones first, then writable, as a good driver does."""
    n_read = draw(st.integers(0, 2))
    n_write = draw(st.integers(0 if n_read else 1, 2))
    out = []
    for k in range(n_read + n_write):
        addr = BUF + draw(st.integers(0, RAM1[1] - 0x400))
        length = draw(st.integers(0, 0x400))
        flags = DESC_F_WRITE if k >= n_read else 0
        if hostile and draw(st.integers(0, 5)) == 0:
            addr = draw(st.sampled_from(HOSTILE_ADDRS))
            length = draw(st.sampled_from([0, 1, 0x20, 2**32 - 1]))
        if hostile and draw(st.integers(0, 7)) == 0:
            flags ^= DESC_F_WRITE
        out.append((addr, length, flags))
    return out


def use_indirect(p: Pair, data, hostile: bool) -> bool:
    """Indirect chains when negotiated (a good driver), or now and then when hostile."""
    allowed = hostile or p.features >> F_INDIRECT_DESC & 1
    return bool(allowed) and data.draw(st.integers(0, 3)) == 0


def offer_split(p: Pair, data, free: list[int], hostile: bool) -> int:
    """Offers one chain (NEXT-linked from its head, or through an indirect table)."""
    head = data.draw(st.sampled_from(free)) if free else data.draw(st.integers(0, p.size - 1))
    segs = data.draw(segments(hostile))
    if use_indirect(p, data, hostile):
        table = TABLES + 0x200 * head
        entries = [
            (a, n, f | (1 if k < len(segs) - 1 else 0), k + 1) for k, (a, n, f) in enumerate(segs)
        ]
        p.driver(lambda d: d.table(table, entries))
        p.driver(lambda d: d.chain(head, [(table, 16 * len(segs), DESC_F_INDIRECT)]))
    else:
        p.driver(lambda d: d.chain(head, segs[: p.size]))
    p.driver(lambda d: d.offer(head))
    return head


def offer_packed(p: Pair, data, free_ids: list[int], free_slots: int, hostile: bool) -> int:
    """Offers one chain when it fits; returns the ring slots it took."""
    buf_id = data.draw(st.sampled_from(free_ids)) if free_ids else 0
    segs = data.draw(segments(hostile))
    if use_indirect(p, data, hostile):
        table = TABLES + 0x200 * buf_id
        p.driver(lambda d: d.table(table, segs))
        segs = [(table, 16 * len(segs), DESC_F_INDIRECT)]
    if len(segs) > free_slots:
        return 0
    p.driver(lambda d: d.offer(buf_id, segs))
    return len(segs)


def hostile_bytes(p: Pair, data) -> None:
    """Random bytes somewhere in the ring areas or the indirect tables."""
    area = data.draw(st.sampled_from(p.drivers[0].areas() + (TABLES,)))
    off = data.draw(st.integers(0, 16 * p.size - 1))
    raw = data.draw(st.binary(min_size=1, max_size=8))
    p.driver(lambda d: d.mem.write(area + off, raw))


def push_op(p: Pair, data) -> None:
    inflight = p.rings[0].inflight()
    if data.draw(st.booleans()):  # in fetch order: what an IN_ORDER device does
        heads = inflight[: data.draw(st.integers(0, len(inflight)))]
    else:
        heads = data.draw(st.permutations(inflight))[: data.draw(st.integers(0, len(inflight)))]
        if data.draw(st.integers(0, 15)) == 0:
            heads = heads + [data.draw(st.integers(0, p.size))]  # a device bug: ValueError
    lengths = [data.draw(st.integers(0, 2**32 - 1)) for _ in heads]
    p.call("push", np.array(heads, np.uint16), np.array(lengths, np.uint32))


def driver_event(p: Pair, data) -> None:
    if p.packed:
        flags, off = data.draw(st.integers(0, 3)), data.draw(st.integers(0, p.size - 1))
        wrap = data.draw(st.booleans())
        p.driver(lambda d: d.set_driver_event(flags, off, wrap))
    else:
        ev, fl = data.draw(st.integers(0, 0xFFFF)), data.draw(st.integers(0, 1))
        p.driver(lambda d: (d.set_used_event(ev), d.set_avail_flags(fl)))


def run(packed: bool, data) -> None:
    size = data.draw(st.integers(1, 12)) if packed else data.draw(st.sampled_from([1, 2, 4, 8, 16]))
    features = data.draw(
        st.sets(st.sampled_from([F_INDIRECT_DESC, F_EVENT_IDX, F_IN_ORDER])).map(
            lambda s: sum(1 << b for b in s)
        )
    )
    hostile = data.draw(st.booleans())
    p = Pair(packed, size, features)
    offered: list[int] = []  # offered and not yet popped (test-side bookkeeping)
    outstanding = 0  # packed: slots offered and not yet used
    try:
        for _ in range(data.draw(st.integers(10, 60))):
            if p.broken:
                break
            op = data.draw(
                st.sampled_from(
                    ["offer", "offer", "pop", "push", "notify", "event", "restore"]
                    + (["bytes"] if hostile else [])
                )
            )
            busy = set(offered) | set(p.rings[0].inflight())
            free = [h for h in range(size) if h not in busy]
            if op == "offer":
                if packed and (free or hostile):
                    outstanding += offer_packed(p, data, free, size - outstanding, hostile)
                elif free or hostile:
                    offered.append(offer_split(p, data, free, hostile))
            elif op == "pop":
                before = dict(p.rings[0].state().inflight)
                budget = data.draw(st.one_of(st.none(), st.integers(0, 3 * size)))
                if data.draw(st.integers(0, 31)) == 0:
                    budget = -1  # refused: ValueError
                batch = p.call("pop", data.draw(st.integers(0, size + 1)), budget)
                if batch is not None:
                    event(f"pop: {min(len(batch), 3)}+ chains")
                    if budget is not None and len(batch) and batch.walked >= budget:
                        event("pop: budget reached")
                    offered = offered[len(batch) :]
                    assert not set(batch.heads.tolist()) & set(before)
            elif op == "push":
                nd = dict(p.rings[0].state().inflight)
                push_op(p, data)
                outstanding -= sum(n for h, n in nd.items() if h not in p.rings[0].inflight())
            elif op == "notify":
                p.call("set_notify", data.draw(st.booleans()))
                p.call("pending")
            elif op == "event":
                driver_event(p, data)
            elif op == "bytes":
                hostile_bytes(p, data)
            else:
                p.restore()
    finally:
        p.close()


@SETTINGS
@given(st.data())
def test_split_cores_agree(data):
    run(False, data)


@SETTINGS
@given(st.data())
def test_packed_cores_agree(data):
    run(True, data)
