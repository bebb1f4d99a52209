"""emu's vhost-user backend driven by emu's vhost-user frontend: every device, both rings."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emu.backends.cable import Cable
from emu.backends.chardev import BufferChar
from emu.devices.base import VirtioDevice
from emu.devices.blk import BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.rng import RngDevice
from emu.testing.blk import BlkDriver
from emu.testing.console import GuestConsole
from emu.testing.net import GuestNet, ether
from emu.testing.rng import RngDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.frontend import connect
from emu.vhost_user.protocol import Message, Req

RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
PATTERN = hashlib.sha256(b"emu vhost-user").digest() * 128  # 4 KiB


@contextmanager
def served(device: VirtioDevice, path: Path) -> Iterator[VhostUserServer]:
    server = VhostUserServer(device, path).start()
    try:
        yield server
    finally:
        server.close()
        device.close()


@contextmanager
def frontend(path: Path, **kw: object) -> Iterator[VhostUserDriver]:
    fe = VhostUserDriver(path, **kw)  # type: ignore[arg-type]
    try:
        yield fe
    finally:
        fe.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("add_mem_reg", [False, True], ids=["mem-table", "add-mem-reg"])
def test_blk_round_trip_reaches_the_file(
    disk: Path, tmp_path: Path, packed: bool, add_mem_reg: bool
) -> None:
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock, add_mem_reg=add_mem_reg) as fe:
        blk = BlkDriver.open(fe, packed=packed)
        assert blk.write(16, PATTERN) == 0
        assert blk.flush() == 0
        assert blk.read(16, 8) == PATTERN
        assert blk.get_id().rstrip(b"\0") == b"emu-blk"
    assert disk.read_bytes()[16 * 512 : 16 * 512 + len(PATTERN)] == PATTERN


def test_config_space_comes_from_the_device(disk: Path, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    dev = BlkDevice(disk)
    with served(dev, sock), frontend(sock) as fe:
        fe.init()
        cfg = dev.config_bytes()
        # UML's reads: offset 0, size = end of the field; one beyond the config is zeros
        for size in (8, 16, 36, len(cfg)):
            assert fe.config_read(0, size) == int.from_bytes(cfg[:size], "little")
        assert fe.config_read(len(cfg) - 2, 4) == int.from_bytes(cfg[-2:], "little")


@pytest.mark.parametrize("packed", RINGS)
def test_stop_reports_a_stable_base_and_cont_resumes(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock) as fe:
        blk = BlkDriver.open(fe, packed=packed)
        for i in range(5):
            blk.write(i, PATTERN[:512])
        base = fe.stop_ring(0)
        if packed:  # avail idx 5 | wrap, used idx 5 | wrap (one slot per chain: indirect)
            assert base == 5 | 1 << 15 | 5 << 16 | 1 << 31
        else:
            assert base == 5
        assert fe.stop_ring(0) == base  # stopped stays stopped
        blk.submit(0, 0, in_size=512)  # made available while stopped: served after cont
        fe.restart_ring(0, base)
        (c,) = blk.wait()
        assert c.data[:512] == PATTERN[:512]


def test_reconnect_serves_a_new_frontend(disk: Path, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock) as server:
        with frontend(sock) as fe:
            BlkDriver.open(fe).write(0, PATTERN)
        with frontend(sock) as fe:
            assert BlkDriver.open(fe, packed=True).read(0, 8) == PATTERN
        assert server.connections == 2


@pytest.mark.parametrize("packed", RINGS)
def test_rng(tmp_path: Path, packed: bool) -> None:
    sock = tmp_path / "rng.sock"
    with served(RngDevice(), sock), frontend(sock) as fe:
        rng = RngDriver.open(fe, packed=packed)
        a, b = rng.read(64), rng.read(64)
        assert len(a) == len(b) == 64 and a != b


@pytest.mark.parametrize("packed", RINGS)
def test_net_two_backends_joined_by_a_cable(tmp_path: Path, packed: bool) -> None:
    end_a, end_b = Cable.pair()
    sa, sb = tmp_path / "a.sock", tmp_path / "b.sock"
    mac_a, mac_b = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
    with (
        served(NetDevice(end_a, mac=mac_a), sa),
        served(NetDevice(end_b, mac=mac_b), sb),
        frontend(sa) as fa,
        frontend(sb) as fb,
    ):
        na, nb = GuestNet(fa, packed=packed), GuestNet(fb, packed=packed)
        frame = ether(nb.mac, na.mac, b"over two vhost-user sockets" * 20)
        na.send(frame)
        assert nb.recv()[1] == frame
        reply = ether(na.mac, nb.mac, b"and back")
        nb.send(reply)
        assert na.recv()[1] == reply


@pytest.mark.parametrize("packed", RINGS)
def test_console_output_and_input(tmp_path: Path, packed: bool) -> None:
    sock = tmp_path / "con.sock"
    chardev = BufferChar()
    with served(ConsoleDevice(chardev), sock), frontend(sock) as fe:
        con = GuestConsole(fe, packed=packed)
        con.write(0, b"hello from the guest\n")
        assert chardev.wait_output(21) == b"hello from the guest\n"
        chardev.feed(b"typed on the host")
        assert con.read(0, 17) == b"typed on the host"


def test_status_and_reset_device(disk: Path, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock) as fe:
        blk = BlkDriver.open(fe)
        fe.set_u64(Req.SET_STATUS, 1 | 2 | 8 | 4)
        assert fe.get_u64(Req.GET_STATUS) == 15
        fe.request(Req.RESET_DEVICE)
        assert fe.get_u64(Req.GET_STATUS) == 0
        # set up again on the same connection (memory stays registered)
        fe.queues.clear()
        fe.set_u64(Req.SET_FEATURES, fe.features | 1 << 30)
        fe.setup_queue(0)
        fe.driver_ok()
        assert blk.write(0, PATTERN) == 0


def test_kick_fd_replaced_while_running(disk: Path, tmp_path: Path) -> None:
    """QEMU re-sends SET_VRING_KICK with a new fd; the device must poll the new one."""
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock) as fe:
        blk = BlkDriver.open(fe)
        old = fe._kicks.pop(0)
        fe.start_ring(0)  # a fresh eventfd
        os.close(old)
        assert blk.write(0, PATTERN) == 0


class UmlFrontend(VhostUserDriver):
    """Sends SET_VRING_BASE 0 for every ring, packed too, as UML 6.1's virtio_uml does."""

    def request(
        self, req: Req, payload: bytes = b"", fds: list[int] | None = None, **kw: bool
    ) -> Message:
        if req == Req.SET_VRING_BASE:
            payload = payload[:4] + bytes(4)
        return super().request(req, payload, fds, **kw)


