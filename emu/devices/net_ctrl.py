"""virtio-net's control queue: the commands and the receive filter they program.

The guest sets the rx mode, the MAC tables, the VLAN filter, its MAC address, the number of
active queue pairs and its offloads here; each command is answered ACK_OK or ACK_ERR, and
a malformed or unnegotiated one changes nothing. ``RxFilter`` is what the data path asks
about every received frame.

The default filter accepts own unicast, broadcast and *all* multicast: a Linux guest
without CTRL_RX cannot program a multicast list, and IPv6 neighbour discovery needs it.
Once the guest sends RX/MAC commands, they are honoured (QEMU's semantics, except that
QEMU starts promiscuous).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emu.devices._chain import chains, gather, scatter
from emu.devices.net_defs import (
    ACK_ERR,
    ACK_OK,
    ANNOUNCE_ACK,
    BATCH,
    BROADCAST,
    CTRL_ANNOUNCE,
    CTRL_GUEST_OFFLOADS,
    CTRL_MAC,
    CTRL_MQ,
    CTRL_RX,
    CTRL_VLAN,
    ETH_HLEN,
    F_CTRL_GUEST_OFFLOADS,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_RX_EXTRA,
    F_GUEST_ANNOUNCE,
    F_MQ,
    GUEST_OFFLOAD_BITS,
    GUEST_OFFLOADS_SET,
    MAC_ADDR_SET,
    MAC_TABLE_SET,
    MQ_VQ_PAIRS_SET,
    RX_ALLMULTI,
    S_ANNOUNCE,
    VLAN_ADD,
    VLAN_DEL,
)
from emu.queue import Virtqueue

if TYPE_CHECKING:
    from emu.devices.net import NetDevice

log = logging.getLogger(__name__)

#: MAC table entries kept per table; a longer table means "accept all" of that kind (QEMU)
MAC_TABLE_ENTRIES = 64
#: a control command bigger than this is refused unread (two full MAC tables fit easily)
CTRL_MAX = 64 * 1024
#: RxFilter's mode switches, in the order of the CTRL_RX commands
RX_MODE = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")


@dataclass
class RxFilter:
    """What the guest asked to receive through the control queue."""

    promisc: bool = False
    allmulti: bool = True
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    uni: set[bytes] = field(default_factory=set)
    multi: set[bytes] = field(default_factory=set)
    uni_overflow: bool = False
    multi_overflow: bool = False
    vlans: set[int] | None = None  # None: no VLAN filtering (CTRL_VLAN not negotiated)

    def accepts(self, frame: bytes, own_mac: bytes) -> bool:
        if len(frame) < ETH_HLEN:
            return False
        if self.promisc:
            return True
        if self.vlans is not None and frame[12:14] == b"\x81\x00" and len(frame) >= 16:
            if int.from_bytes(frame[14:16], "big") & 0xFFF not in self.vlans:
                return False
        dst = frame[:6]
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multi
        if self.nouni:
            return False
        return self.alluni or self.uni_overflow or dst == own_mac or dst in self.uni


def parse_mac_tables(body: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """MAC TABLE_SET data: two ``le32 entries; u8 macs[entries][6]``; None if malformed.

    Entry counts come from the guest, so each is checked against the bytes actually there.
    """
    tables: list[list[bytes]] = []
    off = 0
    for _ in range(2):
        if len(body) - off < 4:
            return None
        (n,) = struct.unpack_from("<I", body, off)
        off += 4
        if n > (len(body) - off) // 6:
            return None
        tables.append([body[off + 6 * i : off + 6 * i + 6] for i in range(n)])
        off += 6 * n
    if off != len(body):
        return None
    return tables[0], tables[1]


def serve(dev: NetDevice, q: Virtqueue) -> None:
    """Answer every command on the control queue ``q``, on the device thread."""
    while True:
        q.set_kicks(False)
        while len(batch := q.pop(BATCH)):
            lengths = []
            for c in chains(batch):
                cmd = gather(dev.mem, c, CTRL_MAX)
                ack = _command(dev, cmd) if cmd is not None else ACK_ERR
                lengths.append(scatter(dev.mem, c, bytes([ack])))
            q.push(batch.heads, lengths)
        if not q.set_kicks(True):
            return


def _command(dev: NetDevice, cmd: bytes) -> int:
    if len(cmd) < 2:
        log.info("net: control command of %d bytes", len(cmd))
        return ACK_ERR
    cls, op, body = cmd[0], cmd[1], cmd[2:]
    handler = _HANDLERS.get(cls)
    ok = handler is not None and handler(dev, op, body)
    if not ok:
        log.info("net: control class %d command %d (%d bytes) refused", cls, op, len(body))
    return ACK_OK if ok else ACK_ERR


def _cmd_rx(dev: NetDevice, op: int, body: bytes) -> bool:
    needs = F_CTRL_RX if op <= RX_ALLMULTI else F_CTRL_RX_EXTRA
    if op >= len(RX_MODE) or not dev.has(needs) or len(body) != 1:
        return False
    setattr(dev.filter, RX_MODE[op], bool(body[0]))
    return True


def _cmd_mac(dev: NetDevice, op: int, body: bytes) -> bool:
    if op == MAC_ADDR_SET and dev.has(F_CTRL_MAC_ADDR) and len(body) == 6:
        dev.mac = bytes(body)
        return True
    if op != MAC_TABLE_SET or not dev.has(F_CTRL_RX):
        return False
    tables = parse_mac_tables(body)
    if tables is None:
        return False
    uni, multi = tables
    f = dev.filter
    f.uni_overflow = len(uni) > MAC_TABLE_ENTRIES
    f.multi_overflow = len(multi) > MAC_TABLE_ENTRIES
    f.uni = set() if f.uni_overflow else set(uni)
    f.multi = set() if f.multi_overflow else set(multi)
    return True


def _cmd_vlan(dev: NetDevice, op: int, body: bytes) -> bool:
    vlans = dev.filter.vlans
    if vlans is None or op not in (VLAN_ADD, VLAN_DEL) or len(body) != 2:
        return False
    vid = int.from_bytes(body, "little")
    if vid >= 4096:
        return False
    if op == VLAN_ADD:
        vlans.add(vid)
    else:
        vlans.discard(vid)
    return True


def _cmd_announce(dev: NetDevice, op: int, body: bytes) -> bool:
    if op != ANNOUNCE_ACK or not dev.has(F_GUEST_ANNOUNCE) or body:
        return False
    dev.status &= ~S_ANNOUNCE
    return True


def _cmd_mq(dev: NetDevice, op: int, body: bytes) -> bool:
    if op != MQ_VQ_PAIRS_SET or not dev.has(F_MQ) or len(body) != 2:
        return False
    pairs = int.from_bytes(body, "little")
    if not 1 <= pairs <= dev.max_pairs:
        return False
    dev.set_active_pairs(pairs)
    return True


def _cmd_offloads(dev: NetDevice, op: int, body: bytes) -> bool:
    if op != GUEST_OFFLOADS_SET or not dev.has(F_CTRL_GUEST_OFFLOADS) or len(body) != 8:
        return False
    offloads = int.from_bytes(body, "little")
    if offloads & ~(dev.driver_features & GUEST_OFFLOAD_BITS):
        return False
    dev.guest_offloads = offloads
    return True


_HANDLERS: dict[int, Callable[[NetDevice, int, bytes], bool]] = {
    CTRL_RX: _cmd_rx,
    CTRL_MAC: _cmd_mac,
    CTRL_VLAN: _cmd_vlan,
    CTRL_ANNOUNCE: _cmd_announce,
    CTRL_MQ: _cmd_mq,
    CTRL_GUEST_OFFLOADS: _cmd_offloads,
}
