"""A hostile guest (and hostile host programs) against virtio-vsock.

Malformed packets are answered with RST (closing the connection they name, if any) and
the device carries on: each test ends by showing the next good connection works.
Malformed chains make the device need a reset; a driver reset brings it back. Credit that
lies never makes emu hold more than ``buf_alloc`` for a connection one way, nor anything
the other way.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import wait_until
from test_vsock import Rig, accept, pattern, read_line, recv_all, restore

from emu.backends.hybrid_vsock import HybridVsock
from emu.devices import vsock as vs
from emu.devices.vsock import VsockDevice
from emu.devices.vsock_defs import (
    EVENTQ,
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX,
    SHUTDOWN_SEND,
    TX,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Header,
)
from emu.state.format import StateError
from emu.testing.driver import DeviceNeedsReset
from emu.testing.vsock import GuestSocket, GuestVsock, VsockError

CID = 3


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def header(g: GuestVsock, **kw: int) -> Header:
    fields = dict(
        src_cid=g.cid,
        dst_cid=HOST_CID,
        src_port=40000,
        dst_port=5000,
        len=0,
        type=TYPE_STREAM,
        op=OP_RW,
        flags=0,
        buf_alloc=65536,
        fwd_cnt=0,
    )
    fields.update(kw)
    return Header(**fields)


def of(sock: GuestSocket, **kw: int) -> dict:
    """Header fields naming ``sock``'s connection."""
    return dict(src_port=sock.local_port, dst_port=sock.peer_port, **kw)


def send(g: GuestVsock, h: Header, payload: bytes = b"") -> None:
    g.send_raw([h.pack(), payload] if payload else [h.pack()])


def wait_rst(g: GuestVsock, h: Header, timeout: float = 5.0) -> Header:
    """The RST the device sent back for ``h`` (addresses swapped)."""

    def found() -> Header | None:
        for r in g.seen:
            if r.op == OP_RST and (r.src_port, r.dst_port) == (h.dst_port, h.src_port):
                return r
        return None

    g.pump_until(lambda: found() is not None, timeout)
    return found()


def still_works(rig: Rig, g: GuestVsock, port: int = 5999) -> None:
    """The next good connection is served: data both ways."""
    srv = rig.listen(port)
    s = g.connect(port)
    prog = accept(srv)
    s.send(b"ping")
    assert recv_all(prog, 4) == b"ping"
    prog.sendall(b"pong")
    assert s.recv_exactly(4) == b"pong"
    srv.close()


def closed(prog: socket.socket) -> bool:
    """The other end closed (unread bytes make that a reset)."""
    try:
        return prog.recv(16) == b""
    except ConnectionResetError:
        return True


def connected(rig: Rig, g: GuestVsock, port: int) -> tuple[GuestSocket, socket.socket]:
    srv = rig.listen(port)
    s = g.connect(port)
    prog = accept(srv)
    srv.close()
    return s, prog


# -- packets of no connection, wrong addresses, types and ops --


@pytest.mark.parametrize(
    "op", [OP_RW, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, OP_RESPONSE, 0, 8, 0xFFFF]
)
def test_a_packet_of_no_connection_is_answered_with_rst(rig, op):
    dev, g = rig.vsock()
    h = header(g, op=op, len=5 if op == OP_RW else 0, src_port=41000 + op)
    send(g, h, b"hello" if op == OP_RW else b"")
    rst = wait_rst(g, h)
    assert (rst.src_cid, rst.dst_cid, rst.type, rst.len) == (HOST_CID, CID, TYPE_STREAM, 0)
    assert not dev.conns.by_fd
    still_works(rig, g)


def test_an_rst_of_no_connection_is_not_answered(rig):
    _, g = rig.vsock()
    send(g, header(g, op=OP_RST))
    still_works(rig, g)  # the connect's RESPONSE is the first packet the guest gets
    assert [h.op for h in g.seen] == [OP_RESPONSE, OP_RW]