@pytest.mark.parametrize("packed", RINGS)
def test_base_0_starts_a_fresh_ring_as_uml_sends_it(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock):
        fe = UmlFrontend(sock)
        try:
            blk = BlkDriver.open(fe, packed=packed)
            assert blk.write(3, PATTERN) == 0
            assert blk.read(3, 8) == PATTERN
        finally:
            fe.close()


def test_packed_base_0_after_a_full_lap_resumes_there(disk: Path, tmp_path: Path) -> None:
    """Both packed indexes back at 0 with wrap counters clear is a real base of 0: a
    reconnected frontend (no saved state in the new session) resumes the ring there."""
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock) as fe:
        blk = BlkDriver.open(fe, packed=True, queue_size=8)
        for i in range(8):  # one slot per request (indirect): exactly one lap
            assert blk.write(i, PATTERN[:512]) == 0
        assert fe.stop_ring(0) == 0
        fe.sock.close()
        fe.sock = connect(sock)
        fe.init(packed=True)
        fe.restart_ring(0, 0)
        assert blk.read(0, 1) == PATTERN[:512]


@pytest.mark.parametrize("packed", RINGS)
def test_inflight_region_tracks_requests_over_several_laps(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    """QEMU asks for an inflight region whenever it is offered: every request is recorded
    in it and retired again, on both layouts, past the ring's wrap."""
    sock = tmp_path / "blk.sock"
    with served(BlkDevice(disk), sock), frontend(sock, inflight=True) as fe:
        blk = BlkDriver.open(fe, packed=packed, queue_size=16)
        assert fe.inflight_fd >= 0
        for i in range(40):
            assert blk.write(i, PATTERN[:512]) == 0
            assert blk.read(i, 1) == PATTERN[:512]


def test_net_accepts_qemus_features_without_the_control_queue(tmp_path: Path) -> None:
    """QEMU keeps virtio-net's control queue and forwards GUEST_ANNOUNCE without CTRL_VQ
    (what a 7.2 microvm guest's negotiation turns into)."""
    from emu.devices.net_defs import F_GUEST_ANNOUNCE, F_MRG_RXBUF

    sock = tmp_path / "net.sock"
    end, _ = Cable.pair()
    qemu = 1 << F_GUEST_ANNOUNCE | 1 << F_MRG_RXBUF | 1 << 32
    with served(NetDevice(end), sock) as server, frontend(sock) as fe:
        assert fe.init(qemu, event_idx=False, indirect=False) == qemu
        assert server.negotiated == [qemu]


def test_split_inflight_writes_the_spec_layout_and_refuses_a_batch_whole() -> None:
    """The request path's writes (C) against the split layout read back with struct:
    counters then flags at fetch, ``next`` links and ``last_batch_head`` before the used
    entries go out, flags cleared and ``used_idx`` advanced after; a batch naming a head
    beyond the area writes nothing."""
    import struct
    from types import SimpleNamespace

    import numpy as np

    from emu.memory import GuestMemoryError
    from emu.ringdefs import Batch
    from emu.vhost_user.inflight import InflightRegion

    region = InflightRegion.create(1, 64, False)
    t = region.queues[0]
    try:
        assert t.recover(7) == []  # a new area: version 1, used_idx = the ring's
        desc = lambda h: struct.unpack_from("<B5xHQ", region.mm, 16 + 16 * h)  # noqa: E731
        head = lambda: struct.unpack_from("<QHHHH", region.mm, 0)  # noqa: E731
        segs = [(0x1000, 16, False), (0x2000, 1, True)]
        t.fetched(Batch.from_chains([(h, segs) for h in (9, 2, 63)]))
        assert [desc(h) for h in (9, 2, 63)] == [(1, 0, 0), (1, 0, 1), (1, 0, 2)]
        assert t.counter == 3
        t.using(np.array([2, 63], np.uint16))
        assert desc(2)[:2] == (1, 2) and desc(63)[:2] == (1, 2)  # 63 follows 2; 2 is first
        assert head()[3] == 63
        t.used([2, 63])  # a list works as well as an array
        assert desc(2)[0] == desc(63)[0] == 0 and desc(9)[0] == 1
        assert head()[4] == 9
        before = bytes(region.mm)
        fetch = lambda hs: t.fetched(SimpleNamespace(heads=np.array(hs)))  # noqa: E731
        for bad in ([3, 64], [70000], [-1]):
            for step in (fetch, t.using, t.used):
                with pytest.raises(GuestMemoryError):
                    step(bad)
        assert bytes(region.mm) == before
    finally:
        region.close()
