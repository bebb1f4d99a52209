"""virtio-console: port 0 is the guest's console; with MULTIPORT, more named ports.

Queues: port 0 rx/tx = 0/1, control rx (host -> guest) = 2, control tx = 3, port k >= 1
rx/tx = 4 + 2(k-1) / 5 + 2(k-1). Without MULTIPORT negotiated only port 0 exists and it
is always open.

Control handshake (MULTIPORT): the guest's DEVICE_READY makes the device announce each
port with DEVICE_ADD; the guest's PORT_READY for a port is answered with CONSOLE_PORT
(port 0), PORT_NAME (named ports) and PORT_OPEN when the backend has someone attached.
Input for a port waits (in a bounded backlog, pulled from the backend only as room allows,
so nothing is dropped) until the guest has opened that port.

Everything from the guest is untrusted: short messages, ids of ports that do not exist and
unknown events are logged and ignored.

Stop and snapshot: a report stop publishes nothing more, so input bytes and control
messages already copied into chains whose used entries did not go out return to the front
of their backlogs, and a write already passed to the backend is completed after resume
without being written again. The snapshot keeps each port's handshake state (added, ready,
guest and host open) so a restored driver is not asked to redo it, the input not yet
delivered, pending control messages and the console size. Emergency writes go straight to
the backend and leave no state.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import dataclass, field

from emu.backends.chardev import CharBackend
from emu.devices import _persist
from emu.devices._chain import (
    Chain,
    Unpublished,
    chains,
    gather,
    inflight_heads,
    scatter,
    serve_output,
)
from emu.devices.base import VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register
from emu.queue import Virtqueue
from emu.state.format import StateError
from emu.state.schema import Bool, Bytes, Int, List, Obj, Schema, Str

log = logging.getLogger(__name__)

F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

# control events
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CTRL_RX, CTRL_TX = 2, 3
CTRL_MSG = struct.Struct("<IHH")  # id, event, value
#: a guest control message longer than this is refused unread (bytes past 8 are ignored)
CTRL_TX_MAX = 4096
EMERG_WR_OFFSET = 8
#: per-port input waiting for the guest; the backend holds the rest
BACKLOG = 64 * 1024
#: a single guest write bigger than this is refused (Linux writes at most a few pages)
TX_MAX = 1 << 20
#: control messages waiting for rx buffers; only a misbehaving guest gets near this
CTRL_BACKLOG = 1024
BATCH = 64


def rx_queue(port: int) -> int:
    return 0 if port == 0 else 4 + 2 * (port - 1)


def queue_port(index: int) -> int | None:
    """The port whose rx/tx queue ``index`` is; None for the control queues."""
    if index < 2:
        return 0
    if index < 4:
        return None
    return (index - 4) // 2 + 1


@dataclass
class Port:
    id: int
    backend: CharBackend
    name: str = ""
    backlog: bytearray = field(default_factory=bytearray)
    added: bool = False  # DEVICE_ADD sent
    ready: bool = False  # guest sent PORT_READY 1
    guest_open: bool = False
    host_open: bool = False  # last PORT_OPEN value sent


#: the device part of a snapshot (``save_state``); bounds that depend on the device
#: (ports, queue size, backlogs) are checked by ``load_state``
STATE = Schema(
    "console state",
    1,
    0,
    {
        "cols": Int(0, 0xFFFF),
        "rows": Int(0, 0xFFFF),
        "max_ports": Int(1, 0x7FFF),
        "ports": List(
            Obj(
                {
                    "id": Int(0, 0x7FFE),
                    "name": Str(1 << 16),
                    "added": Bool(),
                    "ready": Bool(),
                    "guest_open": Bool(),
                    "host_open": Bool(),
                    "input": Bytes(BACKLOG * (1 + 0x8000)),
                    "tx_sent": List(Int(0, 0xFFFF), 0x8000),
                }
            ),
            0x7FFF,
        ),
        "ctrl_out": List(Bytes(CTRL_MSG.size + (1 << 18)), CTRL_BACKLOG + 0x8000),
    },
)


class ConsoleDevice(VirtioDevice):
    device_id = 3
    name = "console"
    state_schema = STATE

    def __init__(
        self,
        backend: CharBackend | None,
        *,
        multiport: bool = False,
        max_ports: int = 1,
        ports: dict[int, tuple[str, CharBackend]] | None = None,
        cols: int = 80,
        rows: int = 25,
        queue_max_size: int | None = None,
    ) -> None:
        """``backend`` is port 0 (the console; None for none); ``ports`` maps ids >= 1
        to (name, backend), "" for an unnamed port. Ports other than 0 need multiport."""
        max_ports = max_ports if multiport else 1
        if not 1 <= max_ports <= 0x7FFF:
            raise ValueError(f"max_ports {max_ports} not in 1..32767")
        ports = ports or {}
        if ports and not multiport:
            raise ValueError("ports other than 0 need multiport=True")
        bad = [i for i in ports if not 1 <= i < max_ports]
        if bad:
            raise ValueError(f"port ids {bad} not in 1..{max_ports - 1}")
        features = 1 << F_SIZE | 1 << F_EMERG_WRITE | (1 << F_MULTIPORT if multiport else 0)
        super().__init__(2 * max_ports + 2 if multiport else 2, features, queue_max_size)
        self.max_ports = max_ports
        self.cols, self.rows = cols, rows
        self.ports: dict[int, Port] = {}
        if backend is not None:
            self.ports[0] = Port(0, backend)
        for pid, (name, be) in sorted(ports.items()):
            self.ports[pid] = Port(pid, be, name)
        self._ctrl_out: deque[bytes] = deque()
        # what went into chains whose used entries may not be out yet (see forget_inflight)
        self._ctrl_rx_out: Unpublished[bytes] = Unpublished()
        self._rx_out: dict[int, Unpublished[bytes]] = {p: Unpublished() for p in self.ports}
        self._tx_out: dict[int, Unpublished[int]] = {p: Unpublished() for p in self.ports}
        #: per port: in-flight tx heads written before a stop; complete, do not rewrite
        self._tx_sent: dict[int, set[int]] = {p: set() for p in self.ports}
        for port in self.ports.values():
            port.backend.attach(self.wake)

    @property
    def multiport(self) -> bool:
        return self.has(F_MULTIPORT)

    # -- config space --

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", self.cols, self.rows, self.max_ports, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # accepted before DRIVER_OK too (when features are not known yet): that is the
        # point of an emergency write
        port = self.ports.get(0)
        if offset == EMERG_WR_OFFSET and port is not None:
            port.backend.write(bytes([value & 0xFF]))
        else:
            super().write_config(offset, size, value)

    def resize(self, cols: int, rows: int) -> None:
        """The console's terminal changed size (field order cols, rows as in the spec)."""
        self.cols, self.rows = cols, rows
        if self.has(F_SIZE):
            self.on_config_change()
        port = self.ports.get(0)
        if self.multiport and port is not None and port.ready:
            self._send(0, RESIZE, 0, struct.pack("<HH", cols, rows))

    # -- lifecycle --

    def on_reset(self) -> None:
        """Guest-side state goes; input not yet delivered stays for the next driver."""
        self._ctrl_out.clear()
        self._ctrl_rx_out.clear()
        for port in self.ports.values():
            port.added = port.ready = port.guest_open = port.host_open = False
            self._rx_out[port.id].clear()
            self._tx_out[port.id].clear()
            self._tx_sent[port.id].clear()

    def close(self) -> None:
        for port in self.ports.values():  # first: their threads call wake()
            port.backend.close()
        super().close()

    # -- device thread --

    def _deliverable(self, port: Port) -> bool:
        return port.guest_open or not self.multiport

    def on_wake(self) -> None:
        for port in self.ports.values():
            self._pull(port)
            connected = port.backend.connected
            if self.multiport and port.ready and connected != port.host_open:
                port.host_open = connected
                self._send(port.id, PORT_OPEN, int(connected))

    def _pull(self, port: Port) -> None:
        room = BACKLOG - len(port.backlog)
        if room > 0:
            port.backlog += port.backend.read(room)

    def wants_poll(self, q: Virtqueue) -> bool:
        if q.index == CTRL_RX:
            return self.multiport and bool(self._ctrl_out)
        pid = queue_port(q.index)
        port = self.ports.get(pid) if pid is not None else None
        return (
            port is not None
            and q.index == rx_queue(pid)
            and bool(port.backlog)
            and self._deliverable(port)
        )

    def handle_queue(self, q: Virtqueue) -> None:
        pid = queue_port(q.index)
        if pid is None:
            if not self.multiport:
                log.info("console: kick on control queue %d without MULTIPORT", q.index)
            elif q.index == CTRL_RX:
                self._serve_ctrl_rx(q)
            else:
                self._serve_ctrl_tx(q)
            return
        port = self.ports.get(pid)
        if port is None or (pid > 0 and not self.multiport):
            log.info("console: kick on queue %d of absent port %d", q.index, pid)
        elif q.index == rx_queue(pid):
            self._serve_rx(q, port)
        else:
            self._serve_tx(q, port)

    def _serve_rx(self, q: Virtqueue, port: Port) -> None:
        heads: list[int] = []
        lengths: list[int] = []
        out = self._rx_out[port.id]
        while self._deliverable(port) and q.open:  # stopped: take nothing more in
            self._pull(port)
            if not port.backlog:
                break
            # one chain at a time: a chain popped beyond the input would go back empty
            batch = q.pop(1)
            if not len(batch):
                if q.set_kicks(True):
                    continue
                break
            out.popped(batch.heads.tolist())
            for c in chains(batch):
                n = scatter(self.mem, c, port.backlog)
                out.record([c.head], bytes(port.backlog[:n]))
                del port.backlog[:n]
                heads.append(c.head)
                lengths.append(n)
        if heads:
            q.push(heads, lengths)

    def _serve_tx(self, q: Virtqueue, port: Port) -> None:
        out, sent = self._tx_out[port.id], self._tx_sent[port.id]
        serve_output(q, BATCH, out, sent, lambda c: self._write_out(port, c))

    def _write_out(self, port: Port, c: Chain) -> None:
        data = gather(self.mem, c, TX_MAX)
        if data is None:
            log.info("console: port %d write of %d bytes refused", port.id, c.out_len)
        elif data:
            port.backend.write(data)

    # -- stop and snapshot --

    def on_queue_reset(self, index: int) -> None:
        port = queue_port(index)
        if port is not None and index == rx_queue(port) + 1 and port in self._tx_sent:
            self._tx_sent[port].clear()  # tx: the heads come back as new output

    def forget_inflight(self, queues: set[int]) -> None:
        """Settle what went into chains a stop left in flight (see the module docstring)."""
        for port in self.ports.values():
            rxq, txq = (self.queues[i] for i in (rx_queue(port.id), rx_queue(port.id) + 1))
            if rxq.started and rxq.index in queues:
                port.backlog[:0] = b"".join(self._rx_out[port.id].settle(inflight_heads(rxq)))
            if txq.started and txq.index in queues:
                self._tx_sent[port.id].update(self._tx_out[port.id].settle(inflight_heads(txq)))
        ctrl = self.queues[CTRL_RX] if len(self.queues) > CTRL_RX else None
        if ctrl is not None and ctrl.started and CTRL_RX in queues:
            back = self._ctrl_rx_out.settle(inflight_heads(self.queues[CTRL_RX]))
            self._ctrl_out.extendleft(reversed(back))

    def save_state(self) -> dict:
        return {
            "cols": self.cols,
            "rows": self.rows,
            "max_ports": self.max_ports,
            "ports": [
                {
                    "id": p.id,
                    "name": p.name,
                    "added": p.added,
                    "ready": p.ready,
                    "guest_open": p.guest_open,
                    "host_open": p.host_open,
                    "input": _persist.b64(bytes(p.backlog)),
                    "tx_sent": sorted(self._tx_sent[p.id]),
                }
                for p in self.ports.values()
            ],
            "ctrl_out": [_persist.b64(m) for m in self._ctrl_out],
        }

    def load_state(self, state: dict) -> None:
        """Check every field first (a refused snapshot changes nothing), then apply.

        The snapshot must have the same ports, with the same names: the guest was told
        about them. Input waiting for a port is bounded by the backlog plus what each
        in-flight chain took back (a chain never takes more than the backlog held).
        """
        s = STATE.check(state)
        if s["max_ports"] != self.max_ports:
            raise StateError(
                f"console: snapshot has max_ports {s['max_ports']}, this device {self.max_ports}"
            )
        ports = s["ports"]
        saved = {p["id"]: p["name"] for p in ports}
        mine = {p.id: p.name for p in self.ports.values()}
        if saved != mine or len(ports) != len(saved):
            raise StateError(
                f"console: snapshot has ports {saved}, this device has {mine} (id: name)"
            )
        most = BACKLOG * (1 + self.queue_max_size)
        inputs = {}
        for p in ports:
            data = _persist.unb64(p["input"], f"console port {p['id']} input")
            if len(data) > most:
                raise StateError(f"console: port {p['id']} input over {most} bytes")
            inputs[p["id"]] = data
            _persist.int_list(p["tx_sent"], 0, self.queue_max_size - 1, "console tx head")
        if len(s["ctrl_out"]) > CTRL_BACKLOG + self.queue_max_size:
            raise StateError("console state: too many pending control messages")
        msgs = [_persist.unb64(m, "console control message") for m in s["ctrl_out"]]
        if any(len(m) < CTRL_MSG.size for m in msgs):
            raise StateError("console state: control message shorter than its header")

        self.cols, self.rows = s["cols"], s["rows"]
        for p in ports:
            port = self.ports[p["id"]]
            port.added, port.ready = p["added"], p["ready"]
            port.guest_open, port.host_open = p["guest_open"], p["host_open"]
            port.backlog = bytearray(inputs[p["id"]])
            self._tx_sent[p["id"]] = set(p["tx_sent"])
        self._ctrl_out = deque(msgs)

    # -- control queues --

    def _send(self, pid: int, event: int, value: int, extra: bytes = b"") -> None:
        """Queue a control message for the guest (device thread, or before activation)."""
        if len(self._ctrl_out) >= CTRL_BACKLOG:
            log.warning("console: control backlog full, event %d for port %d dropped", event, pid)
            return
        self._ctrl_out.append(CTRL_MSG.pack(pid, event, value) + extra)
        self.wake()

    def _serve_ctrl_rx(self, q: Virtqueue) -> None:
        heads: list[int] = []
        lengths: list[int] = []
        while self._ctrl_out:
            batch = q.pop(min(BATCH, len(self._ctrl_out)))
            if not len(batch):
                if q.set_kicks(True):
                    continue
                break
            self._ctrl_rx_out.popped(batch.heads.tolist())
            for c in chains(batch):
                msg = self._ctrl_out.popleft()
                self._ctrl_rx_out.record([c.head], msg)
                heads.append(c.head)
                lengths.append(scatter(self.mem, c, msg))
        if heads:
            q.push(heads, lengths)

    def _serve_ctrl_tx(self, q: Virtqueue) -> None:
        while True:
            q.set_kicks(False)
            while len(batch := q.pop(BATCH)):
                for c in chains(batch):
                    msg = gather(self.mem, c, CTRL_TX_MAX)
                    if msg is None or len(msg) < CTRL_MSG.size:
                        log.info("console: control message of %d bytes ignored", c.out_len)
                    else:
                        self._control(*CTRL_MSG.unpack_from(msg))
                q.push(batch.heads, [0] * len(batch))
            if not q.set_kicks(True):
                return

    def _control(self, pid: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if not value:
                log.warning("console: the guest failed to set the device up")
                return
            for port in self.ports.values():
                if not port.added:
                    port.added = True
                    self._send(port.id, DEVICE_ADD, 0)
            return
        port = self.ports.get(pid)
        if port is None or not port.added:
            log.info("console: event %d for absent port %d ignored", event, pid)
        elif event == PORT_READY:
            self._port_ready(port, value)
        elif event == PORT_OPEN:
            port.guest_open = bool(value)
            if port.guest_open:
                self.wake()  # serve input that waited for the port to open
        else:
            log.info("console: unknown event %d for port %d ignored", event, pid)

    def _port_ready(self, port: Port, value: int) -> None:
        if not value:
            log.warning("console: the guest failed to set port %d up", port.id)
            return
        if port.ready:
            return
        port.ready = True
        if port.id == 0:
            self._send(0, CONSOLE_PORT, 1)
        if port.name:
            self._send(port.id, PORT_NAME, 1, port.name.encode())
        port.host_open = port.backend.connected
        if port.host_open:
            self._send(port.id, PORT_OPEN, 1)


# -- the device type: ``console`` (stdio), ``console:pty``, ``console:socket:PATH`` --


def _from_spec(spec: Spec, build: Build) -> ConsoleDevice:
    from emu.backends import chardev

    if not spec.arg:
        backend: CharBackend = chardev.StdioChar()
    elif spec.arg == "pty":
        pty = chardev.PtyChar()
        build.say(f"console: {pty.path}")
        backend = pty
    elif spec.arg.startswith("socket:"):
        backend = chardev.SocketChar(spec.arg.removeprefix("socket:"))
    else:
        raise SpecError("unknown console backend")
    return ConsoleDevice(backend, queue_max_size=build.queue_max)


register(DeviceType(ConsoleDevice, "console[:pty|:socket:PATH]", _from_spec, "emu.testing.console"))