@pytest.mark.parametrize("cids", [(99, HOST_CID), (CID, CID), (CID, 5), (CID, 0xFFFFFFFF)])
def test_wrong_cids_get_rst_and_leave_the_connection_alone(rig, cids):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    src, dst = cids
    h = header(g, src_cid=src, dst_cid=dst, len=3, **of(s))
    send(g, h, b"bad")
    rst = wait_rst(g, h)
    assert (rst.src_cid, rst.dst_cid) == (dst, src)  # back where it came from
    assert dev.stats.bad_packets == 1
    assert s.state == "established" and dev.conns.get(5000, s.local_port) is not None
    s.send(b"good")
    assert recv_all(prog, 4) == b"good"  # "bad" never reached the program


@pytest.mark.parametrize("type_", [0, 3, 0xFFFF])
def test_a_type_out_of_range_is_refused_and_resets_its_connection(rig, type_):
    dev, g = rig.vsock()
    srv = rig.listen(5000)
    h = header(g, op=OP_REQUEST, type=type_)
    send(g, h)
    wait_rst(g, h)
    assert not dev.conns.by_fd  # no host connection was even tried
    s = g.connect(5000)
    prog = accept(srv)
    send(g, header(g, type=type_, len=1, **of(s)), b"x")
    g.pump_until(lambda: s.state == "closed", 5)
    assert s.reset and prog.recv(1) == b""
    still_works(rig, g)


def test_seqpacket_packets_on_a_stream_connection_reset_it(rig):
    _, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    send(g, header(g, type=TYPE_SEQPACKET, len=1, **of(s)), b"x")
    g.pump_until(lambda: s.state == "closed", 5)
    assert prog.recv(1) == b""


@pytest.mark.parametrize("op", [0, 8, 0x7FFF, OP_REQUEST, OP_RESPONSE])
def test_an_op_out_of_range_or_out_of_place_resets_the_connection(rig, op):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    send(g, header(g, op=op, **of(s)))
    g.pump_until(lambda: s.state == "closed", 5)
    assert s.reset and prog.recv(1) == b"" and dev.stats.bad_packets == 1
    still_works(rig, g)


def test_data_before_the_guest_accepts_resets_the_host_connection(rig):
    dev, g = rig.vsock()
    prog = rig.host_connect(77)  # the guest has no listener, and does not answer yet
    wait_until(lambda: len(dev.conns.by_key) == 1)
    (conn,) = dev.conns.by_key.values()
    send(g, header(g, src_port=77, dst_port=conn.local_port, len=2), b"hi")
    assert prog.recv(16) == b""  # closed without OK
    wait_until(lambda: not dev.conns.by_fd)
    still_works(rig, g)


def test_data_after_the_guests_own_shutdown_send_resets(rig):
    _, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    s.shutdown(SHUTDOWN_SEND)
    send(g, header(g, len=4, **of(s)), b"more")
    g.pump_until(lambda: s.state == "closed", 5)
    assert recv_all(prog, 10) == b""


# -- lengths --


@pytest.mark.parametrize(
    "length, carried",
    [(100, 10), (0xFFFFFFFF, 10), (vs.MAX_PAYLOAD + 1, vs.MAX_PAYLOAD + 1), (1 << 31, 0)],
    ids=["beyond-chain", "huge", "over-max", "huge-empty"],
)
def test_bogus_lengths_reset_the_connection(rig, length, carried):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    send(g, header(g, len=length, **of(s)), bytes(carried))
    g.pump_until(lambda: s.state == "closed", 5)
    assert s.reset and recv_all(prog, 10) == b""  # not a byte of it reached the program
    assert dev.stats.bad_packets == 1
    h = header(g, len=length, src_port=42000)
    send(g, h, bytes(carried))
    wait_rst(g, h)  # no connection: an RST back
    still_works(rig, g)


def test_payload_after_len_is_ignored(rig):
    _, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    send(g, header(g, len=3, **of(s)), b"abcdef")
    s.send(b"!")
    assert recv_all(prog, 4) == b"abc!"


# -- credit that lies --


def test_data_beyond_the_credit_given_resets_and_emu_holds_at_most_buf_alloc(rig):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)  # the program never reads
    chunk = bytes(60_000)
    sent = 0
    while s.state == "established" and sent < 4 << 20:
        send(g, header(g, len=len(chunk), **of(s)), chunk)  # credit is not looked at
        sent += len(chunk)
        g.pump(0)
    g.pump_until(lambda: s.state == "closed", 5)
    assert s.reset and dev.stats.bad_packets == 1
    assert 0 < dev.stats.held_peak <= vs.BUF_ALLOC
    still_works(rig, g)


