"""Device-specific snapshot behaviour: what each device keeps, and what it refuses.

blk stops between the requests of a batch; net keeps its rx filter, MAC and VLAN tables,
queue pairs and backlog; console keeps its ports' handshake and open state and the input
the guest has not taken yet. Every ``load_state`` refuses a bad field before changing
anything.
"""

from __future__ import annotations

import copy
import struct
import threading
from pathlib import Path

import pytest

from emu.backends.chardev import BufferChar
from emu.devices import console as con
from emu.devices import net_defs
from emu.devices._chain import Unpublished
from emu.devices.blk import SECTOR, T_OUT, BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice, flow_hash
from emu.devices.rng import RngDevice
from emu.devices.snapshot import restore_device, save_device
from emu.memory import GuestMemory
from emu.state import file as statefile
from emu.state.format import StateError
from emu.testing.blk import BlkDriver, header
from emu.testing.console import ControlMsg, GuestConsole
from emu.testing.driver import VirtioMmioDriver
from emu.testing.net import GuestNet, ether
from emu.transport.mmio import MmioTransport

BLOCK = 4096


@pytest.fixture
def mem():
    m = GuestMemory.create(16 << 20)
    yield m
    m.close()


def swap_device(
    drv: VirtioMmioDriver, mem: GuestMemory, fresh, path: Path
) -> tuple[VirtioMmioDriver, MmioTransport]:
    """Save the (stopped) device behind ``drv`` to ``path``; a fresh one takes over."""
    statefile.save(path, drv.transport.save())
    saved = drv.save()
    drv.transport.device.close()
    tr = MmioTransport(fresh, mem)
    new = VirtioMmioDriver.load(tr, mem, saved)
    tr.restore(statefile.load(path))
    return new, tr


# -- blk --


