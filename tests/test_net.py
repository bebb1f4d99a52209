"""virtio-net end to end: two emu NICs on a Cable, each driven by the reference driver."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest
from modes import RING_MODES, wait_until

from emu import queue as emu_queue
from emu.backends.cable import Cable
from emu.backends.tap import Tap, TapError
from emu.devices import net, net_ctrl, net_defs
from emu.devices.net import NetDevice, flow_hash
from emu.memory import GuestMemory
from emu.testing.driver import VirtioMmioDriver
from emu.testing.net import GuestNet, ether, mac_tables
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
BCAST = b"\xff" * 6
#: what a driver that knows nothing of MQ accepts (VERSION_1 is bit 32)
NO_MQ = net.OFFERED | 1 << net_defs.F_MRG_RXBUF | 1 << 32


def mac(s: str) -> bytes:
    return net.parse_mac(s)


class Rig:
    """Devices, transports and guests created by a test, torn down after it."""

    def __init__(self) -> None:
        self.devices: list[NetDevice] = []
        self.mems: list[GuestMemory] = []
        self.drivers: list[VirtioMmioDriver] = []

    def nic(
        self, backend, *, version: int = 2, dev: dict | None = None, **guest
    ) -> tuple[NetDevice, GuestNet]:
        d = NetDevice(backend, **(dev or {}))
        mem = GuestMemory.create(16 << 20)
        drv = VirtioMmioDriver(MmioTransport(d, mem, version=version), mem)
        self.devices.append(d)
        self.mems.append(mem)
        self.drivers.append(drv)
        return d, GuestNet(drv, **guest)

    def cabled(self, dev_a: dict | None = None, dev_b: dict | None = None, **guest):
        a, b = Cable.pair()
        da, ga = self.nic(a, dev={"mac": MAC_A, **(dev_a or {})}, **guest)
        db, gb = self.nic(b, dev={"mac": MAC_B, **(dev_b or {})}, **guest)
        return da, ga, db, gb

    def close(self) -> None:
        for drv in self.drivers:
            drv.reset()
        for d in self.devices:
            d.close()
        for m in self.mems:
            m.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def payload(i: int, n: int) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(n))


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("mode", RING_MODES)
def test_two_nics_exchange_frames_both_ways(rig, mode, mrg):
    da, ga, db, gb = rig.cabled({"mrg_rxbuf": mrg}, {"mrg_rxbuf": mrg}, **mode)
    assert ga.mac == mac(MAC_A) and gb.mac == mac(MAC_B)
    assert ga.status & net_defs.S_LINK_UP
    assert ga.mrg == mrg and ga.hdr_len == 12
    sizes = [46, 1500, 0, 700, 1]  # Ethernet payload sizes: min, MTU, header-only ...
    for i, n in enumerate(sizes):
        ga.send(ether(gb.mac, ga.mac, payload(i, n)))
        gb.send(ether(ga.mac, gb.mac, payload(i + 100, n)))
    for i, n in enumerate(sizes):
        hdr, frame = gb.recv()
        assert frame == ether(gb.mac, ga.mac, payload(i, n))
        assert hdr == bytes(10) + b"\x01\x00"  # no offloads; num_buffers 1
        hdr, frame = ga.recv()
        assert frame == ether(ga.mac, gb.mac, payload(i + 100, n))
    assert da.stats.tx_frames == db.stats.rx_frames == len(sizes)
    assert db.stats.tx_frames == da.stats.rx_frames == len(sizes)


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_both_ring_cores_carry_frames(rig, monkeypatch, impl):
    if impl == "cython" and emu_queue._cring is None:
        pytest.skip("emu._ring is not built")
    monkeypatch.setenv("EMU_RING", impl)
    da, ga, db, gb = rig.cabled(packed=True)
    for i in range(40):  # a few laps of the 16-entry rx ring
        ga.send(ether(gb.mac, ga.mac, payload(i, 64 + i)))
        assert gb.recv()[1] == ether(gb.mac, ga.mac, payload(i, 64 + i))
    assert db.queues[0].ring.__class__.__module__ == emu_queue.ring_module(impl).__name__


@pytest.mark.parametrize("mode", RING_MODES[::3])
def test_mrg_rxbuf_spreads_a_frame_over_small_buffers(rig, mode):
    _, ga, db, gb = rig.cabled(rx_buf_size=256, **mode)
    frame = ether(gb.mac, ga.mac, payload(1, 1500))
    ga.send(frame)
    hdr, got = gb.recv()
    assert got == frame
    assert struct.unpack_from("<H", hdr, 10)[0] == -(-(12 + len(frame)) // 256)  # 6 buffers


def test_without_mrg_a_frame_bigger_than_the_buffer_is_dropped(rig):
    _, ga, db, gb = rig.cabled({}, {"mrg_rxbuf": False}, rx_buf_size=512)
    ga.send(ether(gb.mac, ga.mac, payload(1, 1000)))  # does not fit 512 - 12
    ga.send(ether(gb.mac, ga.mac, payload(2, 100)))
    # the too-small buffer comes back empty; the guest sees length 0 and then the next frame
    (empty,) = gb.drv.wait(0)
    assert empty.length == 0
    gb.post_rx(0, 1)
    assert gb.recv()[1] == ether(gb.mac, ga.mac, payload(2, 100))
    assert db.stats.rx_too_big == 1


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
def test_legacy_transport_header_and_gso_offer(rig, mrg):
    a, b = Cable.pair()
    _, ga = rig.nic(a, version=1, dev={"mac": MAC_A, "mrg_rxbuf": mrg})
    _, gb = rig.nic(b, version=1, dev={"mac": MAC_B, "mrg_rxbuf": mrg})
    assert ga.features >> net_defs.F_GSO & 1  # legacy-only bit, as QEMU offers it
    assert ga.hdr_len == (12 if mrg else 10)
    frame = ether(gb.mac, ga.mac, payload(3, 300))
    ga.send(frame)
    hdr, got = gb.recv()
    assert got == frame and len(hdr) == ga.hdr_len


def test_legacy_driver_sets_its_mac_through_config_space(rig):
    a, b = Cable.pair()
    _, ga = rig.nic(a, version=1, dev={"mac": MAC_A})
    db, gb = rig.nic(b, version=1, dev={"mac": MAC_B})
    new = mac("52:54:00:00:00:bb")
    for i, byte in enumerate(new):
        gb.drv.config_write(i, 1, byte)
    assert gb.mac == new
    ga.send(ether(mac(MAC_B), ga.mac, b"old address"))
    ga.send(ether(new, ga.mac, b"new address"))
    assert gb.recv()[1] == ether(new, ga.mac, b"new address")
    assert db.stats.rx_filtered == 1


def test_modern_driver_cannot_write_the_mac(rig):
    _, g = rig.nic(Cable(), dev={"mac": MAC_A})
    g.drv.config_write(0, 1, 0x02)
    assert g.mac == mac(MAC_A)


def test_mrg_frame_bigger_than_the_whole_ring_is_dropped(rig):
    _, ga, db, gb = rig.cabled(queue_size=4, rx_buffers=4, rx_buf_size=64)
    ga.send(ether(gb.mac, ga.mac, payload(1, 1000)))  # 4 x 64 bytes can never hold it
    small = ether(gb.mac, ga.mac, payload(2, 30))
    ga.send(small)
    assert gb.recv()[1] == small
    assert db.stats.rx_too_big == 1 and db.stats.rx_frames == 1


def test_modern_transport_hides_gso(rig):
    _, g = rig.nic(Cable())
    assert not g.features >> net_defs.F_GSO & 1


def _receive_until(g: GuestNet, marker: bytes) -> list[bytes]:
    got = []
    while (frame := g.recv()[1]) != marker:
        got.append(frame)
    return got


def test_rx_filter_honours_rx_mode_and_mac_table(rig):
    _, ga, db, gb = rig.cabled()
    other_uni, other_uni2 = mac("52:54:00:00:00:99"), mac("52:54:00:00:00:98")
    multi, multi2 = mac("01:00:5e:00:00:01"), mac("33:33:00:00:00:01")
    assert gb.rx_mode(net_defs.RX_ALLMULTI, False) == net_defs.ACK_OK
    assert gb.mac_table([other_uni], [multi]) == net_defs.ACK_OK

    def burst(dsts: list[bytes], tag: int) -> list[bytes]:
        for i, dst in enumerate(dsts):
            ga.send(ether(dst, ga.mac, bytes([tag, i])))
        marker = ether(gb.mac, ga.mac, bytes([tag, 0xFF]))
        ga.send(marker)
        return _receive_until(gb, marker)

    dsts = [gb.mac, other_uni, other_uni2, BCAST, multi, multi2]
    kept = burst(dsts, 1)
    assert [f[:6] for f in kept] == [gb.mac, other_uni, BCAST, multi]

    assert gb.rx_mode(net_defs.RX_NOBCAST, True) == net_defs.ACK_OK
    assert gb.rx_mode(net_defs.RX_NOMULTI, True) == net_defs.ACK_OK
    assert [f[:6] for f in burst(dsts, 2)] == [gb.mac, other_uni]

    assert gb.rx_mode(net_defs.RX_NOUNI, True) == net_defs.ACK_OK
    assert gb.rx_mode(net_defs.RX_NOBCAST, False) == net_defs.ACK_OK
    ga.send(ether(gb.mac, ga.mac, b"dropped: NOUNI"))
    ga.send(ether(BCAST, ga.mac, b"marker"))
    assert gb.recv()[1] == ether(BCAST, ga.mac, b"marker")

    assert gb.rx_mode(net_defs.RX_PROMISC, True) == net_defs.ACK_OK
    assert [f[:6] for f in burst(dsts, 3)] == dsts
    assert db.stats.rx_filtered == 2 + 4 + 1


def test_default_filter_accepts_own_broadcast_and_multicast_only(rig):
    _, ga, db, gb = rig.cabled()
    stranger, multi = mac("52:54:00:00:00:77"), mac("01:80:c2:00:00:0e")
    for dst in (stranger, multi, BCAST):
        ga.send(ether(dst, ga.mac, b"x"))
    marker = ether(gb.mac, ga.mac, b"end")
    ga.send(marker)
    assert [f[:6] for f in _receive_until(gb, marker)] == [multi, BCAST]
    assert db.stats.rx_filtered == 1


def test_mac_table_overflow_accepts_all_unicast(rig):
    _, ga, _, gb = rig.cabled()
    table = [bytes([0x52, 0, 0, 0, 1, i]) for i in range(net_ctrl.MAC_TABLE_ENTRIES + 1)]
    assert gb.mac_table(table, []) == net_defs.ACK_OK
    stranger = mac("52:54:00:00:00:77")
    ga.send(ether(stranger, ga.mac, b"x"))
    assert gb.recv()[1][:6] == stranger


def test_vlan_filter(rig):
    _, ga, db, gb = rig.cabled()

    def tagged(vid: int) -> bytes:
        return ether(gb.mac, ga.mac, struct.pack(">HH", vid, 0x88B5) + b"v", 0x8100)

    assert gb.ctrl(net_defs.CTRL_VLAN, net_defs.VLAN_ADD, struct.pack("<H", 5)) == net_defs.ACK_OK
    ga.send(tagged(7))
    ga.send(tagged(5))
    assert gb.recv()[1] == tagged(5)
    assert gb.ctrl(net_defs.CTRL_VLAN, net_defs.VLAN_DEL, struct.pack("<H", 5)) == net_defs.ACK_OK
    ga.send(tagged(5))
    ga.send(ether(gb.mac, ga.mac, b"untagged"))
    assert gb.recv()[1] == ether(gb.mac, ga.mac, b"untagged")
    assert db.stats.rx_filtered == 2


GOOD_COMMANDS = [
    (net_defs.CTRL_RX, net_defs.RX_PROMISC, b"\x01"),
    (net_defs.CTRL_RX, net_defs.RX_NOBCAST, b"\x00"),
    (net_defs.CTRL_MAC, net_defs.MAC_TABLE_SET, mac_tables([], [])),
    (net_defs.CTRL_MAC, net_defs.MAC_ADDR_SET, mac("52:54:00:aa:bb:cc")),
    (net_defs.CTRL_VLAN, net_defs.VLAN_ADD, struct.pack("<H", 4095)),
    (net_defs.CTRL_MQ, net_defs.MQ_VQ_PAIRS_SET, struct.pack("<H", 2)),
    (net_defs.CTRL_GUEST_OFFLOADS, net_defs.GUEST_OFFLOADS_SET, bytes(8)),
]
BAD_COMMANDS = {
    "rx-no-data": (net_defs.CTRL_RX, net_defs.RX_PROMISC, b""),
    "rx-two-bytes": (net_defs.CTRL_RX, net_defs.RX_ALLMULTI, b"\x01\x01"),
    "rx-unknown": (net_defs.CTRL_RX, 6, b"\x01"),
    "table-count-huge": (
        net_defs.CTRL_MAC,
        net_defs.MAC_TABLE_SET,
        b"\xff\xff\xff\xff" + bytes(10),
    ),
    "table-count-short": (
        net_defs.CTRL_MAC,
        net_defs.MAC_TABLE_SET,
        struct.pack("<I", 2) + bytes(6),
    ),
    "table-no-multi": (net_defs.CTRL_MAC, net_defs.MAC_TABLE_SET, struct.pack("<I", 1) + bytes(6)),
    "table-trailing": (net_defs.CTRL_MAC, net_defs.MAC_TABLE_SET, mac_tables([], []) + b"\x00"),
    "table-empty": (net_defs.CTRL_MAC, net_defs.MAC_TABLE_SET, b""),
    "addr-short": (net_defs.CTRL_MAC, net_defs.MAC_ADDR_SET, bytes(5)),
    "vlan-4096": (net_defs.CTRL_VLAN, net_defs.VLAN_ADD, struct.pack("<H", 4096)),
    "vlan-short": (net_defs.CTRL_VLAN, net_defs.VLAN_DEL, b"\x01"),
    "announce-unasked-data": (net_defs.CTRL_ANNOUNCE, net_defs.ANNOUNCE_ACK, b"\x00"),
    "pairs-zero": (net_defs.CTRL_MQ, net_defs.MQ_VQ_PAIRS_SET, struct.pack("<H", 0)),
    "pairs-too-many": (net_defs.CTRL_MQ, net_defs.MQ_VQ_PAIRS_SET, struct.pack("<H", 3)),
    "mq-rss": (net_defs.CTRL_MQ, 1, bytes(16)),
    "offloads-not-negotiated": (
        net_defs.CTRL_GUEST_OFFLOADS,
        net_defs.GUEST_OFFLOADS_SET,
        b"\x02" + bytes(7),
    ),
    "unknown-class": (99, 0, b""),
    "notf-coal": (6, 0, bytes(8)),
}


@pytest.mark.parametrize("mode", RING_MODES[::5])
def test_control_commands_and_acks(rig, mode):
    dev, g = rig.nic(Cable(), dev={"queue_pairs": 2}, **mode)
    for cls, cmd, data in GOOD_COMMANDS:
        assert g.ctrl(cls, cmd, data) == net_defs.ACK_OK, (cls, cmd, data)
    assert g.mac == mac("52:54:00:aa:bb:cc")
    assert dev.filter.promisc and dev.active_pairs == 2 and dev.filter.vlans == {4095}
    for name, (cls, cmd, data) in BAD_COMMANDS.items():
        assert g.ctrl(cls, cmd, data) == net_defs.ACK_ERR, name
    # header split from the data over several buffers, and a one-byte command
    assert g.ctrl(0, 0, out=[b"\x00", b"\x00", b"\x00"]) == net_defs.ACK_OK
    assert not dev.filter.promisc
    assert g.ctrl(0, 0, out=[b"\x00"]) == net_defs.ACK_ERR
    assert dev.broken is None and dev.active_pairs == 2


def test_control_without_a_writable_ack_byte_is_survived(rig):
    dev, g = rig.nic(Cable())
    g.drv.submit(g.ctrl_q, [bytes([net_defs.CTRL_RX, net_defs.RX_PROMISC, 1])], [])
    (c,) = g.drv.wait(g.ctrl_q)
    assert c.length == 0 and dev.filter.promisc and dev.broken is None


def test_bad_tx_chains_are_counted_not_fatal(rig):
    da, ga, _, gb = rig.cabled()
    ga.send(b"", hdr=bytes(11))  # shorter than the header
    ga.send(b"\x01" * 13)  # header and a runt
    ga.drv.submit(1, [], [64])  # nothing readable at all
    ga.drv.wait(1)
    ga.send(ether(gb.mac, ga.mac, b"still fine"))
    assert gb.recv()[1] == ether(gb.mac, ga.mac, b"still fine")
    assert da.stats.tx_errors == 3 and da.stats.tx_frames == 1 and da.broken is None


def test_announce_and_ack(rig):
    dev, g = rig.nic(Cable())
    before = g.drv.config_interrupts
    dev.announce()
    assert g.status & net_defs.S_ANNOUNCE
    wait_until(lambda: g.drv.handle_interrupt() or g.drv.config_interrupts > before)
    assert g.ctrl(net_defs.CTRL_ANNOUNCE, net_defs.ANNOUNCE_ACK) == net_defs.ACK_OK
    assert g.status == net_defs.S_LINK_UP


def test_features_needing_ctrl_vq_are_refused_without_it(rig):
    d = NetDevice(Cable())
    assert not d.accept_features(1 << net_defs.F_CTRL_RX)
    assert d.accept_features(1 << net_defs.F_CTRL_RX | 1 << net_defs.F_CTRL_VQ)
    d.close()


def ipv4_udp(sport: int) -> bytes:
    """Enough of an IPv4/UDP header for the flow hash: addresses and ports."""
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    return ip + struct.pack(">HHHH", sport, 9, 8, 0)


@pytest.mark.parametrize("mode", RING_MODES[::3])
def test_mq_two_pairs(rig, mode):
    da, ga, db, gb = rig.cabled({"queue_pairs": 2}, {"queue_pairs": 2}, **mode)
    assert ga.max_pairs == gb.max_pairs == 2 and ga.ctrl_q == 4
    assert gb.set_pairs(2) == net_defs.ACK_OK and ga.set_pairs(2) == net_defs.ACK_OK
    frames = [ether(gb.mac, ga.mac, ipv4_udp(1000 + i), 0x0800) for i in range(16)]
    expect: dict[int, list[bytes]] = {0: [], 1: []}
    for i, f in enumerate(frames):
        ga.send(f, pair=i % 2)  # both transmit queues
        expect[flow_hash(f) % 2].append(f)
    assert expect[0] and expect[1]  # the 16 flows do spread
    for pair in (0, 1):
        assert [gb.recv(pair)[1] for _ in expect[pair]] == expect[pair]
    assert da.stats.tx_frames == 16 and db.stats.rx_frames == 16


def test_mq_not_negotiated_puts_control_queue_at_2(rig):
    dev, g = rig.nic(Cable(), dev={"queue_pairs": 2}, features=NO_MQ)
    assert g.max_pairs == 1 and g.ctrl_q == 2
    assert g.rx_mode(net_defs.RX_PROMISC, True) == net_defs.ACK_OK and dev.filter.promisc
    assert g.set_pairs(1) == net_defs.ACK_ERR  # MQ not negotiated


def test_rx_backlog_is_bounded_and_delivered_once_buffers_come(rig):
    _, ga, db, gb = rig.cabled({}, {"backlog": 8}, rx_buffers=0)
    frames = [ether(gb.mac, ga.mac, payload(i, 60)) for i in range(20)]
    for f in frames:
        ga.send(f)
    wait_until(lambda: db.stats.rx_dropped + db.stats.rx_overrun == 12)
    gb.post_rx(0, 16)
    assert [gb.recv()[1] for _ in range(8)] == frames[:8]  # the oldest are kept
    ga.send(frames[0])
    assert gb.recv()[1] == frames[0]
    assert db.stats.rx_dropped + db.stats.rx_overrun == 12 and db.stats.rx_frames == 9


def test_reset_forgets_ctrl_state_and_backlog(rig):
    dev, g = rig.nic(Cable(), rx_buffers=0)
    assert g.rx_mode(net_defs.RX_PROMISC, True) == net_defs.ACK_OK
    dev.deliver(ether(g.mac, BCAST, b"pending"))
    g.drv.reset()
    assert not dev.filter.promisc and not dev._backlog[0] and not dev._inbox


# -- TAP: needs /dev/net/tun and CAP_NET_ADMIN (root in a container usually has both) --


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.fixture
def tap() -> Iterator[tuple[Tap, bytes]]:
    """A tap with the host at .1 of a random 10.x.y.0/24: tests running at the same time
    on this host must not share a subnet, or the host answers through the other tap."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command to configure the tap")
    try:
        t = Tap("emutest%d")
    except TapError as e:
        pytest.skip(f"host does not allow a TAP interface: {e}")
    subnet = bytes([10, random.randrange(64, 250), random.randrange(1, 250)])
    try:
        addr = ".".join(map(str, subnet + b"\x01"))
        subprocess.run(["ip", "addr", "add", f"{addr}/24", "dev", t.name], check=True)
        subprocess.run(["ip", "link", "set", t.name, "up"], check=True)
    except subprocess.CalledProcessError as e:
        t.close()
        pytest.skip(f"cannot configure the tap: {e}")
    yield t, subnet
    t.close()


