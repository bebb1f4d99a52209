"""(c) Per device: what the virtio 1.4 standard parts carry, what needs emu's own parts,
and what cannot move at all, in fields and bytes.

The thread's question: can device state be standard (Jason: everything the driver can
notice must be defined by the spec), or must some of it be implementation-specific
(Stefan: virtio-fs's open files mean different things to different implementations)?
Each device is run into a typical state and saved under ``report`` with requests in
flight (``emu.debate.scenarios``); each part and each field of the device's own part is
put in one of the categories below, with the bytes it takes in the state file (a part:
its 16-byte header and its value; a JSON field: its key and value as the file holds
them). The classification of a device's fields is the table ``FIELDS`` (which field a
driver can observe is a property of the device type, written down here once); the bytes
are measured. A field the table does not know is counted as implementation-specific and
listed, so the table cannot silently fall behind a device.

For net, virtio 1.4 defines a device part (VIRTIO_NET_DEV_PART_CVQ_CFG_PART: the data of
the control-queue commands that set the state, replayed), so its filter fields are also
given in that encoding's bytes, computed from the saved values.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from emu.debate import scenarios
from emu.progress import steps
from emu.state import parts
from emu.state.breakdown import DIGEST_BYTES, HEADER_BYTES, PART_HEADER_BYTES, STANDARD

SPEC_COMMON = "virtio 1.4 common parts"
SPEC_DEVICE = "virtio 1.4 device part"
VQ_STATE = "virtqueue state (no 1.4 part)"
TRANSPORT = "transport registers (no 1.4 part for virtio-mmio)"
VISIBLE = "device state the driver sees (no 1.4 part)"
IMPL = "implementation-specific"
HOST = "host-bound (cannot move)"
FRAMING = "container and framing"
CATEGORIES = (SPEC_COMMON, SPEC_DEVICE, VQ_STATE, TRANSPORT, VISIBLE, IMPL, HOST, FRAMING)
#: categories a state would hold if only the standard were used
STANDARD_CATEGORIES = (SPEC_COMMON, SPEC_DEVICE)

_NET_CVQ = ("mac", "rx_mode", "uni", "multi", "uni_overflow", "multi_overflow", "vlans")
_NET_CVQ += ("active_pairs", "guest_offloads")
#: device -> field (dotted for fields of a list's entries) -> category
FIELDS: dict[str, dict[str, str]] = {
    "blk": {
        **dict.fromkeys(("capacity", "block_size", "readonly", "num_queues"), VISIBLE),
        **dict.fromkeys(("seg_max", "serial", "writeback"), VISIBLE),
    },
    "net": {
        **dict.fromkeys(_NET_CVQ, SPEC_DEVICE),
        "status": VISIBLE,
        **dict.fromkeys(("backlog", "inbox", "tx_sent", "stats"), IMPL),
    },
    "console": {
        **dict.fromkeys(("cols", "rows", "max_ports"), VISIBLE),
        **{f"ports.{k}": VISIBLE for k in ("id", "name", "added", "ready", "guest_open")},
        "ports.host_open": VISIBLE,
        **dict.fromkeys(("ports.input", "ports.tx_sent", "ctrl_out"), IMPL),
    },
    "rng": {},
    "fs": {
        **dict.fromkeys(("tag", "num_request_queues", "readonly", "session"), VISIBLE),
        **dict.fromkeys(("replied", "dir"), IMPL),
    },
    "vsock": {
        **dict.fromkeys(("guest_cid", "buf_alloc"), VISIBLE),
        "next_port": IMPL,
        **dict.fromkeys(("uds", "dropped"), HOST),
    },
    "balloon": dict.fromkeys(("target", "actual", "stats"), VISIBLE),
}
#: what each device holds outside its state: the destination must provide it anew
OUTSIDE = {
    "blk": "the disk (file or NBD export): the destination opens the same storage",
    "net": "the host side (TAP or socket): a new one at the destination",
    "console": "the character device (pty, socket): a new one at the destination",
    "rng": "the entropy source: a new one (it keeps no state)",
    "fs": "open host files: reopened by their paths below the shared directory and checked "
    "against their saved identity (inode, file handle): the same files must be there; an "
    "open file unlinked has no path and comes back stale",
    "vsock": "connections to host programs: host sockets cannot leave the process; the "
    "state lists them as dropped and the guest is sent TRANSPORT_RESET",
    "balloon": "nothing beyond guest RAM",
}


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, sort_keys=True, separators=(",", ":")))


def _fields(value: dict, table: dict[str, str]) -> dict[str, int]:
    """Bytes per field of a device part (``"key":value`` and its comma). A list of
    objects whose entries' fields ``table`` classifies (``list.key``) is split into
    them, each summed over the entries; the list's own key and brackets stay ``list``."""
    out: dict[str, int] = {}
    for key, v in value.items():
        split = any(k.startswith(key + ".") for k in table)
        if split and isinstance(v, list) and all(isinstance(e, dict) for e in v):
            for entry in v:
                for k, x in entry.items():
                    name = f"{key}.{k}"
                    out[name] = out.get(name, 0) + _json_bytes(k) + 2 + _json_bytes(x)
            out[key] = _json_bytes(key) + 2 + 2 + 3 * max(len(v) - 1, 0) + 2 * len(v)
        else:
            out[key] = _json_bytes(key) + 2 + _json_bytes(v)
    return out


