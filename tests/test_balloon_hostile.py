"""A hostile guest against virtio-balloon: never a crash, a hang or a punch outside guest
RAM. The policy (emu/devices/balloon.py): chains that cannot be read as the spec lays
them out make the device need a reset; bad contents (PFNs outside RAM, duplicates,
partial pages) are ignored with a rate-limited log line and counted.

Guest RAM here is three memfd regions: [0, 16 MiB) and [16, 24 MiB) back to back, then a
hole, then [64, 68 MiB). Every byte is written first, so each file's allocated blocks
show exactly what was punched.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import struct

import pytest
from modes import wait_until

from emu.devices.balloon import MAX_PFNS, MAX_STATS, STAT, BalloonDevice
from emu.devices.base import RunState
from emu.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from emu.testing.balloon import BalloonDriver, pack_stats
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport.mmio import MmioTransport

MIB = 1 << 20
REGIONS = [(0, 16 * MIB), (16 * MIB, 8 * MIB), (64 * MIB, 4 * MIB)]
RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


def all_blocks(mem: GuestMemory) -> list[int]:
    return [os.fstat(r.fd).st_blocks for r in mem.regions]


@pytest.fixture
def hostile():
    made = []

    def _open(**opts):
        mem = GuestMemory()
        for gpa, size in REGIONS:
            r = mem.add_region(gpa, size)
            r.mm[:] = b"\x11" * size
        dev = BalloonDevice()
        made.append((dev, mem))
        bd = BalloonDriver.open(VirtioMmioDriver(MmioTransport(dev, mem), mem), **opts)
        return bd, dev, mem

    yield _open
    for dev, mem in made:
        dev.close()
        mem.close()


def pfn_bytes(pfns: list[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


@pytest.mark.parametrize("packed", RINGS)
def test_pfns_outside_guest_ram_are_ignored(hostile, packed, caplog):
    bd, dev, mem = hostile(packed=packed)
    before = all_blocks(mem)
    hole = (24 * MIB) >> PAGE_SHIFT  # just past the second region: the hole
    bad = [hole, (40 * MIB) >> PAGE_SHIFT, (68 * MIB) >> PAGE_SHIFT, 0xFFFFFFFF, 0x7FFFFFFF]
    good = (64 * MIB) >> PAGE_SHIFT  # first page of the third region
    with caplog.at_level(logging.WARNING, "emu.devices.balloon"):
        bd.inflate(bad + [good])
    assert dev.run_state is RunState.RUNNING
    assert dev.counters["ignored_pfns"] == len(bad) and dev.counters["inflated_pages"] == 1
    after = all_blocks(mem)
    assert after[:2] == before[:2] and before[2] - after[2] == PAGE_SIZE // 512
    assert "outside guest RAM" in caplog.text
    bd.deflate(bad)  # deflating them is as harmless
    assert dev.counters["deflated_pages"] == 0 and dev.run_state is RunState.RUNNING


def test_a_run_across_two_adjacent_regions_is_punched_in_both(hostile):
    bd, dev, mem = hostile()
    edge = (16 * MIB) >> PAGE_SHIFT
    before = all_blocks(mem)
    bd.inflate(list(range(edge - 3, edge + 5)))
    after = all_blocks(mem)
    assert [b - a for b, a in zip(before, after, strict=True)] == [3 * 8, 5 * 8, 0]


def test_duplicates_are_punched_once(hostile):
    bd, dev, mem = hostile()
    (pfn,) = bd.take_pages(1)
    before = all_blocks(mem)[0]
    bd.inflate([pfn] * 256)
    assert before - all_blocks(mem)[0] == PAGE_SIZE // 512
    assert dev.counters["inflated_pages"] == 1 and dev.counters["ignored_pfns"] == 255


def test_the_largest_pfn_array_is_served(hostile):
    """MAX_PFNS pages in one chain, in no order, across two regions: done, no reset."""
    bd, dev, mem = hostile()
    pfns = list(range((8 * MIB) >> PAGE_SHIFT, (24 * MIB) >> PAGE_SHIFT))
    assert len(pfns) == MAX_PFNS
    random.Random(11).shuffle(pfns)
    before = all_blocks(mem)
    bd.inflate(pfns, per_chain=MAX_PFNS)
    after = all_blocks(mem)
    assert [b - a for b, a in zip(before, after, strict=True)] == [2048 * 8, 2048 * 8, 0]
    assert dev.counters["inflated_pages"] == MAX_PFNS


@pytest.mark.parametrize(
    "role, segments, why",
    [
        pytest.param("inflate", "pfns+1", "at most", id="one-pfn-too-many"),
        pytest.param("inflate", "odd", "a multiple of 4", id="not-whole-pfns"),
        pytest.param("inflate", "writable", "device-writable", id="inflate-writable"),
        pytest.param("deflate", "writable", "device-writable", id="deflate-writable"),
        pytest.param("reporting", "readable", "device-readable", id="report-readable"),
        pytest.param("stats", "writable", "device-writable", id="stats-writable"),
    ],
)
def test_unreadable_chains_need_a_reset(hostile, role, segments, why, caplog):
    bd, dev, mem = hostile()
    buf = bd.drv.alloc.alloc(4 * (MAX_PFNS + 1), PAGE_SIZE)
    mem.write(buf, pfn_bytes([buf >> PAGE_SHIFT] * (MAX_PFNS + 1)))
    before = all_blocks(mem)
    segs = {
        "pfns+1": [(buf, 4 * (MAX_PFNS + 1), False)],
        "odd": [(buf, 6, False)],
        "writable": [(buf, 4, False), (buf + 4, 4, True)],
        "readable": [(buf, PAGE_SIZE, False)],
    }[segments]
    with caplog.at_level(logging.WARNING, "emu.devices.base"):
        bd.submit_raw(role, segs)
        wait_until(lambda: dev.run_state is RunState.BROKEN)
    assert why in dev.broken
    with pytest.raises(DeviceNeedsReset):
        bd.drv.handle_interrupt()
    assert all_blocks(mem) == before  # nothing was punched
    bd2 = BalloonDriver.open(bd.drv)  # a reset brings it back
    bd2.inflate(bd2.take_pages(1))
    assert dev.run_state is RunState.RUNNING


@pytest.mark.parametrize("packed", RINGS)
def test_reported_ranges_partial_pages_are_left_alone(hostile, packed):
    bd, dev, mem = hostile(packed=packed)
    start = bd.take_pages(8)[0] << PAGE_SHIFT
    before = all_blocks(mem)[0]
    # from 100 bytes into the first page to 100 bytes into the fifth: pages 2-4 only
    bd.report([(start + 100, 4 * PAGE_SIZE), (start + 6 * PAGE_SIZE, 10)])
    assert before - all_blocks(mem)[0] == 3 * PAGE_SIZE // 512
    assert mem.read(start, PAGE_SIZE) == b"\x11" * PAGE_SIZE
    assert mem.read(start + 4 * PAGE_SIZE, PAGE_SIZE) == b"\x11" * PAGE_SIZE
    assert dev.counters["ignored_bytes"] == 4 * PAGE_SIZE - 3 * PAGE_SIZE + 10
    assert dev.run_state is RunState.RUNNING


@pytest.mark.parametrize(
    "gpa, size",
    [
        pytest.param(24 * MIB - PAGE_SIZE, 2 * PAGE_SIZE, id="into-the-hole"),
        pytest.param(16 * MIB - PAGE_SIZE, 2 * PAGE_SIZE, id="across-two-regions"),
        pytest.param(40 * MIB, PAGE_SIZE, id="in-the-hole"),
        pytest.param((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE, id="wrapping"),
    ],
)
def test_reported_buffers_outside_one_region_need_a_reset(hostile, gpa, size):
    """A reported range is a buffer: the ring core refuses one not wholly inside one
    region before the device sees it (DEVICE_NEEDS_RESET), so nothing is punched."""
    bd, dev, mem = hostile()
    before = all_blocks(mem)
    bd.submit_raw("reporting", [(gpa, size, True)])
    wait_until(lambda: dev.run_state is RunState.BROKEN)
    assert "outside guest RAM" in dev.broken
    assert all_blocks(mem) == before


def test_stats_buffers_that_break_the_rules(hostile, caplog):
    bd, dev, _ = hostile(initial_stats={4: 1})
    wait_until(lambda: dev.stats()["stats"] == {"free-memory": 1})
    # a second buffer while the first is held: the older one is given back
    with caplog.at_level(logging.WARNING, "emu.devices.balloon"):
        bd.send_stats({4: 2})
        (done,) = bd.drv.wait(bd.q["stats"])
    assert done.length == 0 and dev.stats()["stats"] == {"free-memory": 2}
    assert "second buffer" in caplog.text
    # entries past MAX_STATS, a torn last entry, unknown tags: ignored
    many = pack_stats({1000 + i: i for i in range(MAX_STATS)}) + pack_stats({5: 9}) + b"\x04\x00"
    dev.request_stats()
    bd.drv.wait(bd.q["stats"])
    bd.drv.submit(bd.q["stats"], [many], [])
    wait_until(lambda: dev.stats()["stats"] == {})
    torn = STAT.pack(4, 77) + b"\x05\x00\x01"
    dev.request_stats()
    bd.drv.wait(bd.q["stats"])
    bd.drv.submit(bd.q["stats"], [torn], [])
    wait_until(lambda: dev.stats()["stats"] == {"free-memory": 77})
    assert dev.run_state is RunState.RUNNING


def test_a_queue_without_a_role_needs_a_reset(hostile):
    """Without PAGE_REPORTING, queue 4 (the spec's reporting_vq) does not exist."""
    bd, dev, _ = hostile(reporting=False)
    bd.drv.setup_queue(4)
    bd.drv.submit(4, [pfn_bytes([1])], [])
    wait_until(lambda: dev.run_state is RunState.BROKEN)
    assert "no role" in dev.broken


def test_config_writes(hostile):
    bd, dev, _ = hostile()
    for i, byte in enumerate((0x78, 0x56, 0x34, 0x12)):  # the legacy way: byte by byte
        bd.drv.config_write(4 + i, 1, byte)
    assert dev.actual == 0x12345678
    bd.drv.config_write(6, 2, 0xFFFF)
    assert dev.actual == 0xFFFF5678
    dev.set_target(10)
    for off, size in ((0, 4), (0, 1), (2, 2), (3, 2), (8, 4), (100, 4)):
        bd.drv.config_write(off, size, 0xFFFFFFFF)
    assert (dev.num_pages, bd.target) == (10, 10)
    assert bd.drv.config_read(8, 4) == 0
    with pytest.raises(ValueError):
        dev.set_target(-1)
    with pytest.raises(ValueError):
        dev.set_target(1 << 32)


def test_inflating_its_own_rings_breaks_only_the_guest(hostile):
    """A guest that balloons the pages its rings live in zeroes them: its device may end
    up needing a reset, but emu carries on and is still closed cleanly."""
    bd, dev, _ = hostile()
    ring_pages = sorted({bd.drv.queues[i].desc >> PAGE_SHIFT for i in bd.drv.queues})
    try:
        bd.inflate(ring_pages)
        bd.inflate(bd.take_pages(4))
    except (DeviceNeedsReset, TimeoutError):
        pass
    assert dev.run_state in (RunState.RUNNING, RunState.BROKEN)
    again = BalloonDriver.open(bd.drv)  # reset, fresh rings: the device thread still serves
    again.inflate(again.take_pages(4))
    assert dev.run_state is RunState.RUNNING


def test_a_backing_that_cannot_release_is_counted_not_fatal(caplog):
    """Private memory takes no MADV_REMOVE (as hugetlbfs in 4 KiB pieces): the chain
    completes, the failure is logged and counted."""
    mem = GuestMemory()
    mm = mmap.mmap(-1, 16 * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.add_mapped(0, 16 * MIB, mm)
    dev = BalloonDevice()
    try:
        bd = BalloonDriver.open(VirtioMmioDriver(MmioTransport(dev, mem), mem))
        with caplog.at_level(logging.WARNING, "emu.devices.balloon"):
            bd.inflate(bd.take_pages(3))
        assert dev.counters["release_errors"] == 1 and dev.counters["released_bytes"] == 0
        assert "cannot give" in caplog.text and dev.run_state is RunState.RUNNING
        assert dev.info()["backing_allocated_bytes"] is None
    finally:
        dev.close()
        mem.close()


def test_log_lines_are_rate_limited(hostile, caplog):
    bd, dev, _ = hostile()
    with caplog.at_level(logging.WARNING, "emu.devices.balloon"):
        for _ in range(20):
            bd.inflate([0xFFFFFFF0])
    assert dev.counters["ignored_pfns"] == 20
    assert len([r for r in caplog.records if "outside guest RAM" in r.message]) <= 2
