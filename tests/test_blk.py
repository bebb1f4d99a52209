"""virtio-blk end to end: reference driver -> mmio transport -> device thread -> image file."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import BLK_PLANES, RING_CORES, RING_MODES

from emu.backends.file import FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, BlockFile
from emu.devices import blk
from emu.devices.base import DeviceError
from emu.devices.blk import (
    DWZ_F_UNMAP,
    MAX_DWZ_SECTORS,
    MAX_DWZ_SEGMENTS,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    BlkDevice,
)
from emu.memory import GuestMemory
from emu.ringdefs import Batch
from emu.testing.blk import BlkDriver, BlkStatusError, dwz_payload, header, status_of
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

#: every feature the device offers, for tests that then leave some out
ALL = (1 << 64) - 1
IMAGE_SIZE = 4 << 20
CAPACITY = IMAGE_SIZE // SECTOR

#: what Linux 6.1 accepted from QEMU's blk (traces/linux-6.1 README section 4)
QEMU_BLK_BITS = [
    blk.F_SEG_MAX,
    blk.F_GEOMETRY,
    blk.F_BLK_SIZE,
    blk.F_FLUSH,
    blk.F_TOPOLOGY,
    blk.F_CONFIG_WCE,
    blk.F_DISCARD,
    blk.F_WRITE_ZEROES,
]


@pytest.fixture(autouse=True, params=BLK_PLANES)
def blk_plane(request, monkeypatch) -> str:
    """Every test here runs on both data planes (the device's default comes from the env)."""
    monkeypatch.setenv("EMU_BLK_PLANE", request.param)
    return request.param


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


@pytest.fixture
def open_blk(mem, image):
    """open_blk(mode=, impl=, features=, queue_size=, path=, version=, **BlkDevice kwargs)"""
    made: list[tuple[VirtioMmioDriver, BlkDevice]] = []

    def _open(*, mode=None, impl=None, features=None, queue_size=None, path=image, version=2, **kw):
        dev = BlkDevice(path, **kw)
        for q in dev.queues:
            q.impl = impl
        drv = VirtioMmioDriver(MmioTransport(dev, mem, version=version), mem)
        made.append((drv, dev))
        return BlkDriver.open(drv, features, queue_size=queue_size, **(mode or {})), dev

    yield _open
    for drv, dev in made:
        drv.reset()
        dev.close()


def file_bytes(path: Path, sector: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(count * SECTOR)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pattern(seed: int, nbytes: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(4, "little")).digest(nbytes)


# -- features and config space --


def test_offers_what_linux_accepted_from_qemu_and_config_layout(open_blk):
    b, dev = open_blk(seg_max=100, serial="x")
    drv = b.drv
    for bit in QEMU_BLK_BITS + [blk.F_SIZE_MAX]:
        assert drv.features >> bit & 1, f"feature bit {bit} not negotiated"
    assert not drv.features >> blk.F_RO & 1 and not drv.features >> blk.F_MQ & 1
    assert drv.transport.read(mmio_regs.DEVICE_ID, 4) == 2
    assert drv.config_read(0, 8) == CAPACITY
    assert drv.config_read(8, 4) == dev.size_max
    assert drv.config_read(12, 4) == 100
    assert drv.config_read(16, 2) == CAPACITY // (16 * 63)  # cylinders
    assert (drv.config_read(18, 1), drv.config_read(19, 1)) == (16, 63)
    assert drv.config_read(20, 4) == 512
    assert drv.config_read(32, 1) == 1  # writeback
    assert drv.config_read(34, 2) == 1
    assert drv.config_read(36, 4) == MAX_DWZ_SECTORS
    assert drv.config_read(40, 4) == MAX_DWZ_SEGMENTS
    assert drv.config_read(44, 4) == 1
    assert drv.config_read(48, 4) == MAX_DWZ_SECTORS
    assert drv.config_read(52, 4) == MAX_DWZ_SEGMENTS
    assert drv.config_read(56, 1) == 1  # write_zeroes_may_unmap
    assert drv.config_read(60, 4) == 0  # past the config space


def test_constructor_refuses_bad_geometry(image):
    for kw in (dict(num_queues=0), dict(logical_block_size=1000), dict(seg_max=5000)):
        with pytest.raises(ValueError):
            BlkDevice(image, **kw)


# -- data path --


@pytest.mark.parametrize("impl", RING_CORES)
@pytest.mark.parametrize("mode", RING_MODES)
def test_read_write_round_trip_against_the_file(open_blk, image, mode, impl):
    b, _ = open_blk(mode=mode, impl=impl, queue_size=16)
    for sector, count in ((0, 1), (7, 8), (CAPACITY - 3, 3), (1000, 64)):
        assert b.read(sector, count) == file_bytes(image, sector, count)
    for i, (sector, count) in enumerate(((0, 1), (9, 8), (CAPACITY - 1, 1), (2048, 128))):
        data = pattern(i, count * SECTOR)
        assert b.write(sector, data) == S_OK
        assert file_bytes(image, sector, count) == data  # on the file once acknowledged
        assert b.read(sector, count) == data
    # 40 requests on a 16-entry ring: laps it in both formats
    for i in range(40):
        assert b.write(3000 + i, pattern(100 + i, SECTOR)) == S_OK
    assert file_bytes(image, 3000, 40) == b"".join(pattern(100 + i, SECTOR) for i in range(40))


def test_legacy_transport(open_blk, image):
    b, _ = open_blk(version=1)
    assert b.drv.config_read(0, 8) == CAPACITY
    assert b.write(64, pattern(5, 4096)) == S_OK
    assert file_bytes(image, 64, 8) == pattern(5, 4096) == b.read(64, 8)
    assert b.flush() == S_OK and b.discard([(64, 8, 0)]) == S_OK


@pytest.mark.parametrize("mode", RING_MODES)
def test_used_length_counts_data_and_status(open_blk, mode):
    b, _ = open_blk(mode=mode)
    drv = b.drv
    drv.submit(0, [header(blk.T_IN, 4)], [2048, 1])
    (c,) = drv.wait(0)
    assert (c.length, status_of(c)) == (2049, S_OK)
    drv.submit(0, [header(blk.T_OUT, 4), bytes(1024)], [1])
    (c,) = drv.wait(0)
    assert (c.length, status_of(c)) == (1, S_OK)
    drv.submit(0, [header(blk.T_IN, CAPACITY)], [512, 1])  # refused: nothing but status
    (c,) = drv.wait(0)
    assert (c.length, status_of(c)) == (1, S_IOERR)


def test_header_data_and_status_may_share_or_split_buffers(open_blk, image):
    b, _ = open_blk()
    drv = b.drv
    data = pattern(7, 1024)
    hdr = header(blk.T_OUT, 20)
    # header split over two buffers, the second one carrying the data too
    drv.submit(0, [hdr[:5], hdr[5:] + data[:300], data[300:]], [1])
    (c,) = drv.wait(0)
    assert status_of(c) == S_OK and file_bytes(image, 20, 2) == data
    # read data into odd-sized pieces; the status byte shares the last buffer
    drv.submit(0, [header(blk.T_IN, 20)], [100, 700, 225])
    (c,) = drv.wait(0)
    assert c.length == 1025 and c.data[:1024] == data and status_of(c) == S_OK


def test_reads_mark_guest_pages_dirty(open_blk, mem):
    b, _ = open_blk()
    mem.get_and_clear_dirty()
    b.drv.submit(0, [header(blk.T_IN, 0)], [8192, 1])
    (c,) = b.drv.wait(0)
    assert status_of(c) == S_OK
    assert len(mem.get_and_clear_dirty()) >= 2  # the data pages (and ring pages)


def test_many_requests_in_flight_complete_in_batches(open_blk, image):
    b, _ = open_blk(queue_size=256)
    tokens = {}
    for i in range(128):
        tokens[b.submit(blk.T_OUT, 5000 + 2 * i, out=pattern(i, 1024))] = i
    done = b.wait(count=128)
    assert sorted(c.token for c in done) == sorted(tokens)
    assert all(status_of(c) == S_OK and c.length == 1 for c in done)
    for i in range(128):
        assert file_bytes(image, 5000 + 2 * i, 2) == pattern(i, 1024)


# -- flush, get id, status for what is not supported --


def test_flush_and_flush_with_nonzero_sector(open_blk, monkeypatch):
    b, dev = open_blk(plane="python")  # counts its fdatasyncs
    syncs = count_syncs(monkeypatch, dev)
    assert b.flush() == S_OK and syncs == [1]
    assert b.flush(sector=8) == S_IOERR and syncs == [1]  # spec: sector must be 0


def test_flush_error_is_ioerr(open_blk, monkeypatch):
    b, dev = open_blk(plane="python")  # injects into its fdatasync
    monkeypatch.setattr(dev.file, "flush", failing_flush)
    assert b.flush() == S_IOERR


@pytest.mark.parametrize(
    "serial,in_size,expect",
    [
        ("disk-1", 20, b"disk-1" + bytes(14)),
        ("abcdefghijklmnopqrstuvwxyz", 20, b"abcdefghijklmnopqrst"),  # 20 long: no NUL
        ("disk-1", 4, b"disk"),  # cut to the buffer the driver gave
    ],
)
def test_get_id(open_blk, serial, in_size, expect):
    b, _ = open_blk(serial=serial)
    status, data = b.request(blk.T_GET_ID, in_size=in_size)
    assert status == S_OK and data == expect


def test_get_id_into_many_small_buffers(open_blk):
    b, _ = open_blk(serial="0123456789abcdefghijKLM")
    b.drv.submit(0, [header(blk.T_GET_ID)], [1] * 30)  # 29 one-byte buffers, then status
    (c,) = b.drv.wait(0)
    assert (status_of(c), c.length) == (S_OK, 21)
    assert c.data[:20] == b"0123456789abcdefghij" and c.data[20:29] == bytes(9)


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 0x80000000, 0xFFFFFFFF])
def test_unknown_request_types_are_unsupp(open_blk, image, rtype):
    b, _ = open_blk()
    before = digest(image)
    assert b.request(rtype, 0, out=bytes(512), in_size=512)[0] == S_UNSUPP
    assert digest(image) == before


