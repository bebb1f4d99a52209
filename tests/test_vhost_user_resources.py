"""File descriptors a vhost-user frontend hands emu: every one is closed whatever becomes of
its message, and the server keeps serving when a connection's cleanup runs out of fds."""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emu.devices.blk import BlkDevice
from emu.testing.blk import BlkDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.protocol import (
    INFLIGHT,
    MEM_TABLE_HEAD,
    PF,
    U64,
    Message,
    ProtocolError,
    Req,
    recv_message,
    send_message,
)

ACK = 1 | 1 << 3  # version 1 + need_reply
PATTERN = bytes(range(256)) * 16


@pytest.fixture
def tag() -> str:
    """A memfd name no other test uses, to find its fds in /proc/self/fd."""
    return f"emu-leak-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[VhostUserServer]:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    dev = BlkDevice(img)
    srv = VhostUserServer(dev, tmp_path / "blk.sock").start()
    yield srv
    srv.close()
    dev.close()


def served(srv: VhostUserServer, timeout: float = 5.0) -> bool:
    """A fresh frontend gets a block written and read back (within ``timeout``)."""
    fe = VhostUserDriver(srv.path)
    fe.sock.settimeout(timeout)
    try:
        blk = BlkDriver.open(fe)
        return blk.write(1, PATTERN) == 0 and blk.read(1, 8) == PATTERN
    except TimeoutError:
        return False
    finally:
        fe.close()


def fds_named(name: str) -> list[str]:
    """This process's fds and mappings (the server runs in it) of the memfd ``name``."""
    out = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith(f"/memfd:{name} "):
                out.append(f"fd {entry}")
        except FileNotFoundError:
            pass
    with open("/proc/self/maps") as maps:
        out += [line.split()[0] for line in maps if f"/memfd:{name} " in line]
    return out


def count_eventfds() -> int:
    n = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{entry}") == "anon_inode:[eventfd]"
        except FileNotFoundError:
            pass
    return n


