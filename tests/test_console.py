"""virtio-console end to end: reference driver -> mmio transport -> ConsoleDevice -> chardev."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from modes import RING_MODES, wait_until

from emu import queue as emu_queue
from emu.backends.chardev import BufferChar, CharBackend, PtyChar, SocketChar
from emu.devices import console as con
from emu.devices.console import ConsoleDevice
from emu.memory import GuestMemory
from emu.testing.console import BAD_ID, ControlMsg, GuestConsole
from emu.testing.driver import VirtioMmioDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport


class Rig:
    def __init__(self) -> None:
        self.parts: list[tuple[ConsoleDevice, GuestMemory, VirtioMmioDriver]] = []

    def console(
        self, backend: CharBackend | None, *, dev: dict | None = None, **guest
    ) -> tuple[ConsoleDevice, GuestConsole]:
        d = ConsoleDevice(backend, **(dev or {}))
        mem = GuestMemory.create(16 << 20)
        drv = VirtioMmioDriver(MmioTransport(d, mem), mem)
        self.parts.append((d, mem, drv))
        return d, GuestConsole(drv, **guest)

    def close(self) -> None:
        for d, mem, drv in self.parts:
            drv.reset()
            d.close()
            mem.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def multiport_dev(**ports: CharBackend) -> dict:
    """Port 1 named "org.emu.one" and unnamed port 3 (port 2 is left out on purpose)."""
    return {
        "multiport": True,
        "max_ports": 4,
        "ports": {1: ("org.emu.one", ports["one"]), 3: ("", ports["three"])},
    }


@pytest.mark.parametrize("mode", RING_MODES)
def test_port0_output_and_input(rig, mode):
    b = BufferChar()
    _, g = rig.console(b, **mode)
    assert not g.multiport
    g.write(0, b"hello, console\n")
    assert b.wait_output(15) == b"hello, console\n"
    data = bytes(range(256)) * 3  # spans many 64-byte rx buffers
    b.feed(data)
    assert g.read(0, len(data)) == data


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_both_ring_cores(rig, monkeypatch, impl):
    if impl == "cython" and emu_queue._cring is None:
        pytest.skip("emu._ring is not built")
    monkeypatch.setenv("EMU_RING", impl)
    b = BufferChar()
    d, g = rig.console(b, packed=True)
    for i in range(50):  # laps of the 32-entry rings
        g.write(0, b"%d;" % i)
        b.feed(b"<%d>" % i)
        assert g.read(0, len(b"<%d>" % i)) == b"<%d>" % i
    assert b.wait_output(len(b"".join(b"%d;" % i for i in range(50))))
    assert d.queues[0].ring.__class__.__module__ == emu_queue.ring_module(impl).__name__


def test_input_before_the_driver_is_kept(rig):
    b = BufferChar()
    b.feed(b"typed early")
    _, g = rig.console(b)
    assert g.read(0, 11) == b"typed early"


def test_input_backlog_is_bounded_and_nothing_is_lost(rig):
    b = BufferChar()
    d, g = rig.console(b, rx_buffers=4)
    data = os.urandom(3 * con.BACKLOG)
    b.feed(data)
    # 4 x 64 bytes went to the guest, the device holds one backlog, the rest waits upstream
    wait_until(lambda: len(d.ports[0].backlog) == con.BACKLOG)
    assert b.pending() == len(data) - con.BACKLOG - 4 * 64
    assert g.read(0, len(data), timeout=30) == data


def test_emergency_write_and_config(rig):
    b = BufferChar()
    _, g = rig.console(b, dev={"cols": 132, "rows": 43})
    assert (g.drv.config_read(0, 2), g.drv.config_read(2, 2)) == (132, 43)
    assert g.drv.config_read(4, 4) == 1
    g.drv.config_write(con.EMERG_WR_OFFSET, 4, ord("!"))
    assert b.wait_output(1) == b"!"


def test_resize_without_multiport_is_a_config_change(rig):
    d, g = rig.console(BufferChar())
    before = g.drv.config_interrupts
    d.resize(100, 40)
    wait_until(lambda: g.drv.handle_interrupt() or g.drv.config_interrupts > before)
    assert (g.drv.config_read(0, 2), g.drv.config_read(2, 2)) == (100, 40)


@pytest.mark.parametrize("mode", RING_MODES[::3])
def test_multiport_handshake_and_port_data(rig, mode):
    b0, b1, b3 = BufferChar(), BufferChar(), BufferChar()
    d, g = rig.console(b0, dev=multiport_dev(one=b1, three=b3), **mode)
    assert g.multiport and g.max_ports == 4
    msgs = g.handshake(ports=3, replies=5)
    key = [(m.id, m.event, m.value, m.extra) for m in msgs]
    assert key[:3] == [(p, con.DEVICE_ADD, 0, b"") for p in (0, 1, 3)]
    assert sorted(key[3:]) == [
        (0, con.CONSOLE_PORT, 1, b""),
        (0, con.PORT_OPEN, 1, b""),
        (1, con.PORT_OPEN, 1, b""),
        (1, con.PORT_NAME, 1, b"org.emu.one"),
        (3, con.PORT_OPEN, 1, b""),
    ]
    wait_until(lambda: d.ports[0].guest_open)  # the helper answered CONSOLE_PORT
    # port 1: input waits until the guest opens the port, output flows at once
    b1.feed(b"for port one")
    wait_until(lambda: d.ports[1].backlog == b"for port one")
    assert g.drv.queues[con.rx_queue(1)].poll() == []
    g.send_control(1, con.PORT_OPEN, 1)
    assert g.read(1, 12) == b"for port one"
    g.write(1, b"from port one")
    assert b1.wait_output(13) == b"from port one"
    g.write(0, b"console")
    assert b0.wait_output(7) == b"console"
    g.write(3, b"three")
    assert b3.wait_output(5) == b"three"
    assert b0.output == b1.output == b3.output == b""


def test_multiport_resize_sends_a_control_message(rig):
    d, g = rig.console(BufferChar(), dev=multiport_dev(one=BufferChar(), three=BufferChar()))
    g.handshake(ports=3, replies=5)
    d.resize(120, 50)
    assert g.recv_control() == [ControlMsg(0, con.RESIZE, 0, struct.pack("<HH", 120, 50))]


def test_hostile_control_messages_are_ignored(rig):
    d, g = rig.console(BufferChar(), dev=multiport_dev(one=BufferChar(), three=BufferChar()))
    g.send_control(0, 0, raw=b"\x00\x00\x00")  # short
    g.send_control(0, 0, raw=b"")  # empty
    g.send_control(7, con.PORT_READY, 1)  # id >= max_nr_ports
    g.send_control(BAD_ID, con.PORT_OPEN, 1)
    g.send_control(2, con.PORT_READY, 1)  # a port that does not exist
    g.send_control(0, con.PORT_READY, 1)  # before DEVICE_ADD
    g.send_control(0, 0x7777, 1)  # unknown event
    g.send_control(BAD_ID, con.DEVICE_READY, 0)  # "the driver failed"
    assert g.drv.queues[con.CTRL_RX].poll() == []
    msgs = g.handshake(ports=3, replies=5)  # the device still works
    assert len(msgs) == 8 and d.broken is None
    g.send_control(0, 0, raw=con.CTRL_MSG.pack(3, con.PORT_OPEN, 1) + b"trailing bytes")
    assert d.ports[3].guest_open
    g.send_control(0, 0, raw=bytes(con.CTRL_TX_MAX + 1))  # too long: not even read
    g.send_control(BAD_ID, con.DEVICE_READY, 1)  # again: ports must not be added twice
    g.send_control(1, con.PORT_READY, 1)  # again: no second PORT_NAME
    d.resize(90, 30)
    assert g.recv_control() == [ControlMsg(0, con.RESIZE, 0, struct.pack("<HH", 90, 30))]


def test_constructor_refuses_bad_port_layouts():
    with pytest.raises(ValueError):
        ConsoleDevice(BufferChar(), ports={1: ("x", BufferChar())})  # needs multiport
    with pytest.raises(ValueError):
        ConsoleDevice(BufferChar(), multiport=True, max_ports=2, ports={2: ("x", BufferChar())})


def test_pty_round_trip(rig):
    pty = PtyChar()
    _, g = rig.console(pty)
    fd = os.open(pty.path, os.O_RDWR | os.O_NOCTTY)
    try:
        g.write(0, b"to the pty\r\n")
        got = b""
        while len(got) < 12:
            got += os.read(fd, 64)
        assert got == b"to the pty\r\n"  # raw mode: bytes unchanged
        os.write(fd, b"from the pty\n")
        assert g.read(0, 13) == b"from the pty\n"
    finally:
        os.close(fd)


def test_socket_round_trip_and_port_open_follows_the_client(rig, tmp_path):
    sock = SocketChar(tmp_path / "port1.sock")
    d, g = rig.console(BufferChar(), dev=multiport_dev(one=sock, three=BufferChar()))
    # port 1 has no client yet: PORT_NAME but no PORT_OPEN
    msgs = g.handshake(ports=3, replies=4)
    assert (1, con.PORT_OPEN) not in [(m.id, m.event) for m in msgs]
    g.send_control(1, con.PORT_OPEN, 1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(sock.path)
    try:
        assert g.recv_control() == [ControlMsg(1, con.PORT_OPEN, 1)]
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(sock.path)
        assert second.recv(16) == b""  # one client at a time
        second.close()
        client.sendall(b"over the socket")
        assert g.read(1, 15) == b"over the socket"
        g.write(1, b"back again")
        got = b""
        while len(got) < 10:
            got += client.recv(64)
        assert got == b"back again"
    finally:
        client.close()
    assert g.recv_control() == [ControlMsg(1, con.PORT_OPEN, 0)]
    g.write(1, b"nobody listens")
    wait_until(lambda: sock.dropped == 14)


def test_a_queue_reset_of_tx_does_not_swallow_later_writes(rig, monkeypatch):
    """Output written while the driver resets the tx queue is owed only its completion;
    the reset ring hands that head out again for new output, which must be written."""
    b = BufferChar()
    d, g = rig.console(b)
    txq = d.queues[1]
    in_write = threading.Event()
    real_write = d._write_out

    def write_during_reset(port, c):
        in_write.set()
        wait_until(lambda: txq.gate is not emu_queue.Gate.OPEN, 5)
        real_write(port, c)

    monkeypatch.setattr(d, "_write_out", write_during_reset)
    g.drv.submit(1, [b"first "], [])
    assert in_write.wait(5)
    g.drv._write(mmio_regs.QUEUE_SEL, 1)
    g.drv._write(mmio_regs.QUEUE_RESET, 1)  # returns once the device is off the queue
    monkeypatch.setattr(d, "_write_out", real_write)
    g.drv.setup_queue(1, 32)
    g.write(0, b"second")
    assert b.wait_output(12) == b"first second"
