"""virtio-vsock end to end: reference driver (a small guest vsock stack) -> mmio transport
-> VsockDevice -> hybrid vsock Unix sockets -> host programs (threads in the test)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modes import RING_MODES, wait_until

from emu.backends.hybrid_vsock import HybridVsock
from emu.devices import vsock as vs
from emu.devices.vsock import VsockDevice
from emu.devices.vsock_defs import (
    F_SEQPACKET,
    HDR,
    HOST_CID,
    OP_CREDIT_UPDATE,
    OP_RST,
    OP_RW,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
)
from emu.memory import GuestMemory
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import StateError
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.testing.vsock import GuestVsock, VsockError
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer

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


def accept(srv: socket.socket) -> socket.socket:
    """The next host program's end of a guest connect (a test never waits forever)."""
    prog, _ = srv.accept()
    prog.settimeout(20)
    return prog


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
    prog = accept(srv)
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


@pytest.mark.parametrize(
    ("layout", "biggest"),
    [
        ([HDR.size + (64 << 10)], 64 << 10),
        ([10, 30, 4, 4096], 4096),
        ([20, 30] + [7] * 30, 6 + 7 * 7),  # the packet takes the first 8 payload pieces
        ([HDR.size, 3, 0, 5, 100], 108),
    ],
    ids=["one-buffer", "split-header", "many-pieces", "tiny-pieces"],
)
def test_host_bytes_land_whole_in_any_rx_buffer_layout(rig, layout, biggest):
    """The device reads host bytes straight into rx buffers laid out any way: a header
    across buffers, payload in many pieces, empty ones."""
    _, g = rig.vsock(rx_layout=layout)
    srv = rig.listen(5014)
    s = g.connect(5014)
    prog = accept(srv)
    data = pattern(300_000, b"layout")
    threading.Thread(target=prog.sendall, args=(data,)).start()
    assert s.recv_exactly(len(data), timeout=30) == data
    assert g.bad_lengths == 0 and s.overruns == 0
    assert max(h.len for h in g.seen if h.op == OP_RW) == biggest


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
    prog = accept(srv)
    for msg in (b"one", b"two two", pattern(70_000, b"big")):  # the big one takes packets
        s.send(msg)
        assert prog.recv(100_000) == msg
    for msg in (b"back", pattern(9000, b"back big"), pattern(200_000, b"back huge")):
        prog.send(msg)
        assert s.recv_msg() == msg


def test_seqpacket_advertises_what_one_host_send_takes(rig):
    _, g = rig.vsock()
    srv = rig.listen(6002, socket.SOCK_SEQPACKET)
    s = g.connect(6002, TYPE_SEQPACKET)
    prog = accept(srv)
    limit = s.peer_buf_alloc
    assert 0 < limit < vs.BUF_ALLOC  # a Unix socket's send buffer is smaller by default
    msg = pattern(limit, b"largest")
    s.send(msg)  # whole, in one host send
    assert prog.recv(limit + 1) == msg
    with pytest.raises(VsockError, match="EMSGSIZE"):
        s.send(msg + b"!")


def test_many_connections_at_once(rig):
    dev, g = rig.vsock(rx_buffers=64, queue_size=128)
    n = 24
    srv = rig.listen(5001)
    socks = [g.connect(5001) for _ in range(n)]
    progs = [accept(srv) for _ in range(n)]
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


# -- flow control: slow readers on either side --


def test_slow_host_reader_stops_the_guest_by_credit(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5002)
    s = g.connect(5002)
    prog = accept(srv)
    data = pattern(3 << 20, b"slow host")
    # nobody reads: the host socket fills, then emu holds what the guest may still send
    # (its buf_alloc), then the guest has no credit left
    with pytest.raises(TimeoutError, match="no credit"):
        s.send(data, timeout=1.5)
    sent = s.tx_cnt
    assert 0 < sent < len(data) and s.credit() == 0
    conn = dev.conns.get(5002, s.local_port)
    assert 0 < len(conn.out) <= vs.BUF_ALLOC
    got = bytearray()

    def slow_reader() -> None:
        while len(got) < len(data):
            chunk = prog.recv(32768)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.002)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    s.send(data[sent:], timeout=60)
    reader.join(60)
    assert bytes(got) == data
    assert dev.stats.held_peak <= vs.BUF_ALLOC