# -- ranges and sizes the guest gets wrong --


@pytest.mark.parametrize(
    "sector,nbytes",
    [
        (CAPACITY, 512),  # just past the end
        (CAPACITY - 1, 1024),  # straddles the end
        (2**64 - 1, 512),  # would wrap a 64-bit sector
        (0, 511),  # not whole sectors
        (0, 513),
    ],
)
def test_bad_ranges_are_ioerr_and_write_nothing(open_blk, image, sector, nbytes):
    b, _ = open_blk()
    before = digest(image)
    assert b.request(blk.T_IN, sector, in_size=nbytes)[0] == S_IOERR
    assert b.request(blk.T_OUT, sector, out=bytes(nbytes))[0] == S_IOERR
    assert digest(image) == before


def test_seg_max_is_enforced(open_blk):
    b, _ = open_blk(seg_max=4)
    drv = b.drv
    drv.submit(0, [header(blk.T_IN)], [512] * 4 + [1])
    assert status_of(drv.wait(0)[0]) == S_OK
    drv.submit(0, [header(blk.T_IN)], [512] * 5 + [1])
    assert status_of(drv.wait(0)[0]) == S_IOERR


def test_logical_block_size_4k(open_blk, image):
    b, _ = open_blk(logical_block_size=4096)
    assert b.drv.config_read(20, 4) == 4096
    assert b.drv.config_read(44, 4) == 8  # discard alignment in sectors
    assert b.read(8, 8) == file_bytes(image, 8, 8)
    with pytest.raises(BlkStatusError):
        b.read(9, 8)  # not on a 4 KiB boundary
    with pytest.raises(BlkStatusError):
        b.read(8, 1)  # not a whole block


