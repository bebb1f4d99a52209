"""Hostile review of issue 9's blk native device loop (``_loop.serve_parked``), the
tmpfs reads and writes done in the io_uring engine's ``submit``, and the split inflight
area's writes in C (``_split_inflight.SplitArea``).

The first tests are defects found in review (each failed before its fix); the rest are
attacks that found nothing, kept because they can fail: a borrowed report stop while the
device thread waits in the native loop, a short read of a truncated tmpfs image, a
hostile chain served in the loop, a stop racing a kick, kick fds swapped while the loop
waits, and the inflight region closed after a run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emu.devices.base import RunState
from emu.devices.blk import S_IOERR, S_OK, SECTOR, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory, GuestMemoryError
from emu.testing.blk import BlkDriver, status_of
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.testing.inprocess import attached
from emu.testing.vhost_user import VhostUserDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.inflight import SPLIT_DESC, SPLIT_HEAD, InflightRegion
from emu.vhost_user.protocol import INFLIGHT

_uring = pytest.importorskip("emu.backends._uring")
_blkplane = pytest.importorskip("emu.devices._blkplane")
_loop = pytest.importorskip("emu.devices._loop")

TMPFS_MAGIC = 0x01021994
SHM = Path("/dev/shm")
BLOCK = 4096


def fs_type(path: str) -> int | None:
    """statfs(2)'s f_type of ``path`` (the first field of struct statfs on Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(512)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return struct.unpack_from("l", buf.raw)[0]


@pytest.fixture
def shm_image(tmp_path: Path):
    """A 1 MiB image on tmpfs (the engine then reads and writes in ``submit``)."""
    if not SHM.is_dir() or fs_type(str(SHM)) != TMPFS_MAGIC:
        pytest.skip("no tmpfs at /dev/shm")
    path = SHM / f"emu-review-loop-{os.getpid()}-{tmp_path.name}.img"
    path.write_bytes(bytes(range(256)) * (4 << 10))
    yield path
    path.unlink(missing_ok=True)


# -- defects --


def test_a_device_node_on_tmpfs_is_not_read_in_submit() -> None:
    """The engine did a file's reads and writes inside ``submit`` when fstatfs said
    tmpfs; but /dev is a tmpfs (devtmpfs reports the same magic), so a host block
    device given as the disk (/dev/nvme0n1, /dev/nbd0, an iSCSI LUN) had its real I/O
    done synchronously on the device thread, which then blocked in ``submit`` for as
    long as the disk took (a report stop could cancel nothing). Only a regular file
    on tmpfs may take that path. /dev/zero stands in for the block device here: its node
    sits on the same file system and ``open`` takes it like one (lseek finds its end)."""
    if fs_type("/dev/zero") != TMPFS_MAGIC:
        pytest.skip("/dev is not a tmpfs here: the defect cannot show")
    engine = _uring.UringEngine("/dev/zero", readonly=True, depth=4)
    try:
        assert not engine.sync_rw, "a device node was taken for a tmpfs file"
    finally:
        engine.close()


def test_a_regular_tmpfs_file_is_still_read_in_submit(shm_image: Path) -> None:
    """The fix above keeps what the change was for (the control of the test above)."""
    engine = _uring.UringEngine(shm_image, depth=4)
    try:
        assert engine.sync_rw
    finally:
        engine.close()


def test_inflight_counter_at_its_limit_is_refused_not_an_internal_error() -> None:
    """The region is the frontend's memory: a reconnecting frontend (hostile, or one whose
    memory was scribbled on) hands back an in-flight head whose counter is 2**64 - 1.
    ``recover`` set the next counter to 2**64, which SplitArea's C ``uint64_t`` refused
    with OverflowError: not one of the errors a vhost-user handler refuses a request
    with, so the session logged an internal error (emu's own bug) and dropped the
    connection. A region is refused with GuestMemoryError."""
    region = InflightRegion.create(1, 8, False)
    try:
        q = region.queues[0]
        SPLIT_HEAD.pack_into(q.area, 0, 0, 1, 8, 0, 0)
        SPLIT_DESC.pack_into(q.area, SPLIT_HEAD.size + SPLIT_DESC.size * 3, 1, 0, 2**64 - 1)
        try:
            heads = q.recover(0)
        except GuestMemoryError:
            return
        assert heads == [3]
        q.fetched(type("B", (), {"heads": np.array([5], np.uint16)})())  # and it runs on
    finally:
        region.close()