def test_credit_comes_back_while_bytes_still_wait_for_a_slow_program(rig):
    """The program drains what emu holds slowly: credit goes back to the guest as it
    drains (not only once emu holds nothing, which runs the guest stop-and-go), and emu
    still holds at most buf_alloc."""
    dev, g = rig.vsock()
    srv = rig.listen(5012)
    s = g.connect(5012)
    prog = accept(srv)
    data = pattern(3 << 20, b"drain")
    with pytest.raises(TimeoutError, match="no credit"):
        s.send(data, timeout=1.5)  # the host socket full, emu holding buf_alloc
    sent = s.tx_cnt
    seen = len(g.seen)
    got = bytearray()
    stop = threading.Event()

    def slow_reader() -> None:
        while len(got) < len(data):
            if not stop.is_set():
                time.sleep(0.005)
            chunk = prog.recv(16384)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        g.pump_until(lambda: s.credit() > 0, 10)
        updates = [h for h in list(g.seen)[seen:] if h.op == OP_CREDIT_UPDATE]
        assert updates[0].fwd_cnt < sent  # given while emu still held bytes for the program
        s.send(data[sent:], timeout=60)
    finally:
        stop.set()
        reader.join(60)
    assert bytes(got) == data
    assert dev.stats.held_peak <= vs.BUF_ALLOC


def test_slow_guest_reader_leaves_the_bytes_in_the_host_socket(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5003)
    s = g.connect(5003)
    prog = accept(srv)
    data = pattern(3 << 20, b"slow guest")
    writer = threading.Thread(target=prog.sendall, args=(data,))
    writer.start()
    # the guest takes every packet but its application reads nothing: credit runs out
    g.pump_until(lambda: s.unread() >= s.buf_alloc, 10)
    for _ in range(20):
        g.pump(0.01)  # time for anything more to come: nothing may
    assert s.unread() == s.buf_alloc and s.overruns == 0
    conn = dev.conns.get(5003, s.local_port)
    assert conn.tx_cnt == s.buf_alloc  # emu read from the program only what it could send
    assert conn.held_bytes() == 0
    assert writer.is_alive()  # the rest waits in the program's socket: its writes block
    got = bytearray()
    while len(got) < len(data):
        got += s.recv(20_000, timeout=30)
        g.pump(0)
    writer.join(30)
    assert bytes(got) == data and s.overruns == 0


def test_credit_request_is_answered_and_updates_come_unasked(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5004)
    s = g.connect(5004)
    prog = accept(srv)
    s.send(b"x" * 1000)
    assert recv_all(prog, 1000) == b"x" * 1000
    seen = len(g.seen)
    s.credit_request()
    g.pump_until(lambda: any(h.op == OP_CREDIT_UPDATE for h in list(g.seen)[seen:]), 5)
    (upd,) = [h for h in list(g.seen)[seen:] if h.op == OP_CREDIT_UPDATE]
    assert (upd.src_cid, upd.dst_cid) == (HOST_CID, CID)
    assert (upd.src_port, upd.dst_port) == (5004, s.local_port)
    assert (upd.buf_alloc, upd.fwd_cnt, upd.len) == (vs.BUF_ALLOC, 1000, 0)
    # all of the credit used: as the program reads it, the device says so unasked (once
    # the guest sees less than CREDIT_LOW free: it never stays below that)
    s.send(pattern(vs.BUF_ALLOC - 1000, b"fill"), timeout=10)
    assert s.credit() < vs.BUF_ALLOC
    assert len(recv_all(prog, vs.BUF_ALLOC - 1000)) == vs.BUF_ALLOC - 1000
    g.pump_until(lambda: s.credit() >= vs.CREDIT_LOW, 5)


# -- shutdown and close --


def test_guest_shutdown_send_is_eof_for_the_program_which_still_answers(rig):
    _, g = rig.vsock()
    srv = rig.listen(5005)
    s = g.connect(5005)
    prog = accept(srv)
    s.send(b"request")
    s.shutdown(SHUTDOWN_SEND)
    assert recv_all(prog, 100) == b"request"  # and then EOF
    prog.sendall(b"answer")
    prog.close()
    assert s.recv_exactly(6) == b"answer"
    g.pump_until(lambda: s.state == "closed", 5)  # the program is gone: RST after its data
    assert s.recv(10) == b""


