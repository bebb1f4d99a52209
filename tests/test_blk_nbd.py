"""blk on NBD storage when the storage misbehaves: the server dies with requests
outstanding and comes back, the server answers some requests with errors, and a guest
queue far deeper than the engine.

Devices run in-process with the reference driver over virtio-mmio, on real nbdkit
servers (the ``nbd_server`` fixture). The rule under test (issue 9): every request gets a
status (IOERR where the storage failed it), nothing hangs or crashes, the log says what
happened, and the device serves again once the storage does, without a device reset.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from modes import BLK_PLANES, blk_native

from emu.devices.blk import S_IOERR, S_OK, SECTOR, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.testing.blk import BlkDriver, header, status_of
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

BLOCK = 4096
IMAGE = 1 << 20

Open = Callable[..., tuple[BlkDriver, BlkDevice]]


@pytest.fixture
def blk_on() -> Iterator[Open]:
    """``blk_on(uri, **BlkDevice kw)``: a device on ``uri`` driven over virtio-mmio."""
    made = []

    def _open(uri: str, *, packed: bool = False, queue_size: int | None = None, **kw):
        mem = GuestMemory.create(16 << 20)
        dev = BlkDevice(uri, **kw)
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        made.append((drv, dev, mem))
        return BlkDriver.open(drv, packed=packed, queue_size=queue_size), dev

    yield _open
    for drv, dev, mem in made:
        drv.reset()
        dev.close()
        mem.close()


def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE))
    return path


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10.0) -> str:
    """The first log line containing ``text`` (the NBD worker logs from its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        for r in caplog.records:
            if text in r.getMessage():
                return r.getMessage()
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.01)