# -- malformed chains: status where there is a status byte, NEEDS_RESET where there is none --


@pytest.mark.parametrize(
    "out,in_sizes",
    [
        ([b"\x00" * 8], [1]),  # 8 of 16 header bytes
        ([b"\x00" * 15], [512, 1]),
        ([], [1]),  # no header at all
    ],
)
def test_short_header_is_ioerr(open_blk, out, in_sizes):
    b, _ = open_blk()
    b.drv.submit(0, out, in_sizes)
    (c,) = b.drv.wait(0)
    assert (status_of(c), c.length) == (S_IOERR, 1)
    assert b.read(0, 1)  # the device goes on


@pytest.mark.parametrize("mode", RING_MODES)
@pytest.mark.parametrize("in_sizes", [[], [0]], ids=["no-writable", "empty-writable"])
def test_missing_status_byte_needs_reset_and_device_recovers(open_blk, image, mode, in_sizes):
    b, dev = open_blk(mode=mode)
    drv = b.drv
    drv.submit(0, [header(blk.T_OUT, 0), bytes(512)], in_sizes)
    with pytest.raises(DeviceNeedsReset):
        drv.wait(0, timeout=2)
    assert drv.status & mmio_regs.S_DEVICE_NEEDS_RESET and dev.broken
    before = digest(image)
    again = BlkDriver.open(drv, **mode)  # reset and start over: the device works again
    assert again.write(0, pattern(1, 512)) == S_OK
    assert digest(image) != before and file_bytes(image, 0, 1) == pattern(1, 512)


