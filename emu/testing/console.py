"""Guest side of virtio-console over the reference driver.

``GuestConsole(driver)`` negotiates, sets up every queue (as Linux does at probe), posts
receive buffers on each port and, with MULTIPORT, on the control receive queue.
``handshake`` then plays Linux's part of the control protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emu.backends.chardev import BufferChar
from emu.devices.console import (
    CONSOLE_PORT,
    CTRL_MSG,
    CTRL_RX,
    CTRL_TX,
    DEVICE_ADD,
    DEVICE_READY,
    F_MULTIPORT,
    PORT_OPEN,
    PORT_READY,
    ConsoleDevice,
    rx_queue,
)
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import attached

#: the id Linux puts in DEVICE_READY (VIRTIO_CONSOLE_BAD_ID)
BAD_ID = 0xFFFFFFFF


@dataclass
class ControlMsg:
    id: int
    event: int
    value: int
    extra: bytes = b""


class GuestConsole:
    def __init__(
        self,
        drv: VirtioMmioDriver,
        *,
        features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = 32,
        rx_buffers: int = 8,
        rx_buf_size: int = 64,
    ) -> None:
        self.drv = drv
        self.features = drv.init(features, packed=packed, event_idx=event_idx, indirect=indirect)
        self.multiport = bool(self.features >> F_MULTIPORT & 1)
        self.max_ports = drv.config_read(4, 4) if self.multiport else 1
        self.rx_buf_size = rx_buf_size
        queues = 2 * self.max_ports + 2 if self.multiport else 2
        for i in range(queues):
            drv.setup_queue(i, queue_size)
        drv.driver_ok()
        for port in range(self.max_ports):
            self._post(rx_queue(port), rx_buffers, rx_buf_size)
        if self.multiport:
            self._post(CTRL_RX, rx_buffers, 4096)
        self._pending: dict[int, bytes] = {}

    def _post(self, qidx: int, count: int, size: int) -> None:
        q = self.drv.queues[qidx]
        for _ in range(count):
            q.add([], [size])
        if count and q.kick_needed():
            self.drv.kick(qidx)

    # -- port data --

    def write(self, port: int, data: bytes) -> None:
        """Send ``data`` out of ``port`` and wait until the device has taken it."""
        txq = rx_queue(port) + 1
        self.drv.submit(txq, [data], [])
        self.drv.wait(txq)

    def read(self, port: int, n: int, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` bytes of input on ``port``; buffers are reposted as they are used."""
        rxq = rx_queue(port)
        data = self._pending.pop(port, b"")
        while len(data) < n:
            for c in self.drv.wait(rxq, 1, timeout):
                data += c.data[: c.length]
                self._post(rxq, 1, self.rx_buf_size)
        if len(data) > n:
            self._pending[port] = data[n:]
        return data[:n]

    # -- control queues --

    def send_control(self, port: int, event: int, value: int = 1, raw: bytes | None = None) -> None:
        """One control message; ``raw`` sends those bytes instead (hostile-guest tests)."""
        self.drv.submit(
            CTRL_TX, [raw if raw is not None else CTRL_MSG.pack(port, event, value)], []
        )
        self.drv.wait(CTRL_TX)

    def recv_control(self, count: int = 1, timeout: float = 5.0) -> list[ControlMsg]:
        msgs = []
        for c in self.drv.wait(CTRL_RX, count, timeout):
            data = c.data[: c.length]
            msgs.append(ControlMsg(*CTRL_MSG.unpack_from(data), data[CTRL_MSG.size :]))
            self._post(CTRL_RX, 1, 4096)
        return msgs

    def handshake(self, ports: int, replies: int) -> list[ControlMsg]:
        """What Linux does at probe: DEVICE_READY, then PORT_READY for each DEVICE_ADD, and
        PORT_OPEN for a port the device calls the console. ``ports`` DEVICE_ADDs and
        ``replies`` answers to PORT_READY are expected; all messages received are returned.
        """
        self.send_control(BAD_ID, DEVICE_READY, 1)
        adds = self.recv_control(ports)
        assert all(m.event == DEVICE_ADD for m in adds), adds
        for m in adds:
            self.send_control(m.id, PORT_READY, 1)
        answers = self.recv_control(replies)
        for m in answers:
            if m.event == CONSOLE_PORT:
                self.send_control(m.id, PORT_OPEN, 1)
        return adds + answers


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process console``: a line each way through port 0."""
    chardev = BufferChar()
    with attached(ConsoleDevice(chardev)) as drv:
        con = GuestConsole(drv, **opts)
        con.write(0, b"guest says hi\n")
        chardev.feed(b"host says hi\n")
        say(f"console: guest -> host {chardev.wait_output(14)!r}")
        say(f"console: host -> guest {con.read(0, 13)!r}")
