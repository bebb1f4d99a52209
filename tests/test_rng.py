"""virtio-rng end to end: reference driver -> mmio transport -> device thread -> source."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest
from modes import RING_CORES, RING_MODES

from emu.devices.rng import IOV_MAX, MAX_REQUEST, RngDevice
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.testing.rng import RngDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport


def counter_source():
    """Deterministic 'entropy': consecutive byte values, so tests can check order and length."""
    counter = itertools.count()

    def take(n: int) -> bytes:
        return bytes(next(counter) & 0xFF for _ in range(n))

    return take


@pytest.fixture
def open_rng(mem):
    made: list[tuple[VirtioMmioDriver, RngDevice]] = []

    def _open(source=None, *, mode=None, impl=None, queue_size=None, queue_max_size=None):
        dev = RngDevice(source, queue_max_size=queue_max_size)
        for q in dev.queues:
            q.impl = impl
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        made.append((drv, dev))
        return RngDriver.open(drv, queue_size=queue_size, **(mode or {})), dev

    yield _open
    for drv, dev in made:
        drv.reset()
        dev.close()


def test_device_id_features_and_no_config(open_rng):
    r, _ = open_rng()
    assert r.drv.transport.read(mmio_regs.DEVICE_ID, 4) == 4
    assert r.drv.features & 0xFFFFFF == 0  # bits 0-23 are device-type bits: rng has none
    ring_bits = 1 << F_VERSION_1 | 1 << F_INDIRECT_DESC | 1 << F_EVENT_IDX
    assert r.drv.features & ring_bits == ring_bits
    assert r.drv.config_read(0, 4) == 0


@pytest.mark.parametrize("impl", RING_CORES)
@pytest.mark.parametrize("mode", RING_MODES)
def test_fills_buffers_from_the_source(open_rng, mode, impl):
    r, _ = open_rng(counter_source(), mode=mode, impl=impl, queue_size=8)
    assert bool(r.drv.features >> F_RING_PACKED & 1) == mode["packed"]
    expect = 0
    for n in (1, 16, 300, 4096) * 6:  # 24 requests on an 8-entry ring
        got = r.read(n)
        assert got == bytes((expect + k) & 0xFF for k in range(n))
        expect += n


def test_default_source_is_os_urandom(open_rng):
    r, _ = open_rng()
    a, b = r.read(64), r.read(64)
    assert len(a) == len(b) == 64 and a != b


def test_file_source(open_rng, tmp_path: Path):
    src = tmp_path / "entropy"
    src.write_bytes(bytes(range(256)) * 4)
    r, _ = open_rng(src)
    assert r.read(100) == bytes(range(100))
    assert r.read(200) == bytes(range(100, 256)) + bytes(range(44))


def test_dev_urandom(open_rng):
    r, _ = open_rng("/dev/urandom")
    assert len(r.read(1000)) == 1000


def test_multi_segment_chain_and_per_request_cap(open_rng):
    r, _ = open_rng(counter_source())
    drv = r.drv
    drv.submit(0, [], [3, 5, 7])
    (c,) = drv.wait(0)
    assert c.length == 15 and c.data == bytes(range(15))
    drv.submit(0, [], [MAX_REQUEST, 100])  # more than one request may take
    (c,) = drv.wait(0)
    assert c.length == MAX_REQUEST
    assert c.data[MAX_REQUEST:] == bytes(100)  # the device left the rest alone


def test_many_requests_in_flight(open_rng):
    r, _ = open_rng(counter_source(), queue_size=64)
    tokens = [r.drv.submit(0, [], [32]) for _ in range(64)]
    done = r.drv.wait(0, count=64)
    assert sorted(c.token for c in done) == sorted(tokens)
    assert all(c.length == 32 for c in done)
    assert b"".join(c.data for c in sorted(done, key=lambda c: c.token)) == bytes(
        k & 0xFF for k in range(64 * 32)
    )


def test_short_source_gives_short_used_length(open_rng):
    r, _ = open_rng(lambda n: b"\x07" * min(n, 10))
    r.drv.submit(0, [], [100])
    (c,) = r.drv.wait(0)
    assert c.length == 10 and c.data[:10] == b"\x07" * 10 and c.data[10:] == bytes(90)


@pytest.mark.parametrize("mode", RING_MODES)
def test_readable_buffer_needs_reset_and_device_recovers(open_rng, mode):
    r, dev = open_rng(counter_source(), mode=mode)
    r.drv.submit(0, [b"not for an rng"], [16])
    with pytest.raises(DeviceNeedsReset):
        r.drv.wait(0, timeout=2)
    assert r.drv.status & mmio_regs.S_DEVICE_NEEDS_RESET and dev.broken
    again = RngDriver.open(r.drv, **mode)
    assert len(again.read(8)) == 8


def test_dry_source_needs_reset(open_rng, tmp_path: Path):
    src = tmp_path / "entropy"
    src.write_bytes(b"abc")
    r, _ = open_rng(src)
    assert r.read(10) == b"abc"
    r.drv.submit(0, [], [10])
    with pytest.raises(DeviceNeedsReset):
        r.drv.wait(0, timeout=2)


def test_empty_buffer_completes_with_nothing(open_rng):
    r, _ = open_rng(counter_source())
    r.drv.submit(0, [], [0])
    (c,) = r.drv.wait(0)
    assert c.length == 0
    assert r.read(4) == bytes(range(4))  # no byte of the source was spent on it


def test_only_iov_max_segments_are_filled(open_rng):
    # a chain may be as long as the queue: make it longer than one readv takes
    r, _ = open_rng(counter_source(), queue_max_size=2048, mode=dict(indirect=True))
    r.drv.submit(0, [], [1] * (IOV_MAX + 50))
    (c,) = r.drv.wait(0)
    assert c.length == IOV_MAX and c.data[:IOV_MAX] == bytes(k & 0xFF for k in range(IOV_MAX))


def test_failing_source_needs_reset(open_rng):
    def broken(n: int) -> bytes:
        raise OSError(errno.EIO, "hwrng gone")

    r, _ = open_rng(broken)
    r.drv.submit(0, [], [8])
    with pytest.raises(DeviceNeedsReset):
        r.drv.wait(0, timeout=2)