def test_blk_report_stop_lands_between_requests_of_a_batch(tmp_path, mem):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * BLOCK))
    dev = BlkDevice(image, plane="python")  # hooks a handler of the Python path
    tr = MmioTransport(dev, mem)
    blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
    write = dev._handlers[T_OUT]
    calls = []

    def write_then_stop(r):  # the stop arrives while the third request runs
        calls.append(r.sector)
        if len(calls) == 3:  # from another thread, as a VMM's stop comes (from the device
            # thread itself it would run inline and could report STOPPED before this write)
            vmm = threading.Thread(target=dev.request_stop, args=("report",))
            vmm.start()
            vmm.join()
        return write(r)

    dev._handlers[T_OUT] = write_then_stop
    q = blk.drv.queues[0]
    tokens = [
        q.add([header(T_OUT, i * BLOCK // SECTOR), bytes([i + 1]) * BLOCK], [1]) for i in range(8)
    ]
    blk.drv.kick(0)  # one kick: all eight come in one batch
    assert dev.wait_stopped(10)
    disk = image.read_bytes()
    ran = [i for i in range(8) if disk[i * BLOCK] == i + 1]
    assert ran == [0, 1, 2]  # the syscall under way finished; the rest did not run
    assert len(dev.queues[0].inflight()) == 8  # and nothing was published
    drv, _ = swap_device(blk.drv, mem, BlkDevice(image), tmp_path / "blk.state")
    done = drv.wait(0, 8)
    assert sorted(c.token for c in done) == tokens
    assert all(c.data[-1] == 0 for c in done)
    assert image.read_bytes()[: 8 * BLOCK] == b"".join(bytes([i + 1]) * BLOCK for i in range(8))
    drv.transport.device.close()


def test_blk_writeback_mode_and_serial_survive(tmp_path, mem):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * BLOCK))
    dev = BlkDevice(image, serial="disk-one")
    tr = MmioTransport(dev, mem)
    blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
    blk.drv.config_write(32, 1, 0)  # writethrough
    tr.vmm_stop("drain")
    drv, tr2 = swap_device(blk.drv, mem, BlkDevice(image, serial="other"), tmp_path / "s")
    blk.drv = drv
    assert drv.config_read(32, 1) == 0 and tr2.device.writethrough
    assert blk.get_id().rstrip(b"\0") == b"disk-one"
    tr2.device.close()


# -- net --

MAC = bytes.fromhex("525400000001")
PEER = bytes.fromhex("525400000099")
UNI_X = bytes.fromhex("52540000aaaa")
MC_M = bytes.fromhex("01005e000001")
MC_OTHER = bytes.fromhex("01005e000002")


class Sink:
    def attach(self, device: NetDevice) -> None:
        self.device = device

    def send(self, frame: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def vlan_frame(vid: int, payload: bytes) -> bytes:
    return MAC + PEER + struct.pack(">HH", 0x8100, vid) + b"\x88\xb5" + payload.ljust(46, b".")


def test_net_filter_tables_pairs_and_backlog_survive(tmp_path, mem):
    dev = NetDevice(Sink(), mac=MAC.hex(":"), queue_pairs=2)
    tr = MmioTransport(dev, mem)
    g = GuestNet(VirtioMmioDriver(tr, mem), rx_buffers=0)  # frames wait in the backlog
    assert g.set_pairs(2) == net_defs.ACK_OK
    assert g.rx_mode(net_defs.RX_ALLMULTI, False) == net_defs.ACK_OK
    assert g.mac_table([UNI_X], [MC_M]) == net_defs.ACK_OK
    assert g.ctrl(net_defs.CTRL_VLAN, net_defs.VLAN_ADD, struct.pack("<H", 5)) == net_defs.ACK_OK
    frames = [
        ether(dst, PEER, b"to %d" % i)
        for i, dst in enumerate([MAC, UNI_X, PEER, MC_M, MC_OTHER, b"\xff" * 6])
    ]
    frames += [vlan_frame(5, b"vlan 5"), vlan_frame(6, b"vlan 6")]
    verdicts = [dev.filter.accepts(f, dev.mac) for f in frames]
    assert verdicts == [True, True, False, True, False, True, True, False]
    accepted = [f for f, ok in zip(frames, verdicts, strict=True) if ok]
    for f in frames:
        dev.deliver(f)
    tr.vmm_stop("drain")
    old = dev.filter
    fresh = NetDevice(Sink(), mac="52:54:00:00:00:02", queue_pairs=2)
    drv, tr2 = swap_device(g.drv, mem, fresh, tmp_path / "net.state")
    g.drv = drv
    assert fresh.filter == old and fresh.active_pairs == 2 and g.mac == MAC
    assert [fresh.filter.accepts(f, fresh.mac) for f in frames] == verdicts

    def received(want: list[bytes]) -> None:
        for pair in (0, 1):
            mine = [f for f in want if flow_hash(f) % 2 == pair]
            g.post_rx(pair, len(mine))
            assert [g.recv(pair)[1] for _ in mine] == mine

    received(accepted)  # the backlog, frames in order, on the pair their flow hashes to
    for f in frames:  # and the restored filter lets the same frames through
        fresh.deliver(f)
    received(accepted)
    for pair in (0, 1):
        assert drv.queues[2 * pair].poll() == []
    tr2.device.close()


# -- console --


def test_console_ports_stay_open_and_input_waits_for_its_port(tmp_path, mem):
    def device(b0: BufferChar, b1: BufferChar, b3: BufferChar) -> ConsoleDevice:
        ports = {1: ("org.emu.one", b1), 3: ("", b3)}
        return ConsoleDevice(b0, multiport=True, max_ports=4, ports=ports)

    old = [BufferChar() for _ in range(3)]
    dev = device(*old)
    tr = MmioTransport(dev, mem)
    g = GuestConsole(VirtioMmioDriver(tr, mem))
    g.handshake(ports=3, replies=5)
    g.send_control(1, con.PORT_OPEN, 1)
    old[2].feed(b"for three")  # port 3: the guest has not opened it, so this waits
    g.write(1, b"before")
    assert old[1].wait_output(6) == b"before"
    assert dev.ports[1].guest_open and not dev.ports[3].guest_open
    tr.vmm_stop("report")
    dev.resize(100, 40)  # while stopped: the RESIZE message waits in the snapshot
    new = [BufferChar() for _ in range(3)]
    fresh = device(*new)
    drv, tr2 = swap_device(g.drv, mem, fresh, tmp_path / "console.state")
    g.drv = drv
    assert fresh.ports[3].backlog == b"for three"
    assert [(p.added, p.ready, p.guest_open) for p in fresh.ports.values()] == [
        (True, True, True),
        (True, True, True),
        (True, True, False),
    ]
    # no second handshake: the only control message is the one queued while stopped
    assert g.recv_control() == [ControlMsg(0, con.RESIZE, 0, struct.pack("<HH", 100, 40))]
    assert drv.queues[con.CTRL_RX].poll() == []
    assert (drv.config_read(0, 2), drv.config_read(2, 2)) == (100, 40)
    new[1].feed(b"to one")  # port 1 is still open: no PORT_OPEN needed
    assert g.read(1, 6) == b"to one"
    g.write(1, b"after")
    assert new[1].wait_output(5) == b"after"
    g.send_control(3, con.PORT_OPEN, 1)
    assert g.read(3, 9) == b"for three"
    fresh.close()


# -- load_state refuses bad fields and changes nothing --


def refused(dev, state: dict, message: str) -> None:
    before = dev.save_state()
    with pytest.raises(StateError, match=message):
        dev.load_state(state)
    assert dev.save_state() == before


def edited(state: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(state)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


NET_BAD = [
    (("mac",), "zz", "not a MAC address"),
    (("rx_mode", "promisc"), "yes", "field 'promisc' has the wrong type"),
    (("uni",), ["52540000"], "uni table"),
    (("multi",), ["01005e000001"] * 65, "'multi' is longer than 64"),
    (("vlans",), [4096], r"'vlans'\[0\] 4096 is outside"),
    (("active_pairs",), 2, "active_pairs 2 is outside 1..1"),
    (("status",), 9, "'status' 9 is outside"),
    (("guest_offloads",), 1 << 3, "guest offloads"),
    (("backlog",), [[], []], "2 queue pairs, this one has 1"),
    (("backlog", 0), ["not base64!"], "bad base64"),
    (("backlog", 0), ["AAAA"] * 600, "holds more than 512 frames"),
    (("tx_sent", 0), [256], "tx head 256"),
    (("stats", "rx_frames"), None, "field 'rx_frames' has the wrong type"),
    (("surprise",), 1, "unknown fields"),
]


@pytest.mark.parametrize("path, value, message", NET_BAD, ids=[m for _, _, m in NET_BAD])
def test_net_bad_state_refused(path, value, message):
    dev = NetDevice(Sink())
    dev.deliver(ether(dev.mac, PEER, b"x" * 46))  # something in the inbox to keep
    dev.on_wake()
    refused(dev, edited(dev.save_state(), path, value), message)
    dev.close()


CONSOLE_BAD = [
    (("max_ports",), 8, "max_ports 8, this device 4"),
    (("ports", 1, "name"), "org.emu.two", "snapshot has ports"),
    (("ports", 0, "input"), "%%%", "bad base64"),
    (("ports", 0, "guest_open"), 1, "field 'guest_open' has the wrong type"),
    (("ports", 0, "tx_sent"), [-1], r"'tx_sent'\[0\] -1 is outside"),
    (("ctrl_out",), ["AAAA"], "shorter than its header"),
    (("cols",), 1 << 16, "'cols' 65536 is outside"),
]


@pytest.mark.parametrize("path, value, message", CONSOLE_BAD, ids=[m for _, _, m in CONSOLE_BAD])
def test_console_bad_state_refused(path, value, message):
    dev = ConsoleDevice(BufferChar(), multiport=True, max_ports=4, ports={1: ("one", BufferChar())})
    dev.ports[0].backlog += b"typed"
    refused(dev, edited(dev.save_state(), path, value), message)
    dev.close()


def test_rng_refuses_state_it_does_not_know():
    dev = RngDevice()
    dev.load_state({})
    with pytest.raises(StateError, match="rng state: unknown fields"):
        dev.load_state({"pool": 1})
    dev.close()


def test_wrong_device_type_refused_with_its_name(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(BLOCK))
    blk, rng = BlkDevice(image), RngDevice()
    state = save_device(blk, 0)
    with pytest.raises(StateError, match=r"device type 2, this is rng \(type 4\)"):
        restore_device(rng, state)
    blk.close()
    rng.close()


# -- the tracker behind "no frame lost, no write repeated" --


def test_unpublished_settles_only_chains_still_in_flight():
    t: Unpublished[str] = Unpublished()
    t.record([1, 2], "frame a")  # one frame over two chains
    t.record([3], "frame b")
    t.record([4], "frame c")
    t.popped([3])  # chain 3 came back from the driver: "frame b" was published
    t.record([1], "frame d")  # head 1 reused: "frame a" was published as a whole
    assert t.settle([2, 3, 4, 1, 9]) == ["frame c", "frame d"]
    assert t.settle([1, 4]) == []  # settled items are forgotten
