"""virtio-net's numbers: feature bits, config status bits and control-queue commands.

What the device (``emu.devices.net``, ``emu.devices.net_ctrl``) and a driver
(``emu.testing.net``) agree on, plus the few Ethernet facts and the batch size both of the
device's modules use.
"""

from __future__ import annotations

# feature bits
F_CTRL_GUEST_OFFLOADS = 2
F_MAC = 5
F_GSO = 6  # legacy only
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_CTRL_RX_EXTRA = 20
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
#: GUEST_CSUM TSO4 TSO6 ECN UFO USO4 USO6: what GUEST_OFFLOADS SET may switch
GUEST_OFFLOAD_BITS = sum(1 << b for b in (1, 7, 8, 9, 10, 54, 55))
#: features meaningless without a control queue (spec 5.1.3.1)
NEEDS_CTRL_VQ = sum(
    1 << b
    for b in (
        F_CTRL_RX,
        F_CTRL_VLAN,
        F_GUEST_ANNOUNCE,
        F_MQ,
        F_CTRL_MAC_ADDR,
        F_CTRL_RX_EXTRA,
        F_CTRL_GUEST_OFFLOADS,
    )
)

# config status bits
S_LINK_UP = 1
S_ANNOUNCE = 2

# control queue classes, commands and acks
CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ, CTRL_GUEST_OFFLOADS = 0, 1, 2, 3, 4, 5
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
VLAN_ADD, VLAN_DEL = 0, 1
ANNOUNCE_ACK = 0
MQ_VQ_PAIRS_SET = 0
GUEST_OFFLOADS_SET = 0
ACK_OK, ACK_ERR = 0, 1

ETH_HLEN = 14
BROADCAST = b"\xff" * 6
#: chains the device pops from a ring at a time
BATCH = 64