def test_guest_shutdown_rcv_makes_the_programs_writes_fail(rig):
    _, g = rig.vsock()
    srv = rig.listen(5006)
    s = g.connect(5006)
    prog = accept(srv)
    s.shutdown(SHUTDOWN_RCV)

    def refused() -> bool:
        try:
            prog.send(b"x")
        except BrokenPipeError:
            return True
        return False

    wait_until(refused, 5)
    s.send(b"still one way")
    assert recv_all(prog, 13) == b"still one way"


def test_program_eof_is_shutdown_send_and_the_guest_still_sends(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5007)
    s = g.connect(5007)
    prog = accept(srv)
    prog.sendall(b"last words")
    prog.shutdown(socket.SHUT_WR)
    assert s.recv_exactly(10) == b"last words"
    g.pump_until(lambda: s.peer_shut == SHUTDOWN_SEND, 5)
    assert s.recv(5) == b"" and s.state == "established"
    s.send(b"reply")
    assert recv_all(prog, 5) == b"reply"
    s.shutdown(SHUTDOWN_SEND)  # both ways done: the device ends it with RST
    g.pump_until(lambda: s.state == "closed", 5)
    assert prog.recv(1) == b""
    wait_until(lambda: not dev.conns.by_fd)


def test_guest_close_is_answered_at_once_and_its_bytes_still_reach_the_program(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5008)
    s = g.connect(5008)
    prog = accept(srv)
    data = pattern(vs.BUF_ALLOC, b"close")  # more than the program's socket takes unread
    s.send(data)
    s.close(timeout=5)  # SHUTDOWN both ways; the device answers RST while still flushing
    assert not s.reset and not dev.conns.by_key
    assert recv_all(prog, len(data) + 1) == data  # all of it, then EOF
    wait_until(lambda: not dev.conns.by_fd)


# -- stop and restore --


def test_report_stops_mid_stream_lose_and_double_nothing(rig):
    dev, g = rig.vsock(queue_size=16, rx_buffers=8)
    srv = rig.listen(5009)
    s = g.connect(5009)
    prog = accept(srv)
    up, down = pattern(1 << 20, b"stop up"), pattern(1 << 20, b"stop down")
    got: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: got.update(up=recv_all(prog, len(up))))
    writer = threading.Thread(target=prog.sendall, args=(down,))
    reader.start()
    writer.start()
    tr = g.drv.transport
    stop = threading.Event()

    def stopper() -> None:
        while not stop.is_set():
            time.sleep(0.003)
            tr.vmm_stop("report")
            time.sleep(0.002)
            tr.vmm_resume()

    t = threading.Thread(target=stopper)
    t.start()
    try:
        for k in range(0, len(up), 50_000):
            s.send(up[k : k + 50_000], timeout=30)
            g.pump(0)
        assert s.recv_exactly(len(down), timeout=60) == down
    finally:
        stop.set()
        t.join()
    reader.join(30)
    writer.join(30)
    assert got["up"] == up and s.overruns == 0 and g.bad_lengths == 0


def restore(rig: Rig, dev: VsockDevice, g: GuestVsock, cid: int) -> VsockDevice:
    """Stop ``dev``, save it through a state file, close it (its host sockets go) and
    restore a fresh device, made with ``cid``, in its place under the same guest stack."""
    drv = g.drv
    drv.transport.vmm_stop("report")
    path = rig.tmp / "vsock.state"
    statefile.save(path, drv.transport.save())
    saved = drv.save()
    mem = drv.mem
    dev.close()
    fresh = VsockDevice(cid, HybridVsock(rig.path))
    tr = MmioTransport(fresh, mem)
    g.drv = VirtioMmioDriver.load(tr, mem, saved)
    tr.restore(statefile.load(path))
    rig.parts = [(fresh, mem, g.drv) if p[0] is dev else p for p in rig.parts]
    return fresh


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_restore_resets_connections_keeps_listeners_and_cid(rig, packed):
    dev, g = rig.vsock(packed=packed)
    g.listen(1234)
    srv = rig.listen(5000)
    s = g.connect(5000)
    prog = accept(srv)
    s.send(b"before")
    assert recv_all(prog, 6) == b"before"
    host = rig.host_connect(1234)
    gs = g.accept(1234)
    assert read_line(host) == b"OK %d\n" % gs.peer_port

    dev2 = restore(rig, dev, g, cid=7)
    ((_, part),) = [
        (p, v)
        for p, v in parts.parse(statefile.load(rig.tmp / "vsock.state"))
        if p.type == parts.device_part(VsockDevice.device_id)
    ]
    assert {(c["local_port"], c["by_guest"]) for c in part["dropped"]} == {
        (5000, True),
        (gs.peer_port, False),
    }
    assert prog.recv(1) == b"" and host.recv(1) == b""  # their sockets went with the device
    g.pump_until(lambda: g.transport_resets == 1, 5)
    assert s.state == gs.state == "closed" and s.reset and gs.reset
    assert g.cid == dev2.cid == CID  # the saved CID, not the fresh device's 7
    # a packet of an old connection is answered with RST
    g.send_packet(s, OP_RW, b"stale")
    g.pump_until(lambda: any(h.op == OP_RST for h in g.unmatched), 5)
    # listeners are kept: the host reaches the guest's again, on a port not used before
    host2 = rig.host_connect(1234)
    gs2 = g.accept(1234)
    assert read_line(host2) == b"OK %d\n" % gs2.peer_port and gs2.peer_port > gs.peer_port
    gs2.send(b"after")
    assert recv_all(host2, 5) == b"after"
    s2 = g.connect(5000)
    prog2 = accept(srv)
    prog2.sendall(b"again")
    assert s2.recv_exactly(5) == b"again"


