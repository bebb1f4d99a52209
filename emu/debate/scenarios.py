"""Each device type run by the reference driver into a state worth saving, then stopped
under ``report`` with requests in flight: what (c) breaks down part by part.

Every device gets the state a guest typically gives it: net a MAC filter, VLANs and
frames waiting for rx buffers; console open ports and input the guest has not read; fs
files looked up and open; vsock a connection to a host program with bytes under way;
balloon pages inflated and memory statistics; blk a cache mode chosen by the guest.
Then ``IN_FLIGHT`` requests per request queue are fetched and held (their used entries
never published before the stop), so RING_STATE and INFLIGHT carry real chains.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from emu.backends.chardev import BufferChar
from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.state.format import DeviceState
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

KINDS = ("blk", "net", "console", "rng", "fs", "vsock", "balloon")
RAM = 16 << 20
BLOCK = 4096
IN_FLIGHT = 4
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000000ff")
#: how long fetched requests must stay put before the stop (the device took them all)
SETTLE = 0.05


class Sink:
    """Net backend that keeps nothing: frames the device sends are counted only."""

    def __init__(self) -> None:
        self.sent = 0

    def attach(self, device: object) -> None:
        pass

    def send(self, frame: bytes) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


@dataclass
class Saved:
    """A device stopped under ``report`` and its snapshot."""

    kind: str
    state: DeviceState


def _frame(payload: bytes, dst: bytes = PEER) -> bytes:
    from emu.testing.net import ether

    return ether(dst, PEER if dst == MAC else MAC, payload.ljust(46, b"."))


def _settle(dev: VirtioDevice, timeout: float = 5.0) -> None:
    """Until the chains in flight stop changing: the device took what it was given."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = [len(q.inflight()) if q.started else 0 for q in dev.queues]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > SETTLE:
            return
        time.sleep(0.005)


Prepare = Callable[[VirtioMmioDriver], Callable[[], object]]