def test_inflight_counter_at_its_limit_through_a_session(tmp_path: Path, caplog) -> None:
    """The same through a vhost-user session: the ring start is refused (or served), the
    server logs no internal error, and the next frontend is served."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    dev = BlkDevice(disk)
    srv = VhostUserServer(dev, tmp_path / "blk.sock").start()
    try:
        fe = VhostUserDriver(srv.path, inflight=True)
        get_inflight = fe._get_inflight

        def poked(*args, **kwargs) -> None:
            get_inflight(*args, **kwargs)
            size, offset, nq, queue_size = INFLIGHT.unpack(fe.inflight_payload)
            desc_num = max(queue_size, dev.queue_max_size)
            with mmap.mmap(fe.inflight_fd, size, offset=offset) as m:
                SPLIT_HEAD.pack_into(m, 0, 0, 1, desc_num, 0, 0)
                SPLIT_DESC.pack_into(m, SPLIT_HEAD.size + SPLIT_DESC.size * 3, 1, 0, 2**64 - 1)

        fe._get_inflight = poked
        with caplog.at_level(logging.WARNING):
            try:
                BlkDriver.open(fe)
            except Exception:  # refused: the frontend's own affair
                pass
            finally:
                fe.close()
            time.sleep(0.2)  # the server finishes with the connection
        internal = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
        assert internal == []
        fe = VhostUserDriver(srv.path)
        try:
            blk = BlkDriver.open(fe)
            assert blk.write(1, bytes(range(256)) * 16) == 0
            assert blk.read(1, 8) == bytes(range(256)) * 16
        finally:
            fe.close()
    finally:
        srv.close()
        dev.close()


# -- attacks that found nothing --


def test_borrowed_report_stop_while_parked_reports_the_loops_pops(nbd_server, tmp_path):
    """Reads the native loop popped and submitted are outstanding at a slow server when
    another thread stops the device with ``report`` (borrowing the parked thread's token:
    the stop is final inside the call). The in-flight list has every chain, in fetch
    order, with its segments; after resume each read completes once with the right
    data."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(range(256)) * 4096)
    uri = nbd_server(["file", f"file={img}"], filters=["delay"], params=["rdelay=300ms"]).uri
    mem = GuestMemory.create(8 << 20)
    dev = BlkDevice(uri, plane="native")
    try:
        tr = MmioTransport(dev, mem)
        blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
        q = dev.queues[0]
        sizes = [BLOCK + SECTOR * i for i in range(6)]
        tokens = [blk.submit(T_IN, 8 * i, in_size=n) for i, n in enumerate(sizes)]
        deadline = time.monotonic() + 5
        while q.deferred.count() < len(tokens):
            assert time.monotonic() < deadline, "the reads never reached the engine"
            time.sleep(0.001)
        stopper = threading.Thread(target=tr.vmm_stop, args=("report",))
        stopper.start()
        stopper.join(5)
        assert dev.run_state is RunState.STOPPED
        chains = q.inflight()
        assert [c.head for c in chains] == list(range(len(tokens)))
        assert [[s[1] for s in c.segments] for c in chains] == [[16, n, 1] for n in sizes]
        tr.vmm_resume()
        done = blk.drv.wait(0, len(tokens))
        assert sorted(c.token for c in done) == sorted(tokens)
        data = img.read_bytes()
        for c in done:
            i = tokens.index(c.token)
            assert status_of(c) == S_OK
            assert c.data[:-1] == data[8 * i * SECTOR : 8 * i * SECTOR + sizes[i]]
        assert not blk.drv.sleep(0, 0.1), "a read completed twice"
    finally:
        dev.close()
        mem.close()


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_truncated_image_short_read_is_an_error(where, shm_image: Path, tmp_path: Path):
    """The image shrinks under the device: a read the file now ends inside of comes back
    IOERR, not OK with what the buffer held before, on tmpfs (preadv2 in ``submit``) as
    on a disk file (io_uring)."""
    path = shm_image if where == "tmpfs" else tmp_path / "d.img"
    if where == "disk":
        path.write_bytes(shm_image.read_bytes())
    dev = BlkDevice(path, plane="native")
    assert dev.engines[0].sync_rw == (where == "tmpfs")
    with attached(dev) as drv:
        blk = BlkDriver.open(drv)
        os.truncate(path, BLOCK + SECTOR)
        assert blk.request(T_IN, 0, in_size=BLOCK)[0] == S_OK
        assert blk.request(T_IN, 8, in_size=BLOCK)[0] == S_IOERR  # short
        assert blk.request(T_IN, 16, in_size=BLOCK)[0] == S_IOERR  # past the end
        assert blk.write(16, b"\x5a" * BLOCK) == S_OK  # a write grows it again
        assert blk.read(16, 8) == b"\x5a" * BLOCK


