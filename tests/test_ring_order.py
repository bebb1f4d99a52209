"""The Cython core's memory ordering, read from its source.

A driver on another CPU sees the device's stores in the order the fences enforce, and no
single-threaded test can observe a reordering. So this reads emu/_ring.pyx: the fence
macros must be real fences, and in each function that shares memory with the driver the
accesses must sit on the right side of them (used elements written before the release
that precedes the index / first flags that publish them; the driver's fields read only
after the full barrier; avail entries / descriptors read only after the acquire). Moving
a store across its fence, or dropping a fence, fails here. emu/pyring.py marks the same
points as comments.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import emu

PYX = Path(emu.__file__).parent / "_ring.pyx"


def source() -> list[str]:
    return PYX.read_text().splitlines()


def body(name: str, cls: str | None = None) -> list[str]:
    """Lines of a (c)def function, inside ``cdef class cls`` when given."""
    lines = source()
    start = 0
    if cls is not None:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"cdef class {cls}("))
    pattern = re.compile(rf"^(\s*)(?:cdef|def|cpdef)\s+(?:[\w\s]+\s)?{name}\(")
    for i in range(start, len(lines)):
        m = pattern.match(lines[i])
        if m:
            indent = len(m.group(1))
            out = []
            for ln in lines[i + 1 :]:
                if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
                    break
                out.append(ln)
            return out
    raise AssertionError(f"{cls}.{name} not found in {PYX}")


def where(lines: list[str], regex: str) -> list[int]:
    found = [i for i, ln in enumerate(lines) if re.search(regex, ln.split("#")[0])]
    assert found, f"{regex!r} not found"
    return found


def once(lines: list[str], regex: str) -> int:
    (i,) = where(lines, regex)
    return i


def test_fence_macros_are_fences():
    text = PYX.read_text()
    for name, order in (
        ("ring_acquire", "__ATOMIC_ACQUIRE"),
        ("ring_release", "__ATOMIC_RELEASE"),
        ("ring_full_barrier", "__ATOMIC_SEQ_CST"),
    ):
        assert re.search(rf"#define {name}\(\) __atomic_thread_fence\({order}\)", text), name


def test_split_publish_writes_used_elements_then_release_then_index_then_barrier():
    b = body("publish", "SplitRing")
    element = where(b, r"ring_st32\(self\.dev\.p \+ slot")  # id, then len
    release = once(b, r"ring_release\(\)")
    index = once(b, r"ring_st16\(self\.dev\.p \+ 2, self\.next_used\)")
    full = once(b, r"ring_full_barrier\(\)")
    driver_reads = where(b, r"ring_ld16\(self\.drv\.p")  # used_event / avail flags
    assert len(element) == 2
    assert max(element) < release < index < full < min(driver_reads)


def test_packed_publish_writes_used_descriptors_then_release_then_first_flags():
    b = body("publish", "PackedRing")
    stores = where(b, r"ring_st(16|32)\(self\.desc\.p \+ at\b")  # len, id, later flags
    release = once(b, r"ring_release\(\)")
    first = once(b, r"ring_st16\(self\.desc\.p \+ first_at \+ 14, first_flags\)")
    full = once(b, r"ring_full_barrier\(\)")
    notify = once(b, r"self\.should_notify\(\)")
    assert len(stores) == 3
    assert max(stores) < release < first < full < notify
    assert where(body("should_notify", "PackedRing"), r"ring_ld16\(self\.drv\.p")


def test_split_pop_reads_the_avail_index_then_acquire_then_entries():
    b = body("split_pop")
    index = once(b, r"ring_ld16\(r\.drv\.p \+ 2\)")
    acquire = once(b, r"ring_acquire\(\)")
    entries = once(b, r"ring_ld16\(r\.drv\.p \+ 4 \+")
    walk = once(b, r"split_walk\(")
    assert index < acquire < entries < walk


def test_packed_pop_reads_the_head_flags_then_acquire_then_the_chain():
    b = body("packed_pop")
    loop = once(b, r"while .*packed_avail\(r\)")
    acquire = once(b, r"ring_acquire\(\)")
    walk = once(b, r"packed_walk\(r\)")
    assert loop < acquire < walk


@pytest.mark.parametrize("cls", ["SplitRing", "PackedRing"])
def test_set_notify_publishes_then_barrier_then_rereads(cls):
    b = body("set_notify", cls)
    stores = where(b, r"ring_st16\(")
    full = once(b, r"ring_full_barrier\(\)")
    reread = once(b, r"return (self\.pending\(\)|packed_avail\(self\))")
    assert max(stores) < full < reread