def _wait_for(g: GuestNet, match: Callable[[bytes], bool], send: bytes) -> bytes:
    """Send ``send`` (up to 3 times, as a real stack retries) until a frame ``match``es;
    other frames (the host's IPv6 chatter ...) are skipped."""
    for _ in range(3):
        g.send(send)
        try:
            for _ in range(100):
                if match(f := g.recv(timeout=2)[1]):
                    return f
        except TimeoutError:
            continue
    pytest.fail("the host never answered")


def test_tap_arp_and_ping_the_host(rig, tap):
    t, subnet = tap
    _, g = rig.nic(t, dev={"mac": MAC_A})
    me, host = subnet + b"\x02", subnet + b"\x01"
    arp = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, g.mac, me, bytes(6), host)
    reply = _wait_for(
        g,
        lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == host,
        ether(BCAST, g.mac, arp, 0x0806),
    )
    host_mac = reply[22:28]
    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x1234, 1) + b"emu ping"
    icmp = icmp[:2] + struct.pack(">H", _csum(icmp)) + icmp[4:]
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, me, host)
    ip = ip[:10] + struct.pack(">H", _csum(ip)) + ip[12:]
    echo = _wait_for(
        g,
        lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0,  # ICMP echo reply
        ether(host_mac, g.mac, ip + icmp, 0x0800),
    )
    assert echo[26:30] == host and echo[38:40] == b"\x12\x34" and echo[42:50] == b"emu ping"


def test_a_queue_reset_of_tx_does_not_swallow_later_frames(rig, monkeypatch):
    """A frame sent while the driver resets the tx queue is owed only its completion; the
    reset ring hands that head out again for a new frame, which must go out."""
    da, ga, db, gb = rig.cabled()
    txq = da.queues[1]
    in_send = threading.Event()
    real_transmit = da._transmit

    def transmit_during_reset(c):
        in_send.set()
        wait_until(lambda: txq.gate is not emu_queue.Gate.OPEN, 5)
        real_transmit(c)

    monkeypatch.setattr(da, "_transmit", transmit_during_reset)
    first = ether(BCAST, mac(MAC_A), payload(1, 100))
    ga.drv.submit(1, [bytes(ga.hdr_len), first], [])
    assert in_send.wait(5)
    ga.drv._write(mmio_regs.QUEUE_SEL, 1)
    ga.drv._write(mmio_regs.QUEUE_RESET, 1)  # returns once the device is off the queue
    monkeypatch.setattr(da, "_transmit", real_transmit)
    ga.drv.setup_queue(1, 64)
    second = ether(BCAST, mac(MAC_A), payload(2, 100))
    ga.send(second)
    assert gb.recv()[1] == first
    assert gb.recv()[1] == second
