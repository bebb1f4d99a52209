"""A state file part by part, for people: what is standard, what is emu's, and its bytes.

``emu state show --breakdown`` prints this; ``emu state show`` prints the same state as
JSON. Each part is listed with the bytes it takes in the file (its 16-byte
``virtio_dev_part_hdr`` plus its value) and whether virtio 1.4 defines it (the spec's
device parts: features, status, queue config) or it is one of emu's extension parts
(ring state, in-flight chains, transport registers, the device's own state). A JSON part
(TRANSPORT, a device part) is shown field by field; a list of objects in it becomes a
table with each row's size in the file, which is how the fs device's nodes and open
handles are read (and what one node or one handle costs). Nothing here is fs-specific:
any device part gets the same treatment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from emu.state import parts
from emu.state.format import DeviceState, Part
from emu.state.names import feature_words, status_words
from emu.state.schema import Schema

#: the container around the parts: header (magic, version, type, flags, count, length)
#: and the sha256 trailer (emu.state.format)
HEADER_BYTES = 24
DIGEST_BYTES = 32
PART_HEADER_BYTES = 16
#: the part types virtio 1.4 defines (device-parts.tex); everything else here is emu's
STANDARD = frozenset({parts.DEV_FEATURES, parts.DRV_FEATURES, parts.DEVICE_STATUS, parts.VQ_CFG})

#: a string longer than this is shortened in a table (file handles, long paths)
_CELL = 40


def file_bytes(state: DeviceState) -> int:
    return HEADER_BYTES + sum(PART_HEADER_BYTES + len(p.value) for p in state.parts) + DIGEST_BYTES


def breakdown(state: DeviceState, schemas: Mapping[int, Schema] | None = None) -> list[str]:
    """The lines of the breakdown; the state is decoded as ``emu state show`` decodes it
    (StateError for what it refuses)."""
    values = {id(p): v for p, v in parts.parse(state, schemas)}
    out = [
        f"device type {state.device_type}, {len(state.parts)} parts, {file_bytes(state)} bytes "
        f"(header {HEADER_BYTES}, sha256 {DIGEST_BYTES}, each part a {PART_HEADER_BYTES}-byte "
        "header and its value)",
        "",
        f"{'part':<22} {'vq':>3}  {'defined by':<19} {'bytes':>11}  value",
    ]
    totals = {True: [0, 0], False: [0, 0]}
    details: list[str] = []
    for p in state.parts:
        kind = parts.kind_of(p.type)
        name = kind.name if kind else "unknown"
        standard = p.type in STANDARD
        owner = "virtio 1.4" if standard else "emu extension"
        if kind is not None and kind.version is not None and len(p.value) >= 4:
            owner += " {}.{}".format(
                *(int.from_bytes(p.value[i : i + 2], "little") for i in (0, 2))
            )
        if p.optional:
            owner += "?"
        vq = str(p.vq_index) if kind is not None and kind.per_queue else ""
        size = f"{PART_HEADER_BYTES}+{len(p.value)}"
        value = values.get(id(p))
        summary = (
            "(skipped: not understood)"
            if id(p) not in values
            else _summary(p, value, state.device_type)
        )
        out.append(f"{p.type:#06x} {name:<15} {vq:>3}  {owner:<19} {size:>11}  {summary}")
        totals[standard][0] += 1
        totals[standard][1] += PART_HEADER_BYTES + len(p.value)
        json_part = p.type == parts.TRANSPORT or parts.is_device_part(p.type)
        if json_part and isinstance(value, dict):
            details += ["", f"{name} ({len(p.value)} bytes: 4 of version, then JSON)"]
            details += _tree(value, "  ")
    out += [
        "",
        f"virtio 1.4 parts:    {totals[True][0]:3} parts, {totals[True][1]:7} bytes",
        f"emu extension parts: {totals[False][0]:3} parts, {totals[False][1]:7} bytes",
        f"container:                      {HEADER_BYTES + DIGEST_BYTES:7} bytes",
        "(? after the owner: an optional part, which a restorer that does not know it skips)",
    ]
    return out + details


def _summary(p: Part, value: Any, device_type: int) -> str:
    if p.type in (parts.DEV_FEATURES, parts.DRV_FEATURES):
        return f"{value:#x} {' '.join(feature_words(value, device_type))}"
    if p.type == parts.DEVICE_STATUS:
        return f"{value:#04x} {' '.join(status_words(value))}"
    if p.type == parts.VQ_CFG:
        return (
            f"size {value['size']}, {'enabled' if value['enabled'] else 'disabled'}, desc "
            f"{value['desc']:#x} driver {value['driver']:#x} device {value['device']:#x}"
        )
    if p.type == parts.RING_STATE:
        return (
            f"next avail {value['next_avail']} used {value['next_used']}, wraps "
            f"{int(value['avail_wrap'])}/{int(value['used_wrap'])}, "
            f"signalled {value['signalled_used']}"
        )
    if p.type == parts.INFLIGHT:
        segs = sum(len(c["segments"]) for c in value)
        return f"{len(value)} chains, {segs} buffers"
    if isinstance(value, dict):
        return "JSON: " + ", ".join(value)
    return _cell(value)


def _json_bytes(value: Any) -> int:
    """Bytes of ``value`` as the file holds it (emu.state.parts encodes JSON compactly)."""
    return len(json.dumps(value, sort_keys=True, separators=(",", ":")))


def _tree(value: dict, indent: str, prefix: str = "") -> list[str]:
    """Scalars as ``key: value`` lines, objects by their dotted path, lists of objects
    as tables."""
    lines = []
    scalars = [f"{k} {_cell(v, k)}" for k, v in value.items() if not isinstance(v, dict | list)]
    if scalars:
        lines.append(f"{indent}{prefix or '.'}: {', '.join(scalars)}")
    for key, v in value.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(v, dict):
            lines += _tree(v, indent, path) if v else [f"{indent}{path}: {{}}"]
        elif isinstance(v, list):
            lines += _table(v, indent, path)
    return lines


def _table(rows: list, indent: str, path: str) -> list[str]:
    size = _json_bytes(rows)
    if not rows or not all(isinstance(r, dict) for r in rows):
        return [f"{indent}{path}: {_cell(rows)} ({size} bytes)"]
    each = [_json_bytes(r) for r in rows]
    count = f"{len(rows)} {'entry' if len(rows) == 1 else 'entries'}"
    head = (
        f"{indent}{path}: {count}, {size} bytes; one entry {min(each)} to {max(each)} "
        f"bytes (mean {sum(each) / len(rows):.0f}, with its comma 1 more)"
    )
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    keys.sort(key=lambda k: k not in ("id", "fh"))  # identifiers first, else file order
    cells = [[_cell(r.get(k), k) for k in keys] + [str(n)] for r, n in zip(rows, each, strict=True)]
    header = [*keys, "bytes"]
    widths = [max(len(c) for c in col) for col in zip(header, *cells, strict=True)]
    lines = [head]
    for row in [header, *cells]:
        lines.append(
            indent + "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    return lines


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key == "flags":
        return f"{value:#x}"
    if isinstance(value, str):
        text = json.dumps(value)
        return text if len(text) <= _CELL else f"{text[: _CELL - 12]}...({len(value)} chars)"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)