def test_bad_chain_fails_its_whole_batch_before_any_io(open_blk, image):
    b, dev = open_blk()
    before = digest(image)
    drv = b.drv
    dq = drv.queues[0]  # add() without a kick: both chains reach the device in one batch
    dq.add([header(blk.T_OUT, 0), bytes(512)], [1])
    dq.add([header(blk.T_OUT, 1), bytes(512)], [])  # no status byte
    drv.kick(0)
    with pytest.raises(DeviceNeedsReset):
        drv.wait(0, timeout=2)
    assert digest(image) == before


def test_parser_refuses_readable_after_writable(mem):
    """The ring cores refuse this order already; the blk parser does not rely on it."""
    batch = Batch(
        np.array([0], np.uint16),
        np.array([0, 3], np.uint32),
        np.array([0x1000, 0x2000, 0x3000], np.uint64),
        np.array([16, 1, 512], np.uint32),
        np.array([0, 1, 0], np.uint8),
    )
    with pytest.raises(DeviceError, match="readable descriptor after a writable"):
        blk._parse_batch(mem, batch)


# -- discard and write zeroes --


def test_discard(open_blk, image):
    b, _ = open_blk()
    assert b.discard([(64, 8, 0)]) == S_OK
    assert b.discard([(0, 8, 0), (CAPACITY - 8, 8, 0)]) == S_OK  # several segments
    assert b.discard([(0, 0, 0)]) == S_OK  # nothing to do
    assert b.read(64, 8)  # readable afterwards; contents are unspecified


@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("flags", [0, DWZ_F_UNMAP], ids=["allocate", "unmap"])
def test_write_zeroes(open_blk, tmp_path, where, flags):
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    path = base / f"emu-test-wz-{os.getpid()}.img"
    path.write_bytes(pattern(3, IMAGE_SIZE))
    try:
        b, _ = open_blk(path=path)
        assert b.write_zeroes([(10, 6, flags), (100, 1, flags)]) == S_OK
        assert file_bytes(path, 10, 6) == bytes(6 * SECTOR)
        assert file_bytes(path, 100, 1) == bytes(SECTOR)
        whole = pattern(3, IMAGE_SIZE)
        assert file_bytes(path, 9, 1) == whole[9 * SECTOR : 10 * SECTOR]
        assert file_bytes(path, 16, 84) == whole[16 * SECTOR : 100 * SECTOR]
        assert path.stat().st_size == IMAGE_SIZE
        assert b.read(10, 6) == bytes(6 * SECTOR)
    finally:
        path.unlink()


@pytest.mark.parametrize(
    "rtype", [blk.T_DISCARD, blk.T_WRITE_ZEROES], ids=["discard", "write-zeroes"]
)
@pytest.mark.parametrize(
    "payload,status",
    [
        pytest.param(dwz_payload([(0, 8, 2)]), S_UNSUPP, id="unknown-flag"),
        pytest.param(dwz_payload([(0, 8, 0x80000000)]), S_UNSUPP, id="high-flag"),
        pytest.param(dwz_payload([(CAPACITY - 4, 8, 0)]), S_IOERR, id="beyond-capacity"),
        pytest.param(dwz_payload([(2**64 - 1, 1, 0)]), S_IOERR, id="sector-wraps"),
        pytest.param(dwz_payload([(0, MAX_DWZ_SECTORS + 1, 0)]), S_IOERR, id="too-long"),
        pytest.param(
            dwz_payload([(i, 1, 0) for i in range(MAX_DWZ_SEGMENTS + 1)]),
            S_UNSUPP,
            id="too-many-segments",
        ),
        pytest.param(dwz_payload([(0, 8, 0)])[:15], S_IOERR, id="partial-segment"),
        pytest.param(b"", S_IOERR, id="no-segment"),
    ],
)
def test_bad_discard_and_write_zeroes_segments(open_blk, image, rtype, payload, status):
    b, _ = open_blk()
    before = digest(image)
    assert b.request(rtype, out=payload)[0] == status
    assert digest(image) == before