def test_a_guest_claiming_more_buffer_than_it_has_fills_only_its_own_ring(rig):
    dev, g = rig.vsock(rx_buffers=8)
    s, prog = connected(rig, g, 5000)
    send(g, header(g, op=OP_CREDIT_UPDATE, buf_alloc=0xFFFFFFFF, **of(s)))

    def write() -> None:
        try:
            prog.sendall(pattern(8 << 20, b"lie"))
        except OSError:
            pass  # ended by the shutdown below

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(1.0)  # the guest takes nothing meanwhile
    conn = dev.conns.get(5000, s.local_port)
    assert 0 < conn.tx_cnt <= 8 * 4096  # read from the program: what its 8 buffers hold
    assert conn.held_bytes() == 0 and writer.is_alive()
    prog.shutdown(socket.SHUT_RDWR)  # let the writer end
    writer.join(10)
    still_works(rig, g)


def test_a_fwd_cnt_ahead_of_what_was_sent_gives_no_credit(rig):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    send(g, header(g, op=OP_CREDIT_UPDATE, buf_alloc=65536, fwd_cnt=1 << 31, **of(s)))
    prog.sendall(b"x" * 1000)
    for _ in range(20):
        g.pump(0.02)
    conn = dev.conns.get(5000, s.local_port)
    assert conn.tx_cnt == 0 and conn.credit() == 0 and not s.rx
    s.credit_update()  # the truth: data flows again
    assert s.recv_exactly(1000) == b"x" * 1000


# -- chains the device cannot use: it needs a reset --


def rebuilt(g: GuestVsock) -> GuestVsock:
    """After DEVICE_NEEDS_RESET: the driver resets the device and starts over."""
    return GuestVsock(g.drv)


@pytest.mark.parametrize("what", ["short-header", "writable-tx"])
def test_a_malformed_tx_chain_makes_the_device_need_a_reset(rig, what):
    dev, g = rig.vsock()
    s, prog = connected(rig, g, 5000)
    if what == "short-header":
        g.send_raw([header(g, **of(s)).pack()[:20]])
    else:
        g.send_raw([header(g, **of(s)).pack()], [64])
    with pytest.raises(DeviceNeedsReset):
        g.pump_until(lambda: False, 5)
    assert dev.broken and "tx chain" in dev.broken
    still_works(rig, rebuilt(g))
    assert prog.recv(1) == b""  # the reset closed the old connection's host socket


@pytest.mark.parametrize("what", ["readable-rx", "small-rx"])
def test_a_malformed_rx_chain_makes_the_device_need_a_reset(rig, what):
    dev, g = rig.vsock(rx_buffers=0)
    q = g.drv.queues[RX]
    if what == "readable-rx":
        q.add([b"out"], [HDR.size + 4096])
    else:
        q.add([], [HDR.size - 1])
    g.drv.kick(RX)
    rig.listen(5000)
    with pytest.raises(DeviceNeedsReset):
        g.connect(5000)  # the RESPONSE needs an rx buffer
    assert dev.broken and "rx chain" in dev.broken
    still_works(rig, rebuilt(g))


def test_a_too_small_event_buffer_makes_the_device_need_a_reset(rig):
    dev, g = rig.vsock(event_buffers=0)
    g.drv.queues[EVENTQ].add([], [2])
    dev = restore(rig, dev, g, CID)  # a TRANSPORT_RESET is due, with nowhere to put it
    with pytest.raises(DeviceNeedsReset):
        g.pump_until(lambda: False, 5)
    assert "event chain" in dev.broken


def test_rx_buffers_with_room_for_a_header_only_carry_control_packets(rig):
    dev, g = rig.vsock(rx_buffers=0, rx_buf_size=0)
    g.post(RX, 2)  # header-only buffers; the connect's RESPONSE fits
    s, prog = connected(rig, g, 5000)
    data = pattern(50_000, b"tiny")
    prog.sendall(data)
    g.pump_until(lambda: len(g.seen) >= 6, 5)  # each reposted buffer is used, none spun on
    assert {h.op for h in list(g.seen)[1:]} == {OP_CREDIT_UPDATE} and not s.rx
    g.rx_layout = [HDR.size, 4096]
    g.post(RX, 8)
    assert s.recv_exactly(len(data)) == data
    assert dev.run_state.value == "running"