def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw(srv: VhostUserServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    s.settimeout(5)
    return s


def ack(s: socket.socket) -> int:
    m = recv_message(s)
    assert m.flags == 5 and len(m.payload) == 8
    return U64.unpack(m.payload)[0]


def send(s: socket.socket, req: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
    send_message(s, Message(req, ACK, payload, fds or []))


def memfd(name: str, size: int, sealable: bool = True) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def region(gpa: int, size: int, uva: int, off: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, off)


# -- every fd that comes with a refused message is closed --


@pytest.mark.parametrize(
    "regions, sizes",
    [
        pytest.param([region(0, 1 << 20, 1 << 30, 100)], [2 << 20], id="offset-unaligned"),
        pytest.param([region(0, 2 << 20, 1 << 30)], [1 << 20], id="beyond-file"),
        pytest.param([region(0, 0, 1 << 30)], [1 << 20], id="empty"),
        pytest.param(
            [region(0, 1 << 20, 0), region(1 << 19, 1 << 20, 1 << 24)],
            [1 << 20, 1 << 20],
            id="gpa-overlap",
        ),
        pytest.param(
            [region(0, 1 << 20, 0, 100), region(1 << 20, 1 << 20, 1 << 24)],
            [1 << 20, 1 << 20],
            id="first-of-two-unaligned",
        ),
    ],
)
@pytest.mark.parametrize("req", [Req.SET_MEM_TABLE, Req.ADD_MEM_REG])
def test_refused_memory_region_fds_are_closed(
    server: VhostUserServer, tag: str, req: Req, regions: list[bytes], sizes: list[int]
) -> None:
    s = raw(server)
    fds = [memfd(tag, n) for n in sizes]
    if req == Req.SET_MEM_TABLE:
        send(s, req, MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(regions), fds)
        assert ack(s) == 1
    else:
        for r, fd in zip(regions, fds, strict=True):
            send(s, req, bytes(8) + r, [fd])
            ack(s)  # the second of "first-of-two-unaligned" is accepted
    for fd in fds:
        os.close(fd)
    s.close()  # a region that was accepted is unmapped when the connection goes
    assert until(lambda: not fds_named(tag)), fds_named(tag)
    assert served(server)


def test_refused_region_fd_is_closed_while_connected(server: VhostUserServer, tag: str) -> None:
    """The refusal itself closes the fd, not the end of the connection."""
    s = raw(server)
    for _ in range(3):
        fd = memfd(tag, 2 << 20)
        send(s, Req.ADD_MEM_REG, bytes(8) + region(0, 1 << 20, 1 << 30, 100), [fd])
        assert ack(s) == 1
        os.close(fd)
    assert fds_named(tag) == []
    s.close()


@pytest.mark.parametrize(
    "req, payload, make",
    [
        pytest.param(Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 100), "memfd", id="log-unaligned"),
        pytest.param(Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), "unsealable", id="log-seal"),
        pytest.param(Req.SET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, 1, 128), "memfd", id="inflight"),
        pytest.param(
            Req.SET_INFLIGHT_FD, INFLIGHT.pack(0x840, 0, 1, 128), "unsealable", id="inflight-seal"
        ),
        pytest.param(Req.SET_VRING_KICK, U64.pack(0), "memfd", id="kick-not-eventfd"),
        pytest.param(Req.SET_VRING_CALL, U64.pack(0), "memfd", id="call-not-eventfd"),
        pytest.param(Req.SET_VRING_ERR, U64.pack(0), "memfd", id="err-not-eventfd"),
        pytest.param(Req.SET_BACKEND_REQ_FD, b"", "memfd", id="backend-req-not-socket"),
        pytest.param(Req.SET_DEVICE_STATE_FD, struct.pack("<II", 0, 1), "memfd", id="state-phase"),
        pytest.param(Req.SET_DEVICE_STATE_FD, struct.pack("<II", 0, 0), "memfd", id="state-memfd"),
        pytest.param(Req.SET_VRING_KICK, U64.pack(7), "eventfd", id="kick-bad-index"),
        pytest.param(Req.GET_FEATURES, b"", "memfd", id="fd-where-none-belongs"),
    ],
)
def test_fds_of_refused_messages_are_closed(
    server: VhostUserServer, tag: str, req: Req, payload: bytes, make: str
) -> None:
    fe = VhostUserDriver(server.path)
    fe.init()
    fd = memfd(tag, 1 << 20, sealable=make != "unsealable")
    sent = os.eventfd(0) if make == "eventfd" else fd
    send_message(fe.sock, Message(req, ACK, payload, [sent]))
    try:
        recv_message(fe.sock).close_fds()
    except ProtocolError:
        pass  # malformed, or refused where only a reply of its own would do: closed
    os.close(fd)
    if sent != fd:
        os.close(sent)
    assert until(lambda: not fds_named(tag)), req.name
    fe.close()
    assert served(server)


def test_replaced_fds_are_closed(server: VhostUserServer, tag: str) -> None:
    """Each fd a frontend sends again (log, inflight, call, err, kick, backend channel)
    closes the one it replaces; the connection's end closes the last ones."""
    fe = VhostUserDriver(server.path, inflight=True)
    blk = BlkDriver.open(fe)
    fe.set_u64(Req.SET_PROTOCOL_FEATURES, fe.protocol | 1 << PF.LOG_SHMFD)
    size = INFLIGHT.unpack(fe.inflight_payload)[0]
    base = fe.stop_ring(0)
    for i in range(3):
        log = memfd(f"{tag}-log{i}", 4096)
        fe.request(Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), [log])
        region = memfd(f"{tag}-inflight{i}", size)
        fe.request(Req.SET_INFLIGHT_FD, fe.inflight_payload, [region])
        os.close(log)
        os.close(region)
        if i:
            assert fds_named(f"{tag}-log{i - 1}") == []
            assert fds_named(f"{tag}-inflight{i - 1}") == []
    err = os.eventfd(0)
    fe.set_u64(Req.SET_VRING_ERR, 0, [err])  # the frontend had none: now one
    os.close(err)
    events = count_eventfds()
    for req in (Req.SET_VRING_CALL, Req.SET_VRING_ERR, Req.SET_VRING_KICK) * 3:
        fd = os.eventfd(0)
        fe.set_u64(req, 0, [fd])
        os.close(fd)
    assert until(lambda: count_eventfds() <= events), count_eventfds() - events
    channels = []
    for _ in range(3):
        ours, theirs = socket.socketpair()
        fe.request(Req.SET_BACKEND_REQ_FD, b"", [ours.fileno()])
        ours.close()
        channels.append(theirs)
    assert [c.recv(1) for c in channels[:-1]] == [b"", b""]  # emu closed its ends
    fe.restart_ring(0, base)
    assert blk.read(1, 8) == bytes(8 * 512)
    fe.close()
    assert until(lambda: not fds_named(tag)), fds_named(tag)
    assert channels[-1].recv(1) == b""
    for c in channels:
        c.close()


