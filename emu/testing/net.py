"""Guest side of virtio-net over the reference driver: what a minimal Linux driver does.

``GuestNet(driver)`` negotiates, sets up every rx/tx pair the device has plus the control
queue, posts receive buffers and goes DRIVER_OK. Frames go out with a zero header in a
separate buffer (so the device must gather across descriptors); received frames are
reassembled from ``num_buffers`` chains when MRG_RXBUF is on, and their buffers reposted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emu.backends.cable import Cable
from emu.devices.net import NetDevice
from emu.devices.net_defs import (
    CTRL_MAC,
    CTRL_MQ,
    CTRL_RX,
    F_CTRL_VQ,
    F_MQ,
    F_MRG_RXBUF,
    MAC_TABLE_SET,
    MQ_VQ_PAIRS_SET,
)
from emu.ringdefs import F_VERSION_1
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import attached, rings

#: Linux's buffer for one frame without MRG_RXBUF: Ethernet + VLAN header + 1500
GOOD_PACKET_LEN = 14 + 4 + 1500


class GuestNet:
    def __init__(
        self,
        drv: VirtioMmioDriver,
        *,
        features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = 64,
        rx_buffers: int = 16,
        rx_buf_size: int | None = None,
    ) -> None:
        """``rx_buffers`` per rx queue are posted at start (0: none, see ``post_rx``)."""
        self.drv = drv
        self.features = drv.init(features, packed=packed, event_idx=event_idx, indirect=indirect)
        self.mrg = self.has(F_MRG_RXBUF)
        self.hdr_len = 12 if self.has(F_VERSION_1) or self.mrg else 10
        self.rx_buf_size = rx_buf_size or (2048 if self.mrg else self.hdr_len + GOOD_PACKET_LEN)
        self.max_pairs = drv.config_read(8, 2) if self.has(F_MQ) else 1
        for k in range(self.max_pairs):
            drv.setup_queue(2 * k, queue_size)
            drv.setup_queue(2 * k + 1, queue_size)
        self.ctrl_q = 2 * self.max_pairs
        if self.has(F_CTRL_VQ):
            drv.setup_queue(self.ctrl_q, queue_size)
        drv.driver_ok()
        for k in range(self.max_pairs):
            self.post_rx(k, rx_buffers)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def mac(self) -> bytes:
        return bytes(self.drv.config_read(i, 1) for i in range(6))

    @property
    def status(self) -> int:
        return self.drv.config_read(6, 2)

    def post_rx(self, pair: int = 0, count: int = 16, size: int | None = None) -> None:
        q = self.drv.queues[2 * pair]
        for _ in range(count):
            q.add([], [size or self.rx_buf_size])
        if count and q.kick_needed():
            self.drv.kick(2 * pair)

    def send(self, frame: bytes, pair: int = 0, hdr: bytes | None = None) -> None:
        """Transmit one frame and wait until the device has consumed it."""
        txq = 2 * pair + 1
        self.drv.submit(txq, [hdr if hdr is not None else bytes(self.hdr_len), frame], [])
        self.drv.wait(txq)

    def recv(self, pair: int = 0, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """(header, frame) of the next received frame; its buffers are posted again."""
        rxq = 2 * pair
        (first,) = self.drv.wait(rxq, 1, timeout)
        data = first.data[: first.length]
        count = 1
        if self.mrg:
            (count,) = struct.unpack_from("<H", data, 10)
            for c in self.drv.wait(rxq, count - 1, timeout) if count > 1 else []:
                data += c.data[: c.length]
        self.post_rx(pair, count)
        return data[: self.hdr_len], data[self.hdr_len :]

    # -- control queue --

    def ctrl(self, cls: int, cmd: int, data: bytes = b"", out: list[bytes] | None = None) -> int:
        """Send a command, return the ack; ``out`` replaces the readable buffers (tests)."""
        self.drv.submit(self.ctrl_q, out if out is not None else [bytes([cls, cmd]) + data], [1])
        (c,) = self.drv.wait(self.ctrl_q)
        assert c.length == 1, f"control ack of length {c.length}"
        return c.data[0]

    def rx_mode(self, cmd: int, on: bool) -> int:
        return self.ctrl(CTRL_RX, cmd, bytes([on]))

    def mac_table(self, uni: list[bytes], multi: list[bytes]) -> int:
        return self.ctrl(CTRL_MAC, MAC_TABLE_SET, mac_tables(uni, multi))

    def set_pairs(self, pairs: int) -> int:
        return self.ctrl(CTRL_MQ, MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))


def mac_tables(uni: list[bytes], multi: list[bytes]) -> bytes:
    """MAC TABLE_SET data: unicast table then multicast table."""
    return b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in (uni, multi))


def ether(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (0x88B5: the IEEE local experimental ethertype)."""
    return dst + src + struct.pack(">H", ethertype) + payload


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process net``: two NICs joined by a cable, a frame each way."""
    a, b = Cable.pair()
    mac_a, mac_b = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
    with attached(NetDevice(a, mac=mac_a)) as da, attached(NetDevice(b, mac=mac_b)) as db:
        na, nb = GuestNet(da, **opts), GuestNet(db, **opts)
        frame = ether(nb.mac, na.mac, b"hello over emu's cable")
        na.send(frame)
        _, got = nb.recv()
        say(f"net: NICs {mac_a} and {mac_b} joined by a cable, rings {rings(da.features)}")
        say(
            f"net: a -> b {len(frame)}-byte frame "
            f"{'delivered intact' if got == frame else 'CORRUPTED'}"
        )
        nb.send(ether(na.mac, nb.mac, b"and back"))
        say(f"net: b -> a reply payload {na.recv()[1][14:]!r}")