# -- resources --


def test_replies_wait_in_a_bounded_queue_and_all_are_answered(rig):
    dev, g = rig.vsock(rx_buffers=0, queue_size=64)
    total = 3 * vs.REPLY_LIMIT
    sent = 0
    q = g.drv.queues[TX]
    deadline = time.monotonic() + 3
    while sent < total and time.monotonic() < deadline:
        q.poll()
        if q.free_slots():
            q.add([header(g, src_port=60000 + sent).pack()], [])
            g.drv.kick(TX)
            sent += 1
        else:
            time.sleep(0.01)
    assert vs.REPLY_LIMIT <= sent < total  # the device stopped taking packets
    assert len(dev._replies) <= vs.REPLY_LIMIT + vs.BATCH
    g.post(RX, 64)
    while sent < total:
        g.send_raw([header(g, src_port=60000 + sent).pack()])
        sent += 1
    g.pump_until(lambda: len(g.unmatched) == total, 20)
    assert sorted(h.dst_port for h in g.unmatched) == list(range(60000, 60000 + total))
    still_works(rig, g)


def test_connections_beyond_the_limit_are_refused(rig):
    dev, g = rig.vsock(dev={"max_connections": 3})
    srv = rig.listen(5000)
    socks = [g.connect(5000) for _ in range(3)]
    progs = [accept(srv) for _ in range(3)]
    with pytest.raises(VsockError, match="refused"):
        g.connect(5000)
    g.listen(80)
    prog = rig.host_connect(80)
    assert prog.recv(16) == b""  # the host's connection is refused too
    socks[0].close()
    assert progs[0].recv(1) == b""
    wait_until(lambda: len(dev.conns) == 2)
    s = g.connect(5000)
    s.send(b"room again")
    assert recv_all(accept(srv), 10) == b"room again"


def test_a_guest_that_never_answers_a_host_connect(rig, monkeypatch):
    monkeypatch.setattr(vs, "CONNECT_TIMEOUT", 0.3)
    dev, g = rig.vsock()
    prog = rig.host_connect(80)  # the guest does not pump: no answer
    assert prog.recv(16) == b""  # closed after the timeout, no OK
    wait_until(lambda: not dev.conns.by_fd)
    g.pump_until(lambda: len(g.seen) == 2, 5)  # the REQUEST, then the RST that ended it
    assert [h.op for h in g.seen] == [OP_REQUEST, OP_RST]


@pytest.mark.parametrize(
    "line",
    [b"CONNECT abc\n", b"HELLO 5\n", b"CONNECT 99999999999\n", b"X" * 40, b"CONNECT  5\n"],
)
def test_host_programs_with_a_bad_connect_line_are_closed(rig, line):
    dev, g = rig.vsock()
    g.listen(5)
    prog = socket.socket(socket.AF_UNIX)
    prog.settimeout(5)
    prog.connect(rig.path)
    prog.sendall(line)
    assert closed(prog)
    assert not dev.conns.by_fd and dev.host.refused == 1
    good = rig.host_connect(5)
    s = g.accept(5)
    assert read_line(good) == b"OK %d\n" % s.peer_port


def test_a_program_that_leaves_before_ok_leaves_nothing_behind(rig):
    dev, g = rig.vsock()
    g.listen(5)
    for _ in range(5):
        rig.host_connect(5).close()  # gone before the guest could answer
    wait_until(lambda: dev.stats.resets == 5 and not dev.conns.by_fd)
    g.pump(0.2)  # REQUESTs the guest accepted are reset: none stays open
    assert all(s.state == "closed" for s in g.listeners[5][1])
    g.listeners[5][1].clear()
    good = rig.host_connect(5)
    s = g.accept(5)
    assert read_line(good) == b"OK %d\n" % s.peer_port