def test_hostile_chain_in_the_loop_fails_the_device_and_the_thread_lives(shm_image: Path):
    """A chain whose data buffer lies outside guest RAM, served by the native loop: the
    device asks for a reset (it does not crash or hang the device thread), and after the
    reset it serves again."""
    dev = BlkDevice(shm_image, plane="native")
    with attached(dev) as drv:
        blk = BlkDriver.open(drv)
        assert blk.read(0, 8) == bytes(range(256)) * 16
        dq = drv.queues[0]
        hdr = dq.alloc.alloc(16, 16)
        status = dq.alloc.alloc(16, 16)
        drv.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        outside = drv.mem.size + (1 << 20)  # beyond guest RAM
        dq.add_segments([(hdr, 16, False), (outside, BLOCK, True), (status, 1, True)])
        drv.kick(0)
        with pytest.raises((DeviceNeedsReset, TimeoutError)):
            drv.wait(0, 1, timeout=5)
        assert dev.run_state is RunState.BROKEN
        assert dev._thread.is_alive()
        blk = BlkDriver.open(drv)
        assert blk.read(0, 8) == bytes(range(256)) * 16


def test_stop_racing_kicks_in_the_loop_loses_nothing(shm_image: Path) -> None:
    """Writes kicked while another thread stops and resumes the device over and over:
    each completes exactly once and lands, whichever loop (native, Python, a borrowed
    stop) happened to see its kick."""
    dev = BlkDevice(shm_image, plane="native")
    mem = GuestMemory.create(8 << 20)
    try:
        tr = MmioTransport(dev, mem)
        blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
        done = threading.Event()
        errors: list[BaseException] = []

        def flap() -> None:
            try:
                while not done.is_set():
                    tr.vmm_stop("report", timeout=5)
                    tr.vmm_resume()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=flap)
        t.start()
        try:
            for round_ in range(60):
                tokens = [
                    blk.submit(T_OUT, 8 * i, bytes([round_, i]) * (BLOCK // 2)) for i in range(8)
                ]
                got = blk.drv.wait(0, len(tokens))
                assert sorted(c.token for c in got) == sorted(tokens)
                assert {status_of(c) for c in got} == {S_OK}
        finally:
            done.set()
            t.join(10)
        assert errors == []
        time.sleep(0.1)  # (an interrupt may still be pending: used entries are what count)
        assert blk.drv.queues[0].poll() == [], "a write completed twice"
        data = shm_image.read_bytes()
        for i in range(8):
            assert data[8 * i * SECTOR : 8 * i * SECTOR + BLOCK] == bytes([59, i]) * (BLOCK // 2)
    finally:
        dev.close()
        mem.close()


def test_inflight_region_closes_after_a_run() -> None:
    """SplitArea holds a buffer on the mapping: the region's close still unmaps (no
    BufferError), and the area refuses use afterwards instead of writing freed memory."""
    region = InflightRegion.create(2, 16, False)
    q = region.queues[0]
    q.recover(0)

    class B:
        heads = np.array([1, 2, 3], np.uint16)

    q.fetched(B)
    q.using(B.heads)
    q.used(B.heads)
    region.close()
    with pytest.raises(ValueError):
        q.used(B.heads)


def test_kick_fds_swapped_while_the_loop_waits(shm_image: Path, tmp_path: Path) -> None:
    """SET_VRING_KICK on running rings, both queues, again and again (old fds closed, so
    their numbers come back for the new ones): the native loop builds its fd map afresh
    each time it parks, so every kick on a new fd is served, by the right queue."""
    from emu.vhost_user.protocol import Req

    entered = []
    real = _loop.serve_parked

    def counting(*args):
        entered.append(1)
        return real(*args)

    dev = BlkDevice(shm_image, num_queues=2, plane="native")
    srv = VhostUserServer(dev, tmp_path / "blk.sock").start()
    fe = VhostUserDriver(srv.path)
    try:
        _loop.serve_parked = counting
        blk = BlkDriver.open(fe)
        block = bytes(range(256)) * 16
        for r in range(16):
            for qi in (0, 1):
                new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                fe.set_u64(Req.SET_VRING_KICK, qi, [new])
                old, fe._kicks[qi] = fe._kicks[qi], new
                os.close(old)
            for qi in (0, 1):
                assert blk.read(8 * (r % 8), 8, qidx=qi) == block, (r, qi)
        assert entered, "the device thread never waited in the native loop"
    finally:
        _loop.serve_parked = real
        fe.close()
        srv.close()
        dev.close()