def net_standard_bytes(value: dict) -> int:
    """Bytes of net's filter state as virtio 1.4 CVQ_CFG parts (one part per command
    that sets a non-default value: a 16-byte header and the command's data)."""
    n = PART_HEADER_BYTES + 6  # MAC_ADDR_SET
    n += sum(PART_HEADER_BYTES + 1 for on in value["rx_mode"].values() if on)  # RX class
    if value["uni"] or value["multi"]:  # MAC_TABLE_SET: le32 count + macs, twice
        n += PART_HEADER_BYTES + 8 + 6 * (len(value["uni"]) + len(value["multi"]))
    n += (PART_HEADER_BYTES + 2) * len(value["vlans"] or [])  # VLAN_ADD each
    if value["active_pairs"] > 1:
        n += PART_HEADER_BYTES + 2  # MQ_VQ_PAIRS_SET
    if value["guest_offloads"]:
        n += PART_HEADER_BYTES + 8  # GUEST_OFFLOADS_SET
    return n


def _part_category(part_type: int) -> str:
    if part_type in STANDARD:
        return SPEC_COMMON
    if part_type in (parts.RING_STATE, parts.INFLIGHT):
        return VQ_STATE
    if part_type == parts.TRANSPORT:
        return TRANSPORT
    raise ValueError(f"part {part_type:#x} is not classified")


def analyse(saved: scenarios.Saved) -> dict:
    """Bytes and fields per category of one device's state."""
    kind, state = saved.kind, saved.state
    bytes_by: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    fields_by: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    bytes_by[FRAMING] = HEADER_BYTES + DIGEST_BYTES
    unknown: list[str] = []
    device: dict = {}
    inflight = 0
    for p, value in parts.parse(state):
        kind_name = parts.kind_of(p.type).name  # type: ignore[union-attr]
        if parts.is_device_part(p.type):
            device = value
            accounted = 0
            table = FIELDS[kind]
            for name, n in _fields(value, table).items():
                category = table.get(name)
                if category is None and any(k.startswith(name + ".") for k in table):
                    category = FRAMING  # a split list's key, brackets and commas
                elif category is None:
                    category = IMPL
                    unknown.append(name)
                bytes_by[category] += n
                if category != FRAMING:
                    fields_by[category].append(name)
                accounted += n
            bytes_by[FRAMING] += PART_HEADER_BYTES + len(p.value) - accounted
            continue
        category = _part_category(p.type)
        bytes_by[category] += PART_HEADER_BYTES + len(p.value)
        label = kind_name if not parts.kind_of(p.type).per_queue else f"{kind_name}[{p.vq_index}]"  # type: ignore[union-attr]
        fields_by[category].append(label)
        if p.type == parts.INFLIGHT:
            inflight += len(value)
    standard = None
    if kind == "net":
        standard = net_standard_bytes(device)
    host = {}
    if kind == "vsock":
        host["connections dropped"] = len(device.get("dropped", []))
    if kind == "fs":
        d = device.get("dir", {})
        host["host files open (reopened by path)"] = len(d.get("handles", []))
        host["host inodes referenced"] = len(d.get("nodes", []))
    total = sum(bytes_by.values())
    return dict(
        device=kind,
        total_bytes=total,
        bytes=bytes_by,
        fields=fields_by,
        inflight_chains=inflight,
        net_cvq_standard_bytes=standard,
        unclassified=unknown,
        host=host,
        outside=OUTSIDE[kind],
    )


def run(quick: bool) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(steps(scenarios.KINDS, "(c) state per device")):
            where = Path(tmp) / str(i)
            where.mkdir()
            with scenarios.stopped(kind, where) as saved:
                rows.append(analyse(saved))
    return dict(devices=rows, categories=list(CATEGORIES))
