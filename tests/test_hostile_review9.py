"""Hostile review of issue 9 (native blk plane, io_uring / NBD engines, stops with real
I/O outstanding): each test shows one defect found by attacking the feature as a hostile
guest, frontend or NBD server would."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from emu.devices.blk import F_RO, S_OK, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.testing.blk import BlkDriver
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import attached
from emu.testing.nbdkit import Nbdkit, nbdkit_missing
from emu.transport.mmio import MmioTransport

pytestmark = pytest.mark.skipif(nbdkit_missing() is not None, reason=str(nbdkit_missing()))

#: how long a lifecycle call may take against a backend that went silent: a bound far
#: above any real stop, far below forever
BOUND_S = 10.0


def _nbdkit(tmp_path: Path, size: str = "64M", **kw) -> Nbdkit:
    return Nbdkit(tmp_path / "nbd.sock", ["memory", size], **kw).start()


def test_reset_with_a_write_at_a_silent_nbd_server_returns(tmp_path: Path) -> None:
    """A write is outstanding at an NBD server that stops answering (SIGSTOP: a hung
    server, a network partition without a reset). The report stop never gets past
    STOPPING (the write fence waits for the server forever) and the device reset that
    follows blocks the device thread without bound in ``BlkPlane.drop`` ->
    ``NbdEngine.fence`` (a pthread_cond_wait with no timeout). So do close(), a queue stop
    and the vhost-user GET_VRING_BASE / SET_MEM_TABLE that stop rings the same way."""
    srv = _nbdkit(tmp_path)
    dev = BlkDevice(srv.uri, plane="native")
    dev.policy = "report"
    try:
        with attached(dev) as drv:
            blk = BlkDriver.open(drv)
            assert blk.write(0, b"a" * 512) == S_OK
            srv.freeze()
            blk.submit(T_OUT, 8, b"b" * 512)
            for _ in range(500):  # until the write is at the (silent) server
                if dev.engines[0].outstanding:
                    break
                time.sleep(0.01)
            assert dev.engines[0].outstanding == 1
            dev.request_stop("report")
            dev.wait_stopped(1.0)
            resetter = threading.Thread(target=dev.reset, daemon=True)
            resetter.start()
            resetter.join(BOUND_S)
            hung = resetter.is_alive()
            srv.thaw()  # let the stuck thread end
            resetter.join(BOUND_S)
            assert not hung, "device reset hangs while an NBD server holds a write"
    finally:
        srv.thaw()
        srv.stop()


def test_nbd_engine_close_while_reconnecting_to_a_tarpit_returns(tmp_path: Path) -> None:
    """The NBD server dies; in its place something accepts connections and never speaks
    (a half-dead server, a proxy whose backend is gone). The engine's worker reconnects
    with the blocking ``nbd_connect_uri`` and sits in it; ``close`` joins the worker and
    so hangs without bound (BlkDevice.close, ``emu serve`` shutdown with it)."""
    from emu.backends._nbd import NbdEngine

    srv = _nbdkit(tmp_path)
    engine = NbdEngine(srv.uri, depth=4)
    srv.kill()
    tarpit = socket.socket(socket.AF_UNIX)
    try:
        srv.socket.unlink(missing_ok=True)
        tarpit.bind(str(srv.socket))
        tarpit.listen(8)
        accepted = threading.Event()
        held: list = []

        def accept() -> None:
            held.append(tarpit.accept())
            accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        # the loss is noticed, a submit asks for a reconnect, the worker connects
        for _ in range(50):
            engine.submit_py(0, 1, [bytearray(512)], 0)
            engine.kick_py()
            if accepted.wait(0.1):
                break
        assert accepted.is_set(), "the worker never tried to reconnect"
        closer = threading.Thread(target=engine.close, daemon=True)
        closer.start()
        closer.join(BOUND_S)
        hung = closer.is_alive()
        for conn, _ in held:
            conn.close()  # the connect fails now: the worker (and close) can end
        closer.join(BOUND_S)
        assert not hung, "NbdEngine.close hangs while its worker connects to a silent server"
    finally:
        tarpit.close()


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_large_valid_request_on_nbd_is_served(tmp_path: Path, plane: str) -> None:
    """The device offers seg_max 254 x size_max 1 MiB, so a 65 MiB read is a valid request
    (a Linux guest issues such with max_sectors_kb raised; a file backend serves it).
    On NBD it gets IOERR: libnbd refuses any command over 64 MiB (ERANGE) and the engine
    hands the request over whole instead of splitting it."""
    srv = _nbdkit(tmp_path, "128M")
    mem = GuestMemory.create(160 << 20)
    dev = BlkDevice(srv.uri, plane=plane)
    try:
        blk = BlkDriver.open(VirtioMmioDriver(MmioTransport(dev, mem), mem))
        status, _ = blk.request(T_IN, 0, in_size=65 << 20)
        assert status == S_OK
    finally:
        dev.close()
        mem.close()
        srv.stop()


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_read_only_nbd_export_makes_a_read_only_device(tmp_path: Path, plane: str) -> None:
    """``blk:nbd://...`` (no :ro) on an export the server offers read-only: the engine knows
    it is read-only, but the device offers no VIRTIO_BLK_F_RO, so the guest mounts the disk
    writable and every write fails with IOERR (and an error line) instead of the guest
    knowing up front, as it does for ``:ro``."""
    srv = _nbdkit(tmp_path, readonly=True)
    try:
        dev = BlkDevice(srv.uri, plane=plane)
        with attached(dev):
            assert dev.readonly
            assert dev.features >> F_RO & 1
    finally:
        srv.stop()


def test_a_write_whose_connection_died_is_not_counted_as_fenced(tmp_path: Path) -> None:
    """The write fence ends on a lost connection: libnbd answers the write EIO, the plane
    counts it as fenced and the report stop says STOPPED. But the server may still apply
    it: here nbdkit dies while its plugin (a shell script) is writing A; the script lives
    on. The destination resubmits, the guest overwrites with B (written straight to the
    image here), then the stale A lands: the disk loses the newer data, the very thing the
    fence exists to prevent (docs/stop.md). Nothing can recall it, so the stop must not
    claim a clean fence: the device should not report STOPPED (e.g. go to needs-reset, or
    fail the stop) when a write's outcome is unknown. The disk check below shows the
    damage the current answer allows."""
    from emu.devices.base import RunState

    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    pwrite = f"sleep 1; dd of={img} oflag=seek_bytes seek=$4 conv=notrunc status=none"
    pread = f"dd if={img} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none"
    plugin = ["eval", "get_size=echo 1048576", f"pread={pread}", f"pwrite={pwrite}"]
    srv = Nbdkit(tmp_path / "nbd.sock", [*plugin, "can_write=exit 0"]).start()
    dev = BlkDevice(srv.uri, plane="native")
    dev.policy = "report"
    try:
        with attached(dev) as drv:
            blk = BlkDriver.open(drv)
            blk.submit(T_OUT, 0, b"A" * 512)
            for _ in range(500):
                if dev.engines[0].outstanding:
                    break
                time.sleep(0.01)
            assert dev.engines[0].outstanding == 1
            dev.request_stop("report")
            srv.kill()  # the plugin's script is already writing A, and goes on
            stopped = dev.wait_stopped(BOUND_S) and dev.run_state is RunState.STOPPED
            with open(img, "r+b") as f:
                f.write(b"B" * 512)  # the resubmitted write and the guest's newer one
            time.sleep(2.0)  # the orphaned script finishes
            on_disk = img.read_bytes()[:512]
            assert not stopped or on_disk == b"B" * 512, (
                "STOPPED with the write fence claimed, yet a stale write landed afterwards"
            )
    finally:
        srv.stop()