def test_a_host_program_that_never_sends_its_line_is_closed(tmp_path):
    host = HybridVsock(tmp_path / "v.sock", handshake_timeout=0.3)
    dev = VsockDevice(CID, host)
    try:
        prog = socket.socket(socket.AF_UNIX)
        prog.settimeout(5)
        prog.connect(str(tmp_path / "v.sock"))
        prog.sendall(b"CONNECT 1")  # no newline, ever
        assert closed(prog)
        assert host.refused == 1
    finally:
        dev.close()


def test_a_host_seqpacket_message_bigger_than_the_guest_can_hold_resets(rig):
    _, g = rig.vsock(buf_alloc=8192)
    srv = rig.listen(6000, socket.SOCK_SEQPACKET)
    s = g.connect(6000, TYPE_SEQPACKET)
    prog = accept(srv)
    prog.send(b"fits")
    assert s.recv_msg() == b"fits"
    prog.send(bytes(8193))
    g.pump_until(lambda: s.state == "closed", 5)
    assert s.reset and not s.msgs


def test_a_seqpacket_connect_to_a_stream_listener_is_refused(rig):
    _, g = rig.vsock()
    rig.listen(6001)  # SOCK_STREAM
    with pytest.raises(VsockError, match="refused"):
        g.connect(6001, TYPE_SEQPACKET)
    still_works(rig, g)


# -- states --


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("guest_cid", 2, "guest_cid"),
        ("guest_cid", 0xFFFFFFFF, "guest_cid"),
        ("next_port", 5, "next_port"),
        ("dropped", [{"local_port": 1}], "missing fields"),
        ("uds", 7, "wrong type"),
    ],
)
def test_a_bad_state_is_refused_and_changes_nothing(rig, field, value, message):
    dev, _ = rig.vsock()
    state = dev.save_state()
    state[field] = value
    fresh = VsockDevice(9, HybridVsock(rig.tmp / "other.sock"))
    try:
        with pytest.raises(StateError, match=message):
            fresh.load_state(state)
        assert fresh.cid == 9 and not fresh.wants_poll(fresh.queues[EVENTQ])
    finally:
        fresh.close()


# -- any well-formed chain, any header: RST at worst, never a broken device --

U32 = st.integers(0, 0xFFFFFFFF)
PACKET = st.fixed_dictionaries(
    {
        "to_conn": st.booleans(),
        "src_cid": st.one_of(st.just(CID), st.integers(0, 2**64 - 1)),
        "dst_cid": st.one_of(st.just(HOST_CID), st.integers(0, 2**64 - 1)),
        "src_port": U32,
        "dst_port": st.one_of(st.just(5000), U32),
        "len": st.one_of(st.just(-1), st.integers(0, 200), U32),  # -1: the payload's
        "type": st.one_of(st.sampled_from([TYPE_STREAM, TYPE_SEQPACKET]), st.integers(0, 0xFFFF)),
        "op": st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
        "flags": st.one_of(st.integers(0, 3), U32),
        "buf_alloc": U32,
        "fwd_cnt": U32,
        "payload": st.binary(max_size=150),
    }
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packets=st.lists(PACKET, min_size=1, max_size=10))
def test_any_packet_is_answered_and_the_device_carries_on(tmp_path_factory, packets):
    rig = Rig(tmp_path_factory.mktemp("vsock"))
    try:
        dev, g = rig.vsock()
        g.listen(1234)
        s, prog = connected(rig, g, 5000)
        prog.setblocking(False)
        for p in packets:
            fields = {k: v for k, v in p.items() if k not in ("to_conn", "payload")}
            if p["to_conn"]:
                fields.update(src_port=s.local_port, dst_port=s.peer_port)
            if fields["len"] == -1:
                fields["len"] = len(p["payload"])
            send(g, Header(**fields), p["payload"])
            g.pump(0)
        g.pump(0.05)
        assert dev.run_state.value == "running", dev.broken
        still_works(rig, g)
    finally:
        rig.close()


def test_the_host_socket_left_by_a_killed_emu_is_taken_over(tmp_path):
    path = tmp_path / "v.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: as after a crash
    stale.close()
    HybridVsock(path).close()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(OSError, match="another program listens there"):
            HybridVsock(path)
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="in use"):
        HybridVsock(path)