def test_frontend_stop_restart_keeps_its_eventfds(server: VhostUserServer) -> None:
    """emu's own frontend reuses its kick and call eventfds across ring stops/restarts."""
    fe = VhostUserDriver(server.path)
    try:
        blk = BlkDriver.open(fe)
        assert blk.write(1, PATTERN) == 0
        before = count_eventfds()
        for _ in range(10):
            base = fe.stop_ring(0)
            fe.restart_ring(0, base)
        assert blk.read(1, 8) == PATTERN
        # the server swaps in each new kick fd on its device thread: let it settle
        assert until(lambda: count_eventfds() <= before + 1), count_eventfds() - before
    finally:
        fe.close()


# -- SET_INFLIGHT_FD with an fd that cannot be mapped is refused, not a dropped connection --


def test_inflight_fd_that_cannot_be_mapped_is_refused(
    server: VhostUserServer, tmp_path: Path
) -> None:
    fe = VhostUserDriver(server.path, inflight=True)
    fe.init()
    size = INFLIGHT.unpack(fe.inflight_payload)[0]
    path = tmp_path / "inflight"
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_WRONLY)
    send_message(fe.sock, Message(Req.SET_INFLIGHT_FD, ACK, fe.inflight_payload, [fd]))
    os.close(fd)
    assert ack(fe.sock) == 1
    assert fe.get_u64(Req.GET_QUEUE_NUM) == 1  # the connection is still there
    fe.close()
    assert served(server)


# -- the server survives a connection whose handling runs out of fds --


class _NoFds:
    """While active, this process can open no new fd (RLIMIT_NOFILE at the lowest free)."""

    def __enter__(self) -> _NoFds:
        self.old = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.dup(0)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, self.old[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.old)


def reacted(server: VhostUserServer, caplog: pytest.LogCaptureFixture, what: str) -> bool:
    """The server thread logged ``what`` (it met the failure and carried on) or died."""
    assert server._thread is not None
    thread = server._thread
    return until(lambda: what in caplog.text or not thread.is_alive())


def test_server_survives_accept_without_fds(
    server: VhostUserServer, caplog: pytest.LogCaptureFixture
) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _NoFds():
        s.connect(server.path)  # the server's accept fails with EMFILE
        assert reacted(server, caplog, "cannot accept")
    s.close()
    assert served(server)


def test_server_survives_session_cleanup_without_fds(
    server: VhostUserServer, caplog: pytest.LogCaptureFixture
) -> None:
    fe = VhostUserDriver(server.path)
    blk = BlkDriver.open(fe)
    assert blk.write(1, PATTERN) == 0
    with _NoFds():
        fe.sock.shutdown(socket.SHUT_RDWR)  # the server resets the device: needs fds
        assert reacted(server, caplog, "keeps its kick fd")
    fe.close()
    assert served(server)


def test_rlimit_helper_really_exhausts() -> None:
    with _NoFds(), pytest.raises(OSError):
        os.eventfd(0)
    os.close(os.eventfd(0))