def test_unmap_on_discard_is_unsupp(open_blk, image):
    b, _ = open_blk()
    before = digest(image)
    assert b.discard([(0, 8, DWZ_F_UNMAP)]) == S_UNSUPP
    assert digest(image) == before


def test_one_bad_segment_stops_all_segments(open_blk, image):
    b, _ = open_blk()
    before = digest(image)
    assert b.write_zeroes([(0, 8, 0), (CAPACITY, 8, 0)]) == S_IOERR
    assert digest(image) == before


def test_discard_and_write_zeroes_need_their_features(open_blk, image):
    b, _ = open_blk(features=ALL & ~(1 << blk.F_DISCARD | 1 << blk.F_WRITE_ZEROES))
    before = digest(image)
    assert b.discard([(0, 8, 0)]) == S_UNSUPP
    assert b.write_zeroes([(0, 8, 0)]) == S_UNSUPP
    assert digest(image) == before


# -- read-only --


def test_read_only_device(open_blk, image):
    b, _ = open_blk(readonly=True)
    assert b.drv.features >> blk.F_RO & 1
    before = digest(image)
    assert b.read(0, 8) == file_bytes(image, 0, 8)
    assert b.write(0, bytes(512)) == S_IOERR
    assert b.discard([(0, 8, 0)]) == S_IOERR
    assert b.write_zeroes([(0, 8, DWZ_F_UNMAP)]) == S_IOERR
    assert b.flush() == S_OK
    assert b.get_id().startswith(b"emu-blk")
    assert digest(image) == before


# -- writeback / writethrough --


def count_syncs(monkeypatch, dev: BlkDevice) -> list[int]:
    calls = [0]
    real = dev.file.flush

    def flush() -> None:
        calls[0] += 1
        real()

    monkeypatch.setattr(dev.file, "flush", flush)
    return calls


def failing_flush() -> None:
    raise OSError(errno.EIO, "injected")


def test_writeback_does_not_sync_writethrough_syncs_each_batch(open_blk, monkeypatch):
    b, dev = open_blk(plane="python")  # counts its fdatasyncs
    syncs = count_syncs(monkeypatch, dev)
    assert b.write(0, bytes(512)) == S_OK and syncs == [0]  # writeback: FLUSH does it
    b.drv.config_write(32, 1, 0)
    assert b.drv.config_read(32, 1) == 0
    assert b.write(0, bytes(512)) == S_OK and syncs == [1]
    assert b.read(0, 1) and syncs == [1]  # reads need no sync
    dq = b.drv.queues[0]  # 8 writes made available with one kick: one batch, one sync
    for i in range(8):
        dq.add([header(blk.T_OUT, i), bytes(512)], [1])
    b.drv.kick(0)
    assert all(status_of(c) == S_OK for c in b.wait(count=8))
    assert syncs == [2]
    b.drv.config_write(32, 1, 7)  # not a cache mode: ignored
    b.drv.config_write(32, 4, 1)  # wrong width: ignored
    assert b.drv.config_read(32, 1) == 0


def test_writethrough_sync_failure_fails_the_writes(open_blk, monkeypatch):
    b, dev = open_blk(plane="python")  # injects into its fdatasync
    b.drv.config_write(32, 1, 0)
    monkeypatch.setattr(dev.file, "flush", failing_flush)
    assert b.write(0, bytes(512)) == S_IOERR
    assert b.read(0, 1)  # reads do not sync, so they still succeed


def test_without_flush_feature_the_device_writes_through(open_blk, monkeypatch):
    b, dev = open_blk(features=ALL & ~(1 << blk.F_FLUSH), plane="python")
    syncs = count_syncs(monkeypatch, dev)
    assert b.write(0, bytes(512)) == S_OK and syncs == [1]


