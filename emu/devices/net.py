"""virtio-net: Ethernet frames between the guest and a backend (cable, TAP).

Queues: receiveq_k = 2k, transmitq_k = 2k+1, controlq = 2N where N is max_virtqueue_pairs
when MQ is negotiated and 1 otherwise (so the control queue moves with the negotiation).

Receive path: a backend thread calls ``deliver`` (any thread) which only appends to an
inbox and wakes the device thread. There ``on_wake`` runs the rx filter, picks the pair
by a per-flow hash (a flow stays in order; this is not RSS) and queues the frame on that
pair's bounded backlog; frames beyond the bound are dropped and counted, as a NIC whose
guest posts no buffers drops them. Serving an rx queue copies backlog frames into chains.

The control queue (rx mode, MAC and VLAN tables, MAC address, active pairs, offloads) and
the receive filter it programs are ``emu.devices.net_ctrl``; the numbers driver and device
share, ``emu.devices.net_defs``.

Stop and snapshot: chains the device holds for rx are handed back to the queue (it
presents them again). A report stop publishes nothing more, so a frame already copied into
chains whose used entries did not go out returns to the front of its backlog, and a tx
chain already sent is completed after resume without being sent again: no frame is lost
or duplicated by a stop. The snapshot keeps the MAC, rx mode, MAC and VLAN tables, active
pairs, offloads, status, stats and the backlogs (frames not yet filed are filed on load).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Protocol

from emu.devices import _persist, net_ctrl
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
from emu.devices.net_ctrl import MAC_TABLE_ENTRIES, RX_MODE, RxFilter
from emu.devices.net_defs import (
    BATCH,
    ETH_HLEN,
    F_CTRL_GUEST_OFFLOADS,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_RX_EXTRA,
    F_CTRL_VLAN,
    F_CTRL_VQ,
    F_GSO,
    F_GUEST_ANNOUNCE,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_STATUS,
    GUEST_OFFLOAD_BITS,
    NEEDS_CTRL_VQ,
    S_ANNOUNCE,
    S_LINK_UP,
)
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register
from emu.queue import Virtqueue
from emu.ringdefs import F_VERSION_1
from emu.state.format import StateError
from emu.state.schema import Bool, Bytes, Int, List, Nullable, Obj, Schema, Str

log = logging.getLogger(__name__)

#: features every NetDevice offers (MQ and MRG_RXBUF depend on the constructor)
OFFERED = sum(
    1 << b
    for b in (
        F_CTRL_GUEST_OFFLOADS,
        F_MAC,
        F_STATUS,
        F_CTRL_VQ,
        F_CTRL_RX,
        F_CTRL_VLAN,
        F_CTRL_RX_EXTRA,
        F_GUEST_ANNOUNCE,
        F_CTRL_MAC_ADDR,
    )
)
#: largest frame either way: a 64 KiB GSO payload plus Ethernet and VLAN headers
MAX_FRAME = 65536 + 18


class NetBackend(Protocol):
    """Where frames go. ``attach`` hands over the device whose ``deliver`` takes rx frames."""

    def attach(self, device: NetDevice) -> None: ...

    def send(self, frame: bytes) -> None: ...  # device thread; must not block for long

    def close(self) -> None: ...


def parse_mac(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


@dataclass
class NetStats:
    """Counters; each has one writer thread (``rx_overrun`` the backend's, the rest the
    device's), so ``+=`` needs no lock."""

    tx_frames: int = 0
    tx_errors: int = 0  # chains without a header or frame, or over MAX_FRAME
    rx_frames: int = 0
    rx_filtered: int = 0  # refused by the rx filter (or runts)
    rx_dropped: int = 0  # backlog full: the guest is not posting buffers fast enough
    rx_overrun: int = 0  # inbox full: the device thread is not keeping up (or not running)
    rx_too_big: int = 0  # larger than the buffers the guest posted


def _mac(value: str, what: str) -> bytes:
    try:
        mac = bytes.fromhex(value)
    except (TypeError, ValueError):
        mac = b""
    if len(mac) != 6:
        raise StateError(f"{what}: {value!r} is not a MAC address in hex")
    return mac


def flow_hash(frame: bytes) -> int:
    """A stable per-flow number: IP addresses and L4 ports, else the MAC pair."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34:
        l4 = ETH_HLEN + (frame[14] & 0xF) * 4
        key = frame[26:34] + frame[l4 : l4 + 4]
    elif ethertype == b"\x86\xdd" and len(frame) >= 54:
        key = frame[22:58]
    else:
        key = frame[:12]
    return zlib.crc32(key)


#: frames in one saved backlog at most (the device's bound is smaller; checked on load)
_FRAMES = 1 << 16
_FRAME = Bytes(MAX_FRAME)
#: the device part of a snapshot (``save_state``)
STATE = Schema(
    "net state",
    1,
    0,
    {
        "mac": Str(12),
        "status": Int(0, S_LINK_UP | S_ANNOUNCE),
        "active_pairs": Int(1, 0x8000),
        "guest_offloads": Int(0, GUEST_OFFLOAD_BITS),
        "rx_mode": Obj(dict.fromkeys(RX_MODE, Bool())),
        "uni": List(Str(12), MAC_TABLE_ENTRIES),
        "multi": List(Str(12), MAC_TABLE_ENTRIES),
        "uni_overflow": Bool(),
        "multi_overflow": Bool(),
        "vlans": Nullable(List(Int(0, 4095), 4096)),
        "backlog": List(List(_FRAME, _FRAMES), 0x8000),
        "inbox": List(_FRAME, _FRAMES),
        "tx_sent": List(List(Int(0, 0xFFFF), 0x8000), 0x8000),
        "stats": Obj({x.name: Int(0, 2**64 - 1) for x in fields(NetStats)}),
    },
)


class NetDevice(VirtioDevice):
    device_id = 1
    name = "net"
    state_schema = STATE
    legacy_features = 1 << F_GSO

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: str = "52:54:00:12:34:56",
        queue_pairs: int = 1,
        mrg_rxbuf: bool = True,
        queue_max_size: int | None = None,
        backlog: int = 256,
    ) -> None:
        if not 1 <= queue_pairs <= 0x8000:
            raise ValueError(f"queue_pairs {queue_pairs} not in 1..32768")
        features = OFFERED | (1 << F_MRG_RXBUF if mrg_rxbuf else 0)
        features |= 1 << F_MQ if queue_pairs > 1 else 0
        super().__init__(2 * queue_pairs + 1, features, queue_max_size)
        self.max_pairs = queue_pairs
        self.default_mac = parse_mac(mac)
        self.backlog_limit = backlog
        self.stats = NetStats()
        self.backend = backend
        # frames from backend threads; the only state shared with them
        self._inbox: deque[bytes] = deque()
        self._clear_state()
        backend.attach(self)

    def _clear_state(self) -> None:
        self.mac = self.default_mac
        self.status = S_LINK_UP
        self.active_pairs = 1
        self.filter = RxFilter()
        self.guest_offloads = 0
        self._backlog: list[deque[bytes]] = [deque() for _ in range(self.max_pairs)]
        self._held: list[deque[Chain]] = [deque() for _ in range(self.max_pairs)]
        # per pair: frames in rx chains and tx chains sent, used entries maybe not out yet
        self._rx_out: list[Unpublished[bytes]] = [Unpublished() for _ in range(self.max_pairs)]
        self._tx_out: list[Unpublished[int]] = [Unpublished() for _ in range(self.max_pairs)]
        #: per pair: in-flight tx heads already sent before a stop; complete, do not resend
        self._tx_sent: list[set[int]] = [set() for _ in range(self.max_pairs)]

    # -- config space --

    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HH", self.status, self.max_pairs)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # a legacy driver without CTRL_MAC_ADDR sets its MAC by writing config space
        if not self.has(F_VERSION_1) and 0 <= offset and offset + size <= 6:
            mac = bytearray(self.mac)
            mac[offset : offset + size] = value.to_bytes(size, "little")
            self.mac = bytes(mac)
        else:
            super().write_config(offset, size, value)

    def accept_features(self, features: int) -> bool:
        if features & NEEDS_CTRL_VQ and not features >> F_CTRL_VQ & 1:
            return False
        return super().accept_features(features)

    # -- lifecycle --

    def on_activate(self, features: int) -> None:
        if not features >> F_CTRL_VLAN & 1:
            self.filter.vlans = None
        elif self.filter.vlans is None:  # a restored table is kept
            self.filter.vlans = set()

    def on_reset(self) -> None:
        self._inbox.clear()
        self._clear_state()

    def close(self) -> None:
        self.backend.close()  # first: its thread calls deliver() and so wake()
        super().close()

    def announce(self) -> None:
        """Ask the guest to announce itself (gratuitous ARP), e.g. after migration."""
        if self.has(F_GUEST_ANNOUNCE):
            self.status |= S_ANNOUNCE
            self.on_config_change()

    # -- rx: backend threads hand frames over, the device thread files them --

    def deliver(self, frame: bytes) -> None:
        """A frame from the backend for the guest; any thread, never blocks."""
        if len(self._inbox) >= self.backlog_limit:
            self.stats.rx_overrun += 1
            return
        self._inbox.append(frame)
        self.wake()

    def on_wake(self) -> None:
        while self._inbox:
            self._file(self._inbox.popleft())

    def _file(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            self.stats.rx_too_big += 1
            return
        if not self.filter.accepts(frame, self.mac):
            self.stats.rx_filtered += 1
            return
        pair = flow_hash(frame) % self.active_pairs if self.active_pairs > 1 else 0
        backlog = self._backlog[pair]
        if len(backlog) >= self.backlog_limit:
            self.stats.rx_dropped += 1
        else:
            backlog.append(frame)

    def set_active_pairs(self, pairs: int) -> None:
        """MQ VQ_PAIRS_SET (``net_ctrl``): receive on the first ``pairs`` pairs only."""
        self.active_pairs = pairs
        # frames waiting on pairs that just went idle are spread over the active ones
        for backlog in self._backlog[pairs:]:
            while backlog:
                self._file(backlog.popleft())

    @property
    def hdr_len(self) -> int:
        return 12 if self.has(F_VERSION_1) or self.has(F_MRG_RXBUF) else 10

    def _layout_pairs(self) -> int:
        return self.max_pairs if self.has(F_MQ) else 1

    def wants_poll(self, q: Virtqueue) -> bool:
        pair, odd = divmod(q.index, 2)
        return not odd and pair < self.active_pairs and bool(self._backlog[pair])

    def handle_queue(self, q: Virtqueue) -> None:
        pairs = self._layout_pairs()
        if q.index < 2 * pairs:
            if q.index % 2:
                self._serve_tx(q)
            else:
                self._serve_rx(q)
        elif q.index == 2 * pairs and self.has(F_CTRL_VQ):
            net_ctrl.serve(self, q)
        else:
            log.info("net: kick on queue %d, not in the negotiated layout", q.index)

    def _serve_rx(self, q: Virtqueue) -> None:
        pair = q.index // 2
        backlog, held = self._backlog[pair], self._held[pair]
        heads: list[int] = []
        lengths: list[int] = []
        while backlog:
            frame = backlog[0]
            need = self.hdr_len + len(frame)
            bufs = self._rx_buffers(q, held, need, len(backlog))
            if bufs is None:  # ring empty: wait for the guest's kick
                if q.set_kicks(True):
                    continue
                break
            backlog.popleft()
            if sum(c.in_len for c in bufs) < need:
                self.stats.rx_too_big += 1
                # without MRG_RXBUF the too-small buffer goes back empty; with it, a frame
                # bigger than the whole ring gets [] and the buffers stay for the next one
                heads.extend(c.head for c in bufs)
                lengths.extend(0 for _ in bufs)
                continue
            hdr = bytearray(self.hdr_len)
            if self.hdr_len == 12:
                hdr[10:12] = len(bufs).to_bytes(2, "little")
            data = memoryview(bytes(hdr) + frame)
            for c in bufs:
                n = scatter(self.mem, c, data)
                data = data[n:]
                heads.append(c.head)
                lengths.append(n)
            self._rx_out[pair].record([c.head for c in bufs], frame)
            self.stats.rx_frames += 1
        if heads:
            q.push(heads, lengths)

    def _rx_buffers(
        self, q: Virtqueue, held: deque[Chain], need: int, frames: int
    ) -> list[Chain] | None:
        """Chains for one frame, or None when the ring has too few right now.

        Without MRG_RXBUF that is always one chain (the caller checks it is big enough).
        Chains popped beyond one frame's need stay held for the next frames. With
        MRG_RXBUF a frame that would need more than every ring entry gets [] (dropped);
        on a ring of multi-descriptor chains that point is never reached, and such a
        frame waits, as in QEMU, for buffers the guest may never post.
        """
        mrg = self.has(F_MRG_RXBUF)
        cap = n = 0
        while True:
            while n < len(held):
                cap += held[n].in_len
                n += 1
                if cap >= need or not mrg:
                    return [held.popleft() for _ in range(n)]
            batch = q.pop(min(BATCH, max(frames, 1)) if not mrg else BATCH)
            if not len(batch):
                return [] if mrg and len(held) >= q.size else None
            self._rx_out[q.index // 2].popped(batch.heads.tolist())
            held.extend(chains(batch))

    # -- tx --

    def _serve_tx(self, q: Virtqueue) -> None:
        pair = q.index // 2
        serve_output(q, BATCH, self._tx_out[pair], self._tx_sent[pair], self._transmit)

    def _transmit(self, chain: Chain) -> None:
        # the header is not looked at: no CSUM/HOST_TSO is offered, and a legacy GSO
        # frame goes out unsegmented
        data = gather(self.mem, chain, self.hdr_len + MAX_FRAME)
        if data is None or len(data) < self.hdr_len + ETH_HLEN:
            self.stats.tx_errors += 1
            return
        self.stats.tx_frames += 1
        self.backend.send(data[self.hdr_len :])

    # -- stop and snapshot --

    def on_queue_reset(self, index: int) -> None:
        if index < 2 * self.max_pairs and index % 2:  # tx: the heads come back as new frames
            self._tx_sent[index // 2].clear()

    def forget_inflight(self, queues: set[int]) -> None:
        """Hand held rx chains back; settle what went into chains left in flight."""
        for pair in range(self.max_pairs):
            rxq, txq = self.queues[2 * pair], self.queues[2 * pair + 1]
            if rxq.started and rxq.index in queues:
                self._held[pair].clear()
                back = self._rx_out[pair].settle(inflight_heads(rxq))
                self._backlog[pair].extendleft(reversed(back))
            if txq.started and txq.index in queues:
                self._tx_sent[pair].update(self._tx_out[pair].settle(inflight_heads(txq)))

    def save_state(self) -> dict:
        f = self.filter
        return {
            "mac": self.mac.hex(),
            "status": self.status,
            "active_pairs": self.active_pairs,
            "guest_offloads": self.guest_offloads,
            "rx_mode": {name: getattr(f, name) for name in RX_MODE},
            "uni": sorted(m.hex() for m in f.uni),
            "multi": sorted(m.hex() for m in f.multi),
            "uni_overflow": f.uni_overflow,
            "multi_overflow": f.multi_overflow,
            "vlans": sorted(f.vlans) if f.vlans is not None else None,
            "backlog": [[_persist.b64(fr) for fr in b] for b in self._backlog],
            "inbox": [_persist.b64(fr) for fr in list(self._inbox)],
            "tx_sent": [sorted(s) for s in self._tx_sent],
            "stats": asdict(self.stats),
        }

    def load_state(self, state: dict) -> None:
        """Check every field first (a refused snapshot changes nothing), then apply."""
        s = STATE.check(state)
        mac = _mac(s["mac"], "net state mac")
        tables = {
            key: {_mac(m, f"net state {key} table") for m in s[key]} for key in ("uni", "multi")
        }
        vlans = set(s["vlans"]) if s["vlans"] is not None else None
        _persist.in_range(s["active_pairs"], 1, self.max_pairs, "net state active_pairs")
        if s["guest_offloads"] & ~GUEST_OFFLOAD_BITS:
            raise StateError(f"net state: guest offloads {s['guest_offloads']:#x} not allowed")
        pairs = self.max_pairs
        if len(s["backlog"]) != pairs or len(s["tx_sent"]) != pairs:
            raise StateError(
                f"net state is of a device with {len(s['backlog'])} queue pairs, "
                f"this one has {pairs}"
            )
        # a backlog holds up to its limit, plus frames taken back from in-flight chains
        most = self.backlog_limit + self.queue_max_size
        backlogs = []
        for k, frames in enumerate([*s["backlog"], s["inbox"]]):
            if len(frames) > most:
                raise StateError(f"net state: backlog {k} holds more than {most} frames")
            got = [_persist.unb64(fr, f"net state backlog {k}") for fr in frames]
            if any(len(fr) > MAX_FRAME for fr in got):
                raise StateError(f"net state: backlog {k} has a frame over {MAX_FRAME} bytes")
            backlogs.append(got)
        sent = []
        for heads in s["tx_sent"]:
            sent.append(set(_persist.int_list(heads, 0, self.queue_max_size - 1, "tx head")))

        self.mac = mac
        self.status = s["status"]
        self.active_pairs = s["active_pairs"]
        self.guest_offloads = s["guest_offloads"]
        self.filter = RxFilter(
            **s["rx_mode"],
            uni=tables["uni"],
            multi=tables["multi"],
            uni_overflow=s["uni_overflow"],
            multi_overflow=s["multi_overflow"],
            vlans=vlans,
        )
        self.stats = NetStats(**s["stats"])
        *pair_backlogs, inbox = backlogs
        self._backlog = [deque(b) for b in pair_backlogs]
        self._tx_sent = sent
        for frame in inbox:  # arrived while stopped: filed as if just delivered
            self._file(frame)


# -- the device type: ``net:tap:NAME``, ``net:cable`` --


def serve_mac(position: int) -> str:
    """The MAC of the net device at ``position`` among the specs, 52:54:00:12:34:NN with
    NN = position + 1 (QEMU's virtio-net keeps its own MAC: it must be given this one)."""
    return f"52:54:00:12:34:{position + 1:02x}"


def _from_spec(spec: Spec, build: Build) -> NetDevice:
    """``net:cable`` ends pair up in order (the 1st with the 2nd, ...), joining two NICs."""
    mac = serve_mac(spec.position)
    if spec.arg == "cable":
        from emu.backends.cable import Cable

        waiting = build.shared.pop("net:cable", None)
        if waiting is None:
            end, build.shared["net:cable"] = Cable.pair()
        else:
            end = waiting
        return NetDevice(end, mac=mac, queue_max_size=build.queue_max)
    if spec.arg.startswith("tap:"):
        from emu.backends.tap import Tap

        return NetDevice(
            Tap(spec.arg.removeprefix("tap:")), mac=mac, queue_max_size=build.queue_max
        )
    raise SpecError("a backend, tap:NAME or cable")


def _finish(build: Build) -> None:
    if "net:cable" in build.shared:
        raise SpecError("net:cable devices come in pairs")


register(
    DeviceType(
        NetDevice,
        "net:tap:NAME|net:cable",
        _from_spec,
        "emu.testing.net",
        finish=_finish,
        frontend=lambda spec: {"mac": serve_mac(spec.position)},
    )
)