@pytest.mark.parametrize("plane", BLK_PLANES)
def test_server_killed_with_requests_outstanding_then_back(
    nbd_server, blk_on, tmp_path, caplog, plane
):
    """nbdkit dies while reads and writes wait at its delay filter: each request gets
    IOERR, one log line says the connection was lost; restarted on the same socket, the
    same device (no reset) serves again with the right data."""
    caplog.set_level(logging.INFO)
    disk = image(tmp_path)
    before = disk.read_bytes()
    srv = nbd_server(
        ["file", f"file={disk}"], filters=["delay"], params=["rdelay=400ms", "wdelay=400ms"]
    )
    b, dev = blk_on(srv.uri, plane=plane, iodepth=8)  # native: 16 at the server, 8 backlogged
    q = b.drv.queues[0]
    for i in range(16):
        q.add([header(T_IN, 8 * i)], [BLOCK, 1])
    for i in range(16, 24):
        q.add([header(T_OUT, 8 * i), os.urandom(BLOCK)], [1])
    b.drv.kick(0)
    time.sleep(0.1)  # the first requests are at the server now
    srv.kill()
    done = b.drv.wait(0, count=24, timeout=20)
    # the python plane runs one at a time: those after the loss fail at once, also IOERR
    assert [status_of(c) for c in done] == [S_IOERR] * 24
    wait_for_log(caplog, "connection lost")
    # the device's own line: the request at the server has no answer (fate unknown)
    assert "Transport endpoint is not connected" in wait_for_log(caplog, "blk: ")
    assert disk.read_bytes() == before  # the delayed writes never happened
    srv.start()
    deadline = time.monotonic() + 15
    while True:  # the engine reconnects when asked, at most once a second
        status, data = b.request(T_IN, 8, in_size=BLOCK)
        if status == S_OK:
            break
        assert status == S_IOERR and time.monotonic() < deadline, "the device did not recover"
        time.sleep(0.1)
    assert data == before[8 * SECTOR : 8 * SECTOR + BLOCK]
    wait_for_log(caplog, "reconnected")
    new = os.urandom(BLOCK)
    assert b.write(64, new) == S_OK and b.flush() == S_OK
    assert b.read(64, BLOCK // SECTOR) == new
    assert disk.read_bytes()[64 * SECTOR : 64 * SECTOR + BLOCK] == new


@pytest.mark.parametrize("plane", BLK_PLANES)
def test_failing_reads_are_ioerr_and_writes_still_work(nbd_server, blk_on, tmp_path, plane):
    """nbdkit's error filter fails every read while its trigger file exists: those get
    IOERR, the writes in the same batch are fine; without the trigger, reads work."""
    disk = image(tmp_path)
    trigger = tmp_path / "fail-reads"
    trigger.touch()
    srv = nbd_server(
        ["file", f"file={disk}"],
        filters=["error"],
        params=["error-pread-rate=1", f"error-pread-file={trigger}"],
    )
    b, _ = blk_on(srv.uri, plane=plane)
    q = b.drv.queues[0]
    data = {8 * i: os.urandom(BLOCK) for i in range(16)}
    reads = {q.add([header(T_IN, 8 * i + 256)], [BLOCK, 1]) for i in range(16)}
    writes = {q.add([header(T_OUT, s), d], [1]) for s, d in data.items()}
    b.drv.kick(0)
    done = {c.token: status_of(c) for c in b.drv.wait(0, count=32)}
    assert {done[t] for t in reads} == {S_IOERR} and {done[t] for t in writes} == {S_OK}
    image_now = disk.read_bytes()
    assert all(image_now[s * SECTOR : s * SECTOR + BLOCK] == d for s, d in data.items())
    trigger.unlink()
    assert all(b.read(s, BLOCK // SECTOR) == d for s, d in data.items())


@pytest.mark.parametrize("error", ["EIO", "ESHUTDOWN"])
def test_random_server_errors_each_get_a_status(nbd_server, blk_on, tmp_path, error):
    """Every request fails with some probability, with EIO or with ESHUTDOWN (what a
    server says while it shuts down, on a connection that stays up): each request gets
    OK or IOERR, the reads that are OK read the right data, and once the server stops
    failing requests every request is OK again."""
    disk = image(tmp_path)
    before = disk.read_bytes()
    trigger = tmp_path / "fail"
    trigger.touch()
    srv = nbd_server(
        ["file", f"file={disk}"],
        filters=["error"],
        params=[f"error={error}", "error-rate=0.3", f"error-file={trigger}"],
    )
    b, _ = blk_on(srv.uri, plane="native", iodepth=8)
    q = b.drv.queues[0]
    for _ in range(4):
        tokens = {q.add([header(T_IN, 8 * i)], [BLOCK, 1]): 8 * i for i in range(64)}
        b.drv.kick(0)
        done = b.drv.wait(0, count=64)
        statuses = [status_of(c) for c in done]
        assert set(statuses) <= {S_OK, S_IOERR} and S_IOERR in statuses
        for c in done:
            s = tokens[c.token]
            if status_of(c) == S_OK:
                assert c.data[:-1] == before[s * SECTOR : s * SECTOR + BLOCK]
    trigger.unlink()
    for _ in range(20):
        status, data = b.request(T_IN, 8, in_size=BLOCK)
        assert status == S_OK and data == before[8 * SECTOR : 8 * SECTOR + BLOCK]


@pytest.mark.skipif(blk_native is None, reason="emu.devices._blkplane is not built")
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_queue_of_1024_on_an_engine_of_depth_4(nbd_server, blk_on, tmp_path, packed):
    """A guest fills a 1024-entry queue; the engine holds 4 at the server at a time (with
    a delay, so they really pile up): all 1024 complete, the data is right."""
    disk = image(tmp_path)
    srv = nbd_server(["file", f"file={disk}"], filters=["delay"], params=["wdelay=1ms"])
    b, dev = blk_on(
        srv.uri, plane="native", iodepth=4, packed=packed, queue_size=1024, queue_max_size=1024
    )
    assert b.drv.queues[0].size == 1024
    q = b.drv.queues[0]
    data = {}
    for i in range(1024):
        sector = 8 * (i % (IMAGE // BLOCK))
        data[sector] = os.urandom(
            BLOCK
        )  # writes of one sector are 256 apart: never at the engine together
        q.add([header(T_OUT, sector), data[sector]], [1])
    b.drv.kick(0)
    assert dev.engines[0].outstanding <= 4
    assert [status_of(c) for c in b.drv.wait(0, count=1024, timeout=60)] == [S_OK] * 1024
    got = disk.read_bytes()
    assert all(got[s * SECTOR : s * SECTOR + BLOCK] == d for s, d in data.items())


def test_spec_takes_nbd_uris_and_tells_qemu_the_queues(nbd_server, tmp_path):
    from emu.devices.blk import _parse_arg
    from emu.devices.registry import SpecError, make_devices
    from emu.guest.backends import guest_devices

    sock = "/run/n.sock"
    assert _parse_arg(f"nbd+unix:///?socket={sock}:ro:queues=2") == (
        f"nbd+unix:///?socket={sock}",
        True,
        2,
    )
    assert _parse_arg("nbd://127.0.0.1:10809/") == ("nbd://127.0.0.1:10809/", False, 1)
    assert _parse_arg("nbd://127.0.0.1:10809/x:queues=4") == ("nbd://127.0.0.1:10809/x", False, 4)
    for bad in ("nbd://h/:queues=0", "nbd://h/:queues=65536", ""):
        with pytest.raises(SpecError):
            _parse_arg(bad)
    srv = nbd_server(["memory", "1M"])
    (dev,) = make_devices([f"blk:{srv.uri}:queues=2,packed=off"])
    try:
        assert len(dev.queues) == 2 and len(dev.engines) == 2 and dev.capacity == 2048
    finally:
        dev.close()
    with pytest.raises(SpecError, match="cannot connect"):
        make_devices([f"blk:nbd+unix:///?socket={tmp_path / 'nobody.sock'}"])
    (multi, single) = guest_devices("microvm", [f"blk:{srv.uri}:queues=2", "blk:d.img"], ["a", "b"])
    assert "num-queues=2" in multi.options and not any("num-queues" in o for o in single.options)
    (uml,) = guest_devices("uml", [f"blk:{srv.uri}:queues=2"], ["a"])
    assert uml.options == ()
