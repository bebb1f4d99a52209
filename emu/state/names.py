"""Feature and status bits in words, for people reading a state file.

The names are the virtio spec's (``VIRTIO_F_*``, ``VIRTIO_<DEV>_F_*`` without the prefix),
keyed by virtio device id, so that ``emu state show`` and ``emu state diff`` can say
"EVENT_IDX" instead of "bit 29" without importing the devices (the state layer sits below
them). A bit without a name here is shown as ``bit N``: a new device works unnamed.
"""

from __future__ import annotations

#: transport and ring features (bits 24-49), common to every device type; bit 47 is where
#: emu's experimental STOP feature usually sits (the transport can move it)
TRANSPORT_FEATURES = {
    24: "NOTIFY_ON_EMPTY",
    27: "ANY_LAYOUT",
    28: "INDIRECT_DESC",
    29: "EVENT_IDX",
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
    41: "ADMIN_VQ",
    43: "SUSPEND",
    47: "EMU_STOP",
}

#: device-specific features (bits 0-23) by virtio device id
DEVICE_FEATURES: dict[int, dict[int, str]] = {
    1: {  # net
        0: "CSUM",
        1: "GUEST_CSUM",
        2: "CTRL_GUEST_OFFLOADS",
        3: "MTU",
        5: "MAC",
        6: "GSO",
        7: "GUEST_TSO4",
        8: "GUEST_TSO6",
        9: "GUEST_ECN",
        10: "GUEST_UFO",
        11: "HOST_TSO4",
        12: "HOST_TSO6",
        13: "HOST_ECN",
        14: "HOST_UFO",
        15: "MRG_RXBUF",
        16: "STATUS",
        17: "CTRL_VQ",
        18: "CTRL_RX",
        19: "CTRL_VLAN",
        20: "CTRL_RX_EXTRA",
        21: "GUEST_ANNOUNCE",
        22: "MQ",
        23: "CTRL_MAC_ADDR",
    },
    2: {  # blk
        0: "BARRIER",
        1: "SIZE_MAX",
        2: "SEG_MAX",
        4: "GEOMETRY",
        5: "RO",
        6: "BLK_SIZE",
        7: "SCSI",
        9: "FLUSH",
        10: "TOPOLOGY",
        11: "CONFIG_WCE",
        12: "MQ",
        13: "DISCARD",
        14: "WRITE_ZEROES",
        15: "LIFETIME",
        16: "SECURE_ERASE",
    },
    3: {0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"},  # console
    5: {  # balloon
        0: "MUST_TELL_HOST",
        1: "STATS_VQ",
        2: "DEFLATE_ON_OOM",
        3: "FREE_PAGE_HINT",
        4: "PAGE_POISON",
        5: "PAGE_REPORTING",
    },
    19: {0: "STREAM", 1: "SEQPACKET", 2: "NO_IMPLIED_STREAM"},  # vsock
    26: {0: "NOTIFICATION"},  # fs
}

STATUS = {
    0x01: "ACKNOWLEDGE",
    0x02: "DRIVER",
    0x04: "DRIVER_OK",
    0x08: "FEATURES_OK",
    0x10: "SUSPEND",
    0x20: "STOP",
    0x40: "DEVICE_NEEDS_RESET",
    0x80: "FAILED",
}


def feature_name(bit: int, device_type: int) -> str:
    if bit < 24:
        name = DEVICE_FEATURES.get(device_type, {}).get(bit)
    else:
        name = TRANSPORT_FEATURES.get(bit)
    return name or f"bit {bit}"


def feature_words(bits: int, device_type: int) -> list[str]:
    """The names of the bits set in ``bits``, lowest first."""
    return [feature_name(b, device_type) for b in range(bits.bit_length()) if bits >> b & 1]


def status_words(status: int) -> list[str]:
    return [name for bit, name in STATUS.items() if status & bit]