def test_reset_restores_writeback(open_blk):
    b, dev = open_blk()
    b.drv.config_write(32, 1, 0)
    b2 = BlkDriver.open(b.drv)
    assert b2.drv.config_read(32, 1) == 1 and dev.writeback == 1


# -- multiqueue --


@pytest.mark.parametrize("impl", RING_CORES)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_multiqueue_requests_in_flight_on_all_queues(open_blk, image, packed, impl):
    nq = 4
    b, dev = open_blk(num_queues=nq, mode=dict(packed=packed), impl=impl)
    drv = b.drv
    assert drv.features >> blk.F_MQ & 1 and drv.config_read(34, 2) == nq
    assert sorted(drv.queues) == list(range(nq))
    expect = {}
    for i in range(32):  # interleaved: every queue has requests waiting at once
        q = i % nq
        sector = 100 + 8 * i
        expect[sector] = pattern(i, 8 * SECTOR)
        b.submit(blk.T_OUT, sector, out=expect[sector], qidx=q)
    for q in range(nq):
        done = b.wait(q, count=32 // nq)
        assert all(status_of(c) == S_OK for c in done)
    for sector, data in expect.items():
        assert file_bytes(image, sector, 8) == data
    for q in range(nq):  # and each queue reads back what another wrote
        assert b.read(100 + 8 * ((q + 1) % 32), 8, qidx=q) == expect[100 + 8 * ((q + 1) % 32)]


# -- the file backend's fallbacks --


def test_block_file_zeroing_falls_back_to_writing_zeros(tmp_path):
    path = tmp_path / "f.img"
    path.write_bytes(b"\xff" * 65536)
    f = BlockFile(path)
    try:
        f._modes[FALLOC_FL_PUNCH_HOLE] = f._modes[FALLOC_FL_ZERO_RANGE] = False
        f.write_zeroes(512, 3 << 10, unmap=True)
        f.discard(0, 512)  # no hole punching: a no-op
    finally:
        f.close()
    data = path.read_bytes()
    assert data[:512] == b"\xff" * 512
    assert data[512 : 512 + 3072] == bytes(3072)
    assert data[512 + 3072 :] == b"\xff" * (65536 - 3584)


# -- whatever the guest sends, the device answers or asks for a reset, and goes on --

_TYPES = st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD])
_SECTORS = st.one_of(
    st.integers(0, CAPACITY + 8), st.integers(0, 2**64 - 1), st.sampled_from([0, CAPACITY - 1])
)


@st.composite
def hostile_requests(draw) -> tuple[list[bytes], list[int]]:
    rtype = draw(st.one_of(_TYPES, st.integers(0, 2**32 - 1)))
    hdr = header(rtype, draw(_SECTORS), draw(st.integers(0, 2**32 - 1)))
    hdr = hdr[: draw(st.sampled_from([16, 16, 16, 0, 5, 15]))]
    data = draw(st.sampled_from([0, 512, 1024, 100, 16, 32, 4096]))
    cuts = sorted(draw(st.lists(st.integers(0, len(hdr) + data), max_size=3)))
    stream = hdr + bytes(data)
    out = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    in_sizes = draw(st.lists(st.sampled_from([0, 1, 7, 20, 512, 1025]), max_size=4))
    return [o for o in out if o], in_sizes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(hostile_requests(), min_size=1, max_size=6))
def test_hostile_requests_get_a_status_or_needs_reset(tmp_path_factory, requests):
    path = tmp_path_factory.mktemp("hostile") / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    mem = GuestMemory.create(16 << 20)
    dev = BlkDevice(path)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    try:
        b = BlkDriver.open(drv)
        for out, in_sizes in requests:
            if not out and not in_sizes:
                continue
            drv.submit(0, out, in_sizes)
            try:
                (c,) = drv.wait(0, timeout=5)
            except DeviceNeedsReset:
                assert sum(in_sizes) == 0  # only a chain without a status byte may do this
                b = BlkDriver.open(drv)
                continue
            assert sum(in_sizes) > 0
            assert status_of(c) in (S_OK, S_IOERR, S_UNSUPP)
            assert 1 <= c.length <= len(c.data)
        assert b.read(0, 1) is not None  # still serving
    finally:
        drv.reset()
        dev.close()
        mem.close()
