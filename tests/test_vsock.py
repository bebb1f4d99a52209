"""virtio-vsock end to end: reference driver (a small guest vsock stack) -> mmio transport
-> VsockDevice -> hybrid vsock Unix sockets -> host programs (threads in the test)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from modes import RING_MODES, wait_until

from emu.backends.hybrid_vsock import HybridVsock
from emu.devices import vsock as vs
from emu.devices.vsock import VsockDevice
from emu.devices.vsock_defs import (
    F_SEQPACKET,
    TYPE_SEQPACKET,
)
from emu.memory import GuestMemory
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vsock import GuestVsock, VsockError
from emu.transport.mmio import MmioTransport

CID = 3


class Rig:
    """Devices with guest stacks on top; host programs reach them at ``self.path``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.parts: list[tuple[VsockDevice, GuestMemory, VirtioMmioDriver]] = []
        self.path = str(tmp / "v.sock")

    def vsock(self, *, dev: dict | None = None, **guest) -> tuple[VsockDevice, GuestVsock]:
        d = VsockDevice(CID, HybridVsock(self.path), **(dev or {}))
        mem = GuestMemory.create(32 << 20)
        drv = VirtioMmioDriver(MmioTransport(d, mem), mem)
        self.parts.append((d, mem, drv))
        return d, GuestVsock(drv, **guest)

    def listen(self, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A host program listening where a guest connect to ``port`` goes."""
        srv = socket.socket(socket.AF_UNIX, kind)
        srv.bind(f"{self.path}_{port}")
        srv.listen(64)
        srv.settimeout(10)
        return srv

    def host_connect(self, port: int) -> socket.socket:
        """A host program's CONNECT to the guest's ``port`` (OK not read yet)."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.path)
        s.sendall(b"CONNECT %d\n" % port)
        return s

    def close(self) -> None:
        for d, mem, _ in self.parts:
            d.close()
            mem.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def read_line(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def pattern(n: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest()
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(block + i.to_bytes(4, "little")).digest()
        i += 1
    return bytes(out[:n])


def recv_all(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("mode", RING_MODES)
def test_guest_connects_and_data_flows_both_ways(rig, mode):
    dev, g = rig.vsock(**mode)
    assert g.cid == CID and dev.config_bytes() == CID.to_bytes(8, "little")
    srv = rig.listen(5000)
    s = g.connect(5000)
    prog, _ = srv.accept()
    up = pattern(300_000, b"up")  # more than the 256 KiB of credit: updates must come
    down = pattern(200_000, b"down")
    got = {}
    reader = threading.Thread(target=lambda: got.update(up=recv_all(prog, len(up))))
    reader.start()
    writer = threading.Thread(target=prog.sendall, args=(down,))
    writer.start()
    s.send(up)
    assert s.recv_exactly(len(down), timeout=30) == down
    reader.join(30)
    writer.join(30)
    assert got["up"] == up
    assert s.overruns == 0 and g.bad_lengths == 0


@pytest.mark.parametrize("mode", RING_MODES[:1] + RING_MODES[4:5])
def test_host_connects_and_data_flows_both_ways(rig, mode):
    _, g = rig.vsock(**mode)
    g.listen(1234)
    prog = rig.host_connect(1234)
    s = g.accept(1234)
    assert read_line(prog) == b"OK %d\n" % s.peer_port
    assert s.peer_port == vs.FIRST_LOCAL_PORT
    data = pattern(100_000, b"h2g")
    threading.Thread(target=prog.sendall, args=(data,)).start()
    assert s.recv_exactly(len(data)) == data
    s.send(b"and back")
    assert recv_all(prog, 8) == b"and back"


def test_bytes_sent_right_after_connect_wait_for_the_guest(rig):
    _, g = rig.vsock()
    g.listen(7)
    prog = socket.socket(socket.AF_UNIX)
    prog.settimeout(10)
    prog.connect(rig.path)
    prog.sendall(b"CONNECT 7\nearly bytes")  # not part of the line: for the guest
    s = g.accept(7)
    assert read_line(prog) == b"OK %d\n" % s.peer_port
    assert s.recv_exactly(11) == b"early bytes"


def test_connect_to_a_port_nobody_listens_on_is_refused(rig):
    dev, g = rig.vsock()
    with pytest.raises(VsockError, match="refused"):
        g.connect(4242)
    assert dev.stats.refused == 1
    # and the host's CONNECT to a guest port without a listener: the socket is closed
    prog = rig.host_connect(99)
    assert prog.recv(16) == b""
    wait_until(lambda: not dev.conns.by_fd)


def test_seqpacket_keeps_message_boundaries(rig):
    _, g = rig.vsock()
    assert g.features >> F_SEQPACKET & 1
    srv = rig.listen(6000, socket.SOCK_SEQPACKET)
    s = g.connect(6000, TYPE_SEQPACKET)
    prog, _ = srv.accept()
    for msg in (b"one", b"two two", pattern(70_000, b"big")):  # the big one takes packets
        s.send(msg)
        assert prog.recv(100_000) == msg
    for msg in (b"back", pattern(9000, b"back big")):
        prog.send(msg)
        assert s.recv_msg() == msg


def test_many_connections_at_once(rig):
    dev, g = rig.vsock(rx_buffers=64, queue_size=128)
    n = 24
    srv = rig.listen(5001)
    socks = [g.connect(5001) for _ in range(n)]
    progs = [srv.accept()[0] for _ in range(n)]
    ups = [pattern(40_000, b"up%d" % i) for i in range(n)]
    downs = [pattern(30_000, b"down%d" % i) for i in range(n)]
    got: dict[int, bytes] = {}

    def host(i: int) -> None:
        w = threading.Thread(target=progs[i].sendall, args=(downs[i],))
        w.start()
        got[i] = recv_all(progs[i], len(ups[i]))
        w.join()

    threads = [threading.Thread(target=host, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for s, up in zip(socks, ups, strict=True):
        s.send(up)
    for s, down in zip(socks, downs, strict=True):
        assert s.recv_exactly(len(down), timeout=30) == down
    for t in threads:
        t.join(30)
    assert [got[i] for i in range(n)] == ups
    assert len(dev.conns) == n
