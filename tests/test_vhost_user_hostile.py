"""A hostile or broken frontend: each mistake is refused or closes the connection, the
server stays up and serves the next frontend, and nothing outside shared memory is touched."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emu.devices.blk import BlkDevice
from emu.testing.blk import BlkDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.frontend import UVA_OFFSET, FrontendError
from emu.vhost_user.protocol import (
    HEADER,
    MEM_TABLE_HEAD,
    U64,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    Message,
    Req,
    recv_message,
    send_message,
)

ACK = 1 | 1 << 3  # version 1 + need_reply
PATTERN = bytes(range(256)) * 16


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
    # whatever happened, a well-behaved frontend is served afterwards
    fe = VhostUserDriver(srv.path)
    try:
        blk = BlkDriver.open(fe)
        assert blk.write(1, PATTERN) == 0
        assert blk.read(1, 8) == PATTERN
    finally:
        fe.close()
        srv.close()
        dev.close()


def raw(srv: VhostUserServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    return s


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    if not select.select([s], [], [], timeout)[0]:
        return False
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def ack(s: socket.socket) -> int:
    m = recv_message(s)
    assert m.flags == 5 and len(m.payload) == 8
    return U64.unpack(m.payload)[0]


def send(
    s: socket.socket, req: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1
) -> None:
    send_message(s, Message(req, flags, payload, fds or []))


def memfd(size: int) -> int:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    return fd


def region(gpa: int, size: int, uva: int, off: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, off)


# -- framing --


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(HEADER.pack(Req.GET_FEATURES, 2, 0), id="version-2"),
        pytest.param(HEADER.pack(Req.SET_FEATURES, 1, 1 << 20), id="huge-size"),
        pytest.param(HEADER.pack(99, 1, 0), id="unknown-request"),
        pytest.param(HEADER.pack(Req.SET_LOG_BASE, 1, 16) + bytes(16), id="not-offered"),
        pytest.param(HEADER.pack(Req.SET_FEATURES, 1, 4) + bytes(4), id="short-u64"),
        pytest.param(HEADER.pack(Req.GET_FEATURES, 1, 8) + bytes(8), id="payload-on-get"),
        pytest.param(HEADER.pack(Req.SET_VRING_ADDR, 1, 8) + bytes(8), id="short-addr"),
        pytest.param(
            HEADER.pack(Req.GET_CONFIG, 1, 12) + struct.pack("<III", 0, 8, 0),
            id="config-size-mismatch",
        ),
        pytest.param(
            HEADER.pack(Req.GET_CONFIG, 1, 12 + 300) + struct.pack("<III", 0, 300, 0) + bytes(300),
            id="config-too-big",
        ),
        pytest.param(
            HEADER.pack(Req.SET_VRING_NUM, 1, 8) + VRING_STATE.pack(7, 8), id="vring-index"
        ),
        pytest.param(HEADER.pack(Req.SET_VRING_KICK, 1, 8) + U64.pack(0), id="kick-no-fd"),
        pytest.param(HEADER.pack(Req.SET_VRING_CALL, 1, 8) + U64.pack(1 << 20), id="reserved"),
    ],
)
def test_malformed_message_closes_the_connection(server: VhostUserServer, data: bytes) -> None:
    s = raw(server)
    s.sendall(data)
    assert closed_by_peer(s)


@pytest.mark.parametrize("cut", [5, 12, 20])
def test_truncated_message_then_disconnect(server: VhostUserServer, cut: int) -> None:
    s = raw(server)
    s.sendall((HEADER.pack(Req.SET_VRING_ADDR, 1, 40) + bytes(40))[:cut])
    s.close()


def test_too_many_fds(server: VhostUserServer) -> None:
    s = raw(server)
    fds = [os.eventfd(0) for _ in range(12)]
    send(s, Req.SET_VRING_CALL, U64.pack(0), fds)
    assert closed_by_peer(s)
    for fd in fds:
        os.close(fd)


# -- fds of the wrong kind --


@pytest.mark.parametrize("req", [Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR])
def test_vring_fd_of_the_wrong_kind_is_refused(server: VhostUserServer, req: Req) -> None:
    s = raw(server)
    fd = memfd(4096)
    send(s, req, U64.pack(0), [fd], ACK)
    assert ack(s) == 1
    send(s, req, U64.pack(0), [fd])  # without need_reply: the connection goes
    assert closed_by_peer(s)
    os.close(fd)


def test_kick_nofd_polling_is_refused(server: VhostUserServer) -> None:
    s = raw(server)
    send(s, Req.SET_VRING_KICK, U64.pack(VRING_NOFD), [], ACK)
    assert ack(s) == 1


# -- memory tables --


def _table(*regions: bytes) -> bytes:
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(regions)


@pytest.mark.parametrize(
    "regions, sizes",
    [
        pytest.param([region(0, 2 << 20, 0x1000_0000)], [1 << 20], id="beyond-file"),
        pytest.param([region(0, 1 << 20, 0x1000_0000, 1 << 20)], [1 << 20], id="offset-beyond"),
        pytest.param([region(0, 1 << 20, 0x1000_0000, 100)], [2 << 20], id="offset-unaligned"),
        pytest.param([region(0, 0, 0x1000_0000)], [1 << 20], id="empty"),
        pytest.param([region(2**64 - 4096, 8192, 0)], [1 << 20], id="gpa-wraps"),
        pytest.param(
            [region(0, 1 << 20, 0), region(1 << 19, 1 << 20, 1 << 24)],
            [1 << 20, 1 << 20],
            id="gpa-overlap",
        ),
        pytest.param(
            [region(0, 1 << 20, 0), region(1 << 20, 1 << 20, 1 << 19)],
            [1 << 20, 1 << 20],
            id="uva-overlap",
        ),
    ],
)
def test_bad_memory_table_is_refused(
    server: VhostUserServer, regions: list[bytes], sizes: list[int]
) -> None:
    s = raw(server)
    fds = [memfd(n) for n in sizes]
    send(s, Req.SET_MEM_TABLE, _table(*regions), fds, ACK)
    assert ack(s) == 1
    for fd in fds:
        os.close(fd)


def test_memory_region_fd_that_cannot_be_mapped(server: VhostUserServer) -> None:
    s = raw(server)
    for fd in (os.eventfd(0), socket.socket().detach()):
        send(s, Req.ADD_MEM_REG, bytes(8) + region(0, 4096, 0), [fd], ACK)
        assert ack(s) == 1
        os.close(fd)


def test_memory_table_fd_count_mismatch(server: VhostUserServer) -> None:
    s = raw(server)
    fd = memfd(1 << 20)
    send(s, Req.SET_MEM_TABLE, _table(region(0, 4096, 0), region(8192, 4096, 8192)), [fd])
    assert closed_by_peer(s)
    os.close(fd)


# -- rings --


def _mapped(server: VhostUserServer) -> VhostUserDriver:
    fe = VhostUserDriver(server.path)
    fe.init()
    return fe


def test_vring_address_outside_the_table(server: VhostUserServer) -> None:
    fe = _mapped(server)
    bad = VRING_ADDR.pack(0, 0, 0x1000, 0x2000, 0x3000, 0)  # guest-physical, not uvas
    with pytest.raises(FrontendError):
        fe.request(Req.SET_VRING_ADDR, bad)
    end = UVA_OFFSET + fe.mem.size - 16  # inside, but the ring would run past the end
    fe.request(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256))
    fe.request(Req.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, end, end, end, 0))
    with pytest.raises(FrontendError):
        fe.start_ring(0)
    fe.close()


def test_vring_address_refused_without_ack_closes(server: VhostUserServer) -> None:
    fe = _mapped(server)
    fe.protocol = 0  # stop asking for acks
    fe.request(Req.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 1, 2, 3, 0))
    assert closed_by_peer(fe.sock)
    fe.close()


@pytest.mark.parametrize("num", [0, 3, 4096])
def test_bad_ring_size(server: VhostUserServer, num: int) -> None:
    """Zero, beyond the maximum, or not a power of 2 on a split ring: refused at once."""
    fe = _mapped(server)
    fe.setup_queue(0)
    with pytest.raises(FrontendError):
        fe.request(Req.SET_VRING_NUM, VRING_STATE.pack(0, num))
    fe.close()


def test_avail_index_jump_stops_the_device_and_writes_err(server: VhostUserServer) -> None:
    """README 5.6: a stale avail idx (0xffff ahead) must not be processed."""
    fe = _mapped(server)
    q = fe.setup_queue(0)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    fe.set_u64(Req.SET_VRING_ERR, 0, [err])
    fe.driver_ok()
    fe.mem.write_int(q.driver + 2, 2, 0xFFFF)
    fe.kick(0)
    assert select.select([err], [], [], 5)[0]
    assert fe.get_u64(Req.GET_STATUS) & 0x40
    fe.close()
    os.close(err)


def test_disconnect_with_requests_in_flight(server: VhostUserServer) -> None:
    fe = _mapped(server)
    fe.setup_queue(0)
    fe.driver_ok()
    blk = BlkDriver(fe)
    for i in range(32):
        blk.submit(1, i, out=PATTERN)  # T_OUT, no wait
    fe.close()


def test_frontend_vanishes_mid_message_with_fds(server: VhostUserServer) -> None:
    s = raw(server)
    fd = memfd(1 << 20)
    data = HEADER.pack(Req.SET_MEM_TABLE, 1, 40) + MEM_TABLE_HEAD.pack(1, 0)
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    s.close()
    os.close(fd)


def test_hostile_inflight_region(server: VhostUserServer) -> None:
    fe = _mapped(server)
    fd = memfd(4096)
    payload = struct.pack("<QQHH4x", 4096, 0, 1, 128)  # not the layout emu handed out
    with pytest.raises(FrontendError):
        fe.request(Req.SET_INFLIGHT_FD, payload, [fd])
    os.close(fd)
    fe.close()
