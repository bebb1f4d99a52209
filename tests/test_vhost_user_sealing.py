"""A frontend that shrinks a file emu mapped would end ``emu serve`` with SIGBUS: emu seals
sealable files against shrinking before it maps them, refuses a dirty log or inflight
region that cannot be sealed, and maps unsealable guest RAM (UML's) as before."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from modes import wait_until

from emu.devices.blk import BlkDevice
from emu.testing.blk import BlkDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.frontend import FrontendError
from emu.vhost_user.protocol import INFLIGHT, ProtocolError, Req

PATTERN = bytes(range(256)) * 16
LOG = struct.Struct("<QQ")  # SET_LOG_BASE: size, offset


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


@pytest.fixture
def server(disk: Path, tmp_path: Path) -> Iterator[VhostUserServer]:
    dev = BlkDevice(disk)
    srv = VhostUserServer(dev, tmp_path / "blk.sock").start()
    yield srv
    srv.close()
    dev.close()


@contextmanager
def emu_serve(sock: Path, disk: Path) -> Iterator[subprocess.Popen]:
    """``emu serve`` in a process of its own: a SIGBUS there fails the test, not pytest."""
    cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), f"blk:{disk}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None)
        assert proc.poll() is None
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def seals(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def memfd(size: int, sealable: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("emu-seal-test", flags)
    os.ftruncate(fd, size)
    return fd


# -- guest RAM --


@pytest.mark.parametrize("add_mem_reg", [True, False], ids=["add-mem-reg", "mem-table"])
def test_guest_ram_is_sealed_and_emu_serve_survives_a_shrink(
    disk: Path, tmp_path: Path, add_mem_reg: bool
) -> None:
    sock = tmp_path / "blk.sock"
    with emu_serve(sock, disk) as proc:
        fe = VhostUserDriver(sock, add_mem_reg=add_mem_reg)
        try:
            blk = BlkDriver.open(fe)
            assert blk.write(1, PATTERN) == 0
            ram = fe.mem.regions[0].fd
            assert seals(ram) & fcntl.F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(ram, 4096)  # the frontend turns hostile
            assert blk.read(1, 8) == PATTERN
            assert proc.poll() is None
        finally:
            fe.close()


def test_guest_ram_already_sealed_by_the_frontend(server: VhostUserServer) -> None:
    """QEMU's memory-backend-memfd: GROW|SHRINK|SEAL before emu sees it; no seal to add."""
    fe = VhostUserDriver(server.path)
    try:
        fcntl.fcntl(fe.mem.regions[0].fd, fcntl.F_ADD_SEALS, 0b111)
        blk = BlkDriver.open(fe)
        assert blk.write(1, PATTERN) == 0 and blk.read(1, 8) == PATTERN
    finally:
        fe.close()


def test_unsealable_guest_ram_is_still_served(server: VhostUserServer, tmp_path: Path) -> None:
    """UML's RAM is a plain file, which takes no seal: it is mapped all the same."""
    fe = VhostUserDriver(server.path, ram=tmp_path / "ram")
    try:
        with pytest.raises(OSError):
            seals(fe.mem.regions[0].fd)
        blk = BlkDriver.open(fe)
        assert blk.write(1, PATTERN) == 0 and blk.read(1, 8) == PATTERN
    finally:
        fe.close()


# -- the dirty log --


def test_dirty_log_is_sealed(server: VhostUserServer) -> None:
    fe = VhostUserDriver(server.path)
    fd = memfd(4096)
    try:
        fe.init()
        fe.request(Req.SET_LOG_BASE, LOG.pack(4096, 0), [fd])
        assert seals(fd) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert fe.get_u64(Req.GET_QUEUE_NUM) == 1
    finally:
        os.close(fd)
        fe.close()


@pytest.mark.parametrize("kind", ["memfd-unsealable", "file"])
def test_unsealable_dirty_log_is_refused(
    server: VhostUserServer, tmp_path: Path, kind: str
) -> None:
    fe = VhostUserDriver(server.path)
    if kind == "file":
        (tmp_path / "log").write_bytes(bytes(4096))
        fd = os.open(tmp_path / "log", os.O_RDWR)
    else:
        fd = memfd(4096, sealable=False)
    try:
        fe.init()
        with pytest.raises((ConnectionError, ProtocolError)):  # it has a reply of its own
            fe.request(Req.SET_LOG_BASE, LOG.pack(4096, 0), [fd])
    finally:
        os.close(fd)
        fe.close()
    fe = VhostUserDriver(server.path)
    try:
        assert BlkDriver.open(fe).write(0, PATTERN) == 0
    finally:
        fe.close()


# -- the inflight region --


def test_emus_inflight_region_is_sealed(server: VhostUserServer) -> None:
    fe = VhostUserDriver(server.path, inflight=True)
    try:
        fe.init()
        assert fe.inflight_fd >= 0
        s = seals(fe.inflight_fd)
        assert s & fcntl.F_SEAL_SHRINK and s & fcntl.F_SEAL_GROW and s & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(fe.inflight_fd, 0)
    finally:
        fe.close()


@pytest.mark.parametrize("sealable", [True, False], ids=["sealable", "unsealable"])
def test_frontend_inflight_region(server: VhostUserServer, sealable: bool) -> None:
    """A region of the frontend's own (another backend's, before a reconnect) is sealed if
    it can be and refused if it cannot."""
    fe = VhostUserDriver(server.path, inflight=True)
    fe.init()
    size = INFLIGHT.unpack(fe.inflight_payload)[0]
    fd = memfd(size, sealable)
    try:
        if sealable:
            fe.request(Req.SET_INFLIGHT_FD, fe.inflight_payload, [fd])
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
        else:
            with pytest.raises(FrontendError):
                fe.request(Req.SET_INFLIGHT_FD, fe.inflight_payload, [fd])
        blk = BlkDriver(fe)
        fe.setup_queue(0)
        fe.driver_ok()
        assert blk.write(1, PATTERN) == 0 and blk.read(1, 8) == PATTERN
    finally:
        os.close(fd)
        fe.close()