def _blk(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices.blk import SECTOR, T_IN, T_OUT, BlkDevice
    from emu.testing.blk import BlkDriver

    disk = tmp / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    dev = BlkDevice(disk, serial="debate-disk")

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        blk = BlkDriver.open(drv, queue_size=64)
        drv.config_write(32, 1, 0)  # the guest chose writethrough
        assert blk.write(0, b"\x01" * BLOCK) == 0

        def submit() -> None:
            for i in range(IN_FLIGHT):
                blk.submit(T_OUT, (1 + i) * BLOCK // SECTOR, bytes([0x40 + i]) * BLOCK)
                blk.submit(T_IN, (64 + i) * BLOCK // SECTOR, in_size=BLOCK)

        return submit

    return dev, prepare


def _net(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices import net_defs as nd
    from emu.devices.net import NetDevice
    from emu.testing.net import GuestNet

    dev = NetDevice(Sink(), mac=MAC.hex(":"))

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        g = GuestNet(drv, queue_size=64, rx_buffers=0)  # frames wait in the backlog
        g.rx_mode(nd.RX_ALLMULTI, True)
        g.mac_table([bytes.fromhex("52540000aaaa")], [bytes.fromhex("01005e000001")])
        g.ctrl(nd.CTRL_VLAN, nd.VLAN_ADD, struct.pack("<H", 5))

        def submit() -> None:
            for i in range(IN_FLIGHT):
                drv.submit(1, [bytes(g.hdr_len), _frame(b"out %d" % i)], [])
                dev.deliver(_frame(b"in %d" % i, dst=MAC))

        return submit

    return dev, prepare


def _console(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices import console as con
    from emu.devices.console import ConsoleDevice
    from emu.testing.console import GuestConsole

    chardev = BufferChar()
    port1 = BufferChar()
    dev = ConsoleDevice(chardev, multiport=True, max_ports=2, ports={1: ("org.emu.debate", port1)})

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        g = GuestConsole(drv, queue_size=64, rx_buffers=8, rx_buf_size=16)
        g.handshake(ports=2, replies=4)
        g.send_control(1, con.PORT_OPEN, 1)
        g.write(0, b"hello;")

        def submit() -> None:
            for i in range(IN_FLIGHT):
                drv.submit(1, [b"w%03d;" % i], [])
            chardev.feed(b"typed but not read yet;" * 8)

        return submit

    return dev, prepare


def _rng(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices.rng import RngDevice
    from emu.testing.rng import RngDriver

    dev = RngDevice()

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        rng = RngDriver.open(drv, queue_size=64)
        assert len(rng.read(16)) == 16
        return lambda: [drv.submit(0, [], [16]) for _ in range(IN_FLIGHT)]

    return dev, prepare


def _fs(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices import fuse as f
    from emu.devices.fs import FsDevice
    from emu.testing.fs import FuseClient, in_header

    share = tmp / "share"
    (share / "docs").mkdir(parents=True)
    for i in range(3):
        (share / "docs" / f"file{i}.txt").write_bytes(b"debate %d\n" % i * 100)
    dev = FsDevice(share, tag="debate")

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        fs = FuseClient.connect(drv, queue_size=64)
        handles = []
        for i in range(3):
            entry = fs.walk(f"docs/file{i}.txt")
            handles.append((entry.node, fs.open(entry.node)))
        node, fh = handles[0]

        def submit() -> None:
            for i in range(IN_FLIGHT):
                args = f.READ_IN.pack(fh, 100 * i, 64, 0, 0, 0, 0)
                hdr = in_header(f.Op.READ, node, 5000 + 2 * i, len(args))
                drv.submit(1, [hdr + args], [16, 64])

        return submit

    return dev, prepare


def _vsock(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.backends.hybrid_vsock import HybridVsock
    from emu.devices.vsock import VsockDevice
    from emu.devices.vsock_defs import OP_RW
    from emu.testing.vsock import GuestVsock

    uds = tmp / "v.sock"
    dev = VsockDevice(3, HybridVsock(uds))

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        server = socket.socket(socket.AF_UNIX)
        server.bind(f"{uds}_5000")
        server.listen()
        g = GuestVsock(drv, queue_size=64, rx_buffers=8)
        s = g.connect(5000)
        program, _ = server.accept()
        server.close()
        keep.append(program)  # the host program: open until the scenario ends

        def submit() -> None:
            for i in range(IN_FLIGHT):
                g.send_packet(s, OP_RW, b"to the host program %d;" % i)

        return submit

    return dev, prepare


def _balloon(tmp: Path, keep: list) -> tuple[VirtioDevice, Prepare]:
    from emu.devices.balloon import BalloonDevice
    from emu.testing.balloon import BalloonDriver

    dev = BalloonDevice()

    def prepare(drv: VirtioMmioDriver) -> Callable[[], object]:
        bal = BalloonDriver.open(drv, queue_size=64, initial_stats={4: 1 << 20, 5: 3 << 20})
        dev.set_target(64)
        bal.inflate(bal.take_pages(16))
        bal.set_actual(16)
        pages = bal.take_pages(IN_FLIGHT)
        return lambda: [drv.submit(bal.q["inflate"], [struct.pack("<I", p)], []) for p in pages]

    return dev, prepare


SETUPS = {
    "blk": _blk,
    "net": _net,
    "console": _console,
    "rng": _rng,
    "fs": _fs,
    "vsock": _vsock,
    "balloon": _balloon,
}


@contextlib.contextmanager
def stopped(kind: str, tmp: Path) -> Iterator[Saved]:
    """``kind`` run, ``IN_FLIGHT`` requests held in flight, stopped under report, saved."""
    mem = GuestMemory.create(RAM)
    keep: list = []
    dev, prepare = SETUPS[kind](tmp, keep)
    try:
        tr = MmioTransport(dev, mem)
        submit = prepare(VirtioMmioDriver(tr, mem))
        for q in dev.queues:
            hold_completions(q, 3600.0)  # nothing published before the stop
        submit()
        _settle(dev)
        tr.vmm_stop("report")
        yield Saved(kind, tr.save())
    finally:
        dev.close()
        for s in keep:
            s.close()
        mem.close()
