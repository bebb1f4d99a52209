"""The native blk data plane against the Python reference, and its asynchronous behaviour.

The differential tests run the same requests (hostile ones included) through both planes
on the same ring formats and require the same guest-visible results: status byte and
used length per request, the bytes in every device-writable buffer, the image, and
whether the device asked for a reset. Requests of one round use disjoint sectors and
buffers: requests in flight together have no order a guest could rely on, and the
native plane really runs them concurrently.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import blk_native, wait_until

from emu.backends.storage import is_nbd, open_engine
from emu.devices import blk
from emu.devices.base import DeviceError, RunState
from emu.devices.blk import SECTOR, BlkDevice, _parse_batch
from emu.memory import GuestMemory, GuestMemoryError
from emu.ringdefs import Batch
from emu.testing.blk import BlkDriver, dwz_payload, header, status_of
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport.mmio import MmioTransport

pytestmark = pytest.mark.skipif(blk_native is None, reason="emu.devices._blkplane is not built")

IMAGE_SIZE = 1 << 20
CAPACITY = IMAGE_SIZE // SECTOR
ZONE = 32  # sectors each request of a round may touch
SEG_MAX = 6
_BAD_SECTORS = [CAPACITY, CAPACITY + 1, 2**63, 2**64 - 1]


def test_constants_agree_with_the_python_path():
    assert blk_native.MODE_WRITETHROUGH and blk.MAX_DWZ_SEGMENTS == 16
    assert blk.MAX_DWZ_SECTORS == 0x3FFFFF and blk.ID_BYTES == 20 and blk.HEADER.size == 16
    assert (blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID) == (0, 1, 4, 8)
    assert (blk.T_DISCARD, blk.T_WRITE_ZEROES, blk.S_IOERR, blk.S_UNSUPP) == (11, 13, 1, 2)


# -- differential: hypothesis-made requests through both planes --


@st.composite
def request(draw, zone: int, lbs: int) -> tuple[list[bytes], list[int]]:
    """One chain as (readable buffers, writable sizes), good or hostile."""
    align = lbs // SECTOR
    base = zone * ZONE
    rtype = draw(
        st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD])
        | st.sampled_from([blk.T_WRITE_ZEROES, 2, 7, 0xFFFFFFFF])
    )
    good_sector = base + align * draw(st.integers(0, 2))
    sector = draw(
        # base, not 0: a request of another zone at sector 0 would overlap zone 0's, and
        # two requests in flight together have no order (the native plane's may run in
        # either), so their results could differ between planes for no fault of either
        st.sampled_from([good_sector, good_sector, base + 1, base] + _BAD_SECTORS)
        if rtype != blk.T_FLUSH
        else st.sampled_from([0, 0, 8])
    )
    if rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
        segs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from([base, base + align, base + 1, CAPACITY - align, 2**63]),
                    st.sampled_from([0, align, 2 * align, 3, blk.MAX_DWZ_SECTORS + 1]),
                    st.sampled_from([0, 0, 1, 2]),
                ),
                max_size=18,
            )
        )
        # CAPACITY - align is another zone's: only with a count that is refused anyway
        segs = [(s, n if s != CAPACITY - align else 3, f) for s, n, f in segs]
        data = dwz_payload(segs) + bytes(draw(st.sampled_from([0, 0, 0, 3])))
    else:
        size = draw(st.sampled_from([0, lbs, 2 * lbs, 100, 4 * lbs]))
        data = os.urandom(size) if rtype == blk.T_OUT else bytes(size)
    hdr = header(rtype, sector, draw(st.integers(0, 3)))
    hdr = hdr[: draw(st.sampled_from([16, 16, 16, 16, 0, 5, 15]))]
    stream = hdr + data if rtype != blk.T_IN else hdr
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=SEG_MAX)))
    out = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    out = [o for o in out if o]
    if rtype == blk.T_IN:
        n = len(data)
        parts = draw(st.integers(1, SEG_MAX + 2))
        sizes = [n // parts] * (parts - 1) + [n - n // parts * (parts - 1)]
    elif rtype == blk.T_GET_ID:
        sizes = draw(st.lists(st.sampled_from([1, 7, 13, 20, 32]), max_size=4))
    else:
        sizes = []
    status = draw(st.sampled_from(["own", "own", "own", "merged", "none"]))
    sizes = [s for s in sizes if s]
    if status == "own":
        sizes.append(1)
    elif status == "merged" and sizes:
        sizes[-1] += 1
    if not out and not sizes:
        sizes = [1]
    return out, sizes


@st.composite
def rounds(draw) -> tuple[int, list[list[tuple[list[bytes], list[int]]]]]:
    lbs = draw(st.sampled_from([512, 512, 4096]))
    todo = []
    for _ in range(draw(st.integers(1, 4))):
        todo.append([draw(request(z, lbs)) for z in range(draw(st.integers(1, 8)))])
    return lbs, todo


def run_rounds(path: Path, plane: str, packed: bool, lbs: int, todo, loop: bool = True) -> list:
    """Each round: all its requests added, one kick, every completion (or a reset).
    ``loop=False``: the native plane without its own loop (the Python device loop)."""
    mem = GuestMemory.create(8 << 20)
    dev = BlkDevice(path, plane=plane, seg_max=SEG_MAX, logical_block_size=lbs)
    if not loop:
        dev.serve_parked = lambda ep: False
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    results = []
    try:
        b = BlkDriver.open(drv, packed=packed)
        for reqs in todo:
            tokens = [drv.queues[0].add(out, sizes) for out, sizes in reqs]
            drv.kick(0)
            try:
                done = drv.wait(0, count=len(reqs), timeout=10)
            except DeviceNeedsReset:
                results.append("needs reset")
                b = BlkDriver.open(drv, packed=packed)
                continue
            by_token = {c.token: (status_of(c), c.length, c.data) for c in done}
            results.append([by_token[t] for t in tokens])
        assert b.read(0, lbs // SECTOR) is not None  # still serving
    finally:
        drv.reset()
        dev.close()
        mem.close()
    return results


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=rounds(), packed=st.booleans())
def test_both_planes_and_both_loops_give_the_same_results(tmp_path_factory, work, packed):
    lbs, todo = work
    image = os.urandom(IMAGE_SIZE)
    outcome = {}
    for plane, loop in (("python", True), ("native", True), ("native", False)):
        path = tmp_path_factory.mktemp(plane) / "disk.img"
        path.write_bytes(image)
        outcome[plane, loop] = run_rounds(path, plane, packed, lbs, todo, loop), path.read_bytes()
    for key in (("native", True), ("native", False)):
        assert outcome[key][0] == outcome["python", True][0]
        assert outcome[key][1] == outcome["python", True][1]


# -- the plane on its own: batches built by hand --


class Harness:
    """A BlkPlane on a queue stand-in, guest RAM and an image, without a device thread."""

    def __init__(self, path: Path, depth: int = 128, size: int = 256) -> None:
        self.mem = GuestMemory.create(8 << 20)
        self.kicks = 0
        self.q = SimpleNamespace(max_size=size, ring=object(), kick=self._kick)
        self.engine = open_engine(str(path), False, depth)
        self.plane = blk_native.BlkPlane(
            self.q,
            self.engine,
            capacity=self.engine.size // SECTOR,
            block_size=SECTOR,
            seg_max=254,
            readonly=False,
            serial=b"native".ljust(20, b"\0"),
        )
        self.plane.mode = blk_native.MODE_DISCARD | blk_native.MODE_WRITE_ZEROES
        self.next_gpa = 0x1000

    def _kick(self) -> None:
        self.kicks += 1

    def buf(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        gpa, self.next_gpa = self.next_gpa, self.next_gpa + (n + 4095) // 4096 * 4096
        self.mem.write(gpa, bytes(n) if isinstance(data, int) else data)
        return gpa

    def batch(self, chains: list[tuple[int, list[tuple[int, int, int]]]]) -> Batch:
        return Batch.from_chains(chains)

    def read_chain(self, head: int, sector: int, n: int) -> tuple[int, list, int, int]:
        h, d, s = self.buf(header(blk.T_IN, sector)), self.buf(n), self.buf(b"\xee")
        return head, [(h, 16, 0), (d, n, 1), (s, 1, 1)], d, s

    def close(self) -> None:
        self.plane.drop()
        self.engine.close()
        self.mem.close()


@pytest.fixture
def harness(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    h = Harness(path)
    yield h, path
    h.close()


def test_64_reads_are_outstanding_at_once_and_all_complete(harness):
    h, path = harness
    image = path.read_bytes()
    chains = [h.read_chain(i, 8 * i, 4096) for i in range(64)]
    h.plane.serve(h.batch([(c[0], c[1]) for c in chains]), h.mem)
    assert h.engine.outstanding == 64 and h.plane.count() == 64  # submitted, none reaped
    got = {}
    for heads, lengths in h.plane.take_all():
        got.update(zip(heads.tolist(), lengths.tolist(), strict=True))
    assert got == {i: 4097 for i in range(64)} and h.plane.count() == 0
    for head, _, d, s in chains:
        assert h.mem.read(d, 4096) == image[head * 4096 : head * 4096 + 4096]
        assert h.mem.read(s, 1) == b"\0"
        assert h.mem.regions[0].dirty[d >> 12] and h.mem.regions[0].dirty[s >> 12]


def test_cancel_publishes_nothing_and_writes_no_status(harness):
    h, _ = harness
    chains = [h.read_chain(i, 8 * i, 4096) for i in range(32)]
    h.plane.serve(h.batch([(c[0], c[1]) for c in chains]), h.mem)
    h.plane.cancel()
    wait_until(lambda: not h.plane.take_due(0.0) and h.plane.count() == 0)
    assert all(h.mem.read(c[3], 1) == b"\xee" for c in chains)  # no status written
    assert h.engine.outstanding == 0
    h.plane.drop()  # and the plane serves again afterwards
    h.plane.serve(h.batch([(c[0], c[1]) for c in chains[:1]]), h.mem)
    assert [(x.tolist(), y.tolist()) for x, y in h.plane.take_all()] == [([0], [4097])]


def test_a_full_engine_backlogs_and_kicks_the_queue_when_room_returns(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    h = Harness(path, depth=4)
    try:
        chains = [h.read_chain(i, 8 * i, 4096) for i in range(10)]
        h.plane.serve(h.batch([(c[0], c[1]) for c in chains]), h.mem)
        assert h.engine.outstanding == 4 and h.plane.count() == 10 and h.plane.room() == 0
        h.plane.starve()
        assert h.kicks == 0
        got = []
        while len(got) < 10:
            for heads, _ in h.plane.take_due(0.0):
                got += heads.tolist()
        assert sorted(got) == list(range(10)) and h.kicks == 1
    finally:
        h.close()


def test_readable_after_writable_and_no_status_fail_before_anything_runs(harness):
    h, path = harness
    image = path.read_bytes()
    good = (0, [(h.buf(header(blk.T_OUT, 0)), 16, 0), (h.buf(512), 512, 0), (h.buf(1), 1, 1)])
    bad_order = (1, [(h.buf(header(blk.T_IN, 0)), 16, 0), (h.buf(1), 1, 1), (h.buf(8), 8, 0)])
    no_status = (2, [(h.buf(header(blk.T_IN, 0)), 16, 0), (h.buf(0), 0, 1)])
    for bad in (bad_order, no_status):
        batch = h.batch([good, bad])
        with pytest.raises(DeviceError) as python:
            _parse_batch(h.mem, batch)
        with pytest.raises(DeviceError) as native:
            h.plane.serve(batch, h.mem)
        assert str(native.value) == str(python.value)
        assert h.plane.count() == 0 and path.read_bytes() == image


def test_buffers_outside_guest_ram_fail_the_device(harness):
    h, _ = harness
    outside = 64 << 20
    for segs in (
        [(outside, 16, 0), (h.buf(1), 1, 1)],  # the header
        [(h.buf(header(blk.T_IN, 0)), 16, 0), (outside, 512, 1), (h.buf(1), 1, 1)],
        [(h.buf(header(blk.T_IN, 0)), 16, 0), (h.buf(512), 512, 1), (outside, 1, 1)],
        [(h.buf(header(blk.T_IN, 0)), 16, 0), ((8 << 20) - 256, 512, 1), (h.buf(1), 1, 1)],
    ):
        with pytest.raises(GuestMemoryError):
            h.plane.serve(h.batch([(5, segs)]), h.mem)
        assert h.plane.count() == 0


# -- on the device thread --


@pytest.fixture
def native_blk(tmp_path):
    made = []

    def _open(packed: bool = False, **kw):
        path = tmp_path / f"disk{len(made)}.img"
        path.write_bytes(os.urandom(4 << 20))
        mem = GuestMemory.create(16 << 20)
        dev = BlkDevice(path, plane="native", **kw)
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        made.append((drv, dev, mem))
        return BlkDriver.open(drv, packed=packed), dev, path

    yield _open
    for drv, dev, mem in made:
        drv.reset()
        dev.close()
        mem.close()


def submit_writes(b: BlkDriver, n: int, qidx: int = 0) -> dict[int, bytes]:
    dq = b.drv.queues[qidx]
    data = {}
    for i in range(n):
        data[8 * i] = os.urandom(4096)
        dq.add([header(blk.T_OUT, 8 * i), data[8 * i]], [1])
    b.drv.kick(qidx)
    return data


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drain_stop_publishes_everything(native_blk, packed):
    b, dev, path = native_blk(packed)
    data = submit_writes(b, 64)
    dev.stop("drain")
    assert dev.run_state is RunState.STOPPED
    assert not dev.queues[0].inflight() and dev.queues[0].held() == 0  # all published
    dev.resume()  # (the stop may have come before the device fetched all 64)
    assert all(status_of(c) == 0 for c in b.wait(count=64))
    image = path.read_bytes()
    assert all(image[s * SECTOR : s * SECTOR + 4096] == d for s, d in data.items())


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_report_stop_publishes_nothing_more_and_resubmits_after_resume(native_blk, packed):
    b, dev, path = native_blk(packed)
    data = submit_writes(b, 64)
    dev.stop("report")
    assert dev.run_state is RunState.STOPPED and dev.queues[0].held() == 0
    left = 64 - len(b.drv.queues[0].poll())  # in flight, or never fetched
    used = dev.queues[0].state()
    time.sleep(0.05)  # anything still outstanding would land now: nothing may
    assert dev.queues[0].state() == used and not b.drv.queues[0].poll()
    dev.resume()
    assert all(status_of(c) == 0 for c in b.wait(count=left))
    image = path.read_bytes()
    assert all(image[s * SECTOR : s * SECTOR + 4096] == d for s, d in data.items())


def test_reset_with_io_outstanding_then_serves_again(native_blk):
    b, dev, _ = native_blk()
    submit_writes(b, 64)
    b.drv.reset()
    assert dev.queues[0].held() == 0
    b = BlkDriver.open(b.drv)
    assert b.write(0, bytes(512)) == 0 and b.read(0, 1) == bytes(512)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_four_queues_each_with_its_engine(native_blk, packed):
    b, dev, path = native_blk(packed, num_queues=4)
    assert len({id(e) for e in dev.engines}) == 4
    data = {q: submit_writes(b, 16, q) for q in range(4)}  # same sectors: disjoint below
    for q in range(4):
        assert all(status_of(c) == 0 for c in b.wait(q, count=16))
    image = path.read_bytes()
    last = data[3]  # the queues wrote the same sectors in an unknown order: one of them won
    assert all(
        any(image[s * SECTOR : s * SECTOR + 4096] == data[q][s] for q in range(4)) for s in last
    )


def test_hostile_iodepth_from_the_guest_is_bounded_by_the_engine(native_blk):
    b, dev, path = native_blk(queue_max_size=256, iodepth=8)
    data = submit_writes(b, 200)
    assert all(status_of(c) == 0 for c in b.wait(count=200))
    image = path.read_bytes()
    assert all(image[s * SECTOR : s * SECTOR + 4096] == d for s, d in data.items())


# -- storage and the spec --


def test_spec_accepts_files_uris_and_options(tmp_path):
    from emu.devices.registry import SpecError, make_devices

    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 20))
    (dev,) = make_devices([f"blk:{path}:ro:queues=2"])
    try:
        assert dev.readonly and len(dev.queues) == 2
    finally:
        dev.close()
    (dev,) = make_devices([f"blk:{path}"])
    try:
        assert not dev.readonly and len(dev.queues) == 1
    finally:
        dev.close()
    with pytest.raises(SpecError):
        make_devices([f"blk:{path}:rw"])
    assert is_nbd("nbd://h:10809/x") and is_nbd("nbd+unix:///x?socket=/s")
    assert not is_nbd(str(path))


def test_random_requests_on_random_rings_do_not_crash(tmp_path):
    """A cheap smoke of many mixed requests at depth, checked against the file."""
    rng = random.Random(7)
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    mem = GuestMemory.create(16 << 20)
    dev = BlkDevice(path, plane="native", iodepth=16)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    try:
        b = BlkDriver.open(drv, packed=True)
        expect = bytearray(IMAGE_SIZE)
        for _ in range(5):
            sectors = rng.sample(range(0, CAPACITY, 8), 48)
            for s in sectors:
                d = rng.randbytes(4096)
                expect[s * SECTOR : s * SECTOR + 4096] = d
                drv.queues[0].add([header(blk.T_OUT, s), d], [1])
            drv.kick(0)
            assert all(status_of(c) == 0 for c in drv.wait(0, count=48))
        assert path.read_bytes() == bytes(expect)
        got = np.frombuffer(b.read(0, CAPACITY // 4), np.uint8)
        assert got.tobytes() == bytes(expect[: IMAGE_SIZE // 4])
    finally:
        drv.reset()
        dev.close()
        mem.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=rounds(), packed=st.booleans())
def test_an_image_on_tmpfs_is_read_and_written_in_thread_with_the_same_results(
    tmp_path_factory, work, packed
):
    """tmpfs has no non-blocking I/O, so the io_uring engine does its reads and writes in
    ``submit`` instead of through io-wq workers; guest-visible results stay the same."""
    from emu.backends._uring import UringEngine

    if not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    lbs, todo = work
    image = os.urandom(IMAGE_SIZE)
    ref = tmp_path_factory.mktemp("python") / "disk.img"
    ref.write_bytes(image)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        path = Path(shm) / "disk.img"
        path.write_bytes(image)
        engine = UringEngine(path)
        assert engine.sync_rw
        engine.close()
        native = run_rounds(path, "native", packed, lbs, todo), path.read_bytes()
    assert native == (run_rounds(ref, "python", packed, lbs, todo), ref.read_bytes())