def test_stop_and_resume_in_place_keeps_connections(rig):
    dev, g = rig.vsock()
    srv = rig.listen(5010)
    s = g.connect(5010)
    prog = accept(srv)
    tr = g.drv.transport
    tr.vmm_stop("report")
    prog.sendall(b"while stopped")
    assert dev.save_state()["dropped"][0]["local_port"] == 5010
    tr.vmm_resume()
    assert s.recv_exactly(13) == b"while stopped"
    assert g.transport_resets == 0


def test_load_state_in_place_drops_connections_and_resets_the_guest(rig):
    """A restore in place (a VMM that cannot swap the device: stop, load, resume) ends
    the connections as a restore into a fresh device does."""
    dev, g = rig.vsock()
    g.listen(1234)
    srv = rig.listen(5011)
    s = g.connect(5011)
    prog = accept(srv)
    host = rig.host_connect(1234)
    gs = g.accept(1234)
    assert read_line(host) == b"OK %d\n" % gs.peer_port
    with pytest.raises(StateError, match="stop the device"):
        dev.load_state(dev.save_state())  # not under a running device's feet
    assert len(dev.conns) == 2
    tr = g.drv.transport
    tr.vmm_stop("report")
    prog.sendall(b"lost with the connection")
    state = dev.save_state()
    dev.load_state(state)
    assert not dev.conns.by_fd
    tr.vmm_resume()
    prog.settimeout(5)
    host.settimeout(5)
    # their host sockets are closed; the one with unread bytes in it reads as a reset
    with pytest.raises(ConnectionResetError):
        prog.recv(1)
    assert host.recv(1) == b""
    g.pump_until(lambda: g.transport_resets == 1, 5)
    assert s.state == gs.state == "closed" and s.reset and gs.reset
    assert s.unread() == 0
    host2 = rig.host_connect(1234)  # the guest's listener is kept, and the port counter
    gs2 = g.accept(1234)
    assert read_line(host2) == b"OK %d\n" % gs2.peer_port and gs2.peer_port > gs.peer_port
    s2 = g.connect(5011)
    accept(srv).sendall(b"again")
    assert s2.recv_exactly(5) == b"again"


# -- over vhost-user, as UML (all three queues) and QEMU (rx and tx only) drive it --


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_queue", [True, False], ids=["uml", "qemu"])
def test_over_vhost_user(rig, packed, event_queue):
    dev = VsockDevice(CID, HybridVsock(rig.path))
    server = VhostUserServer(dev, rig.tmp / "vu.sock").start()
    fe = VhostUserDriver(rig.tmp / "vu.sock")
    try:
        g = GuestVsock(fe, packed=packed, event_queue=event_queue)
        assert g.cid == CID  # GET_CONFIG
        srv = rig.listen(5000)
        s = g.connect(5000)
        prog = accept(srv)
        data = pattern(400_000, b"vhost-user")
        threading.Thread(target=prog.sendall, args=(data,)).start()
        s.send(data[::-1])
        assert s.recv_exactly(len(data)) == data
        assert recv_all(prog, len(data)) == data[::-1]
        g.listen(22)
        host = rig.host_connect(22)
        gs = g.accept(22)
        assert read_line(host) == b"OK %d\n" % gs.peer_port
    finally:
        fe.close()
        server.close()
        dev.close()
