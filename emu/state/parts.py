"""The part types emu reads and writes, and what a restorer does with each.

Standard parts (virtio 1.4, device-parts.tex) keep the spec's type numbers and layouts:
0x0100 DEV_FEATURES, 0x0101 DRV_FEATURES, 0x0103 DEVICE_STATUS and 0x0104 VQ_CFG (selector =
vq index). Nothing in the spec carries ring indexes or in-flight requests, so emu adds
extension parts in 0xE000-0xEFFF, a range the spec leaves unassigned. Each extension value
starts with ``le16 major; le16 minor`` (its version; docs/stop.md has the rule); together
with the part header's OPTIONAL flag this lets a restorer understand a part, skip it
(optional) or refuse it (required):

    0xE001 RING_STATE  per vq: next_avail, next_used, wrap counters, signalled used index
    0xE002 INFLIGHT    per vq: chains fetched and not used, in fetch order, with segments
    0xE003 TRANSPORT   transport registers worth keeping (JSON object)
    0xE1nn DEVICE      device-specific state of device type nn (JSON object)

JSON parts are checked against a schema (``emu.state.schema``) where the reader has one:
the device's own for its DEVICE part, the transport's for TRANSPORT. Any JSON is refused
before it can hurt: deeper than MAX_JSON_DEPTH, integers too long to convert, NaN.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from emu.state.format import PART_F_OPTIONAL, DeviceState, Part, StateError, vq_selector
from emu.state.schema import Schema, Version, version_problem

DEV_FEATURES = 0x0100
DRV_FEATURES = 0x0101
DEVICE_STATUS = 0x0103
VQ_CFG = 0x0104
RING_STATE = 0xE001
INFLIGHT = 0xE002
TRANSPORT = 0xE003
DEVICE_BASE = 0xE100

#: a state's JSON is a few levels deep; anything deeper is refused, not parsed further
MAX_JSON_DEPTH = 16
#: lists and objects in one JSON part (a device part needs a few dozen)
MAX_JSON_CONTAINERS = 1 << 16
#: feature bits a part may carry (the spec defines 128 so far)
MAX_FEATURE_BYTES = 64
#: chains in flight on one queue at most: one per head of the largest ring
MAX_INFLIGHT = 32768


def device_part(device_type: int) -> int:
    return DEVICE_BASE + device_type


def is_device_part(part_type: int) -> bool:
    return DEVICE_BASE <= part_type <= DEVICE_BASE + 0xFF


_VQ_CFG = struct.Struct("<HHHHQQQ")
_EXT = struct.Struct("<HH")
_RING = struct.Struct("<HHBBH")
_CHAIN = struct.Struct("<HHI")
_SEG = struct.Struct("<QII")


@dataclass(frozen=True)
class PartKind:
    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    version: Version | None = None  # extension parts only: (major, minor)
    per_queue: bool = False


def _features_enc(v: int) -> bytes:
    return struct.pack("<QQ", v & (2**64 - 1), v >> 64 & (2**64 - 1))


def _features_dec(b: bytes) -> int:
    if not b or len(b) % 8 or len(b) > MAX_FEATURE_BYTES:
        raise StateError(f"feature part of {len(b)} bytes is not a list of up to 8 le64")
    return int.from_bytes(b, "little")


def _status_dec(b: bytes) -> int:
    if len(b) != 1:
        raise StateError(f"device status part must be 1 byte, got {len(b)}")
    return b[0]


def _vq_cfg_enc(v: dict) -> bytes:
    return _VQ_CFG.pack(
        v["size"], v.get("vector", 0), int(v["enabled"]), 0, v["desc"], v["driver"], v["device"]
    )


def _vq_cfg_dec(b: bytes) -> dict:
    if len(b) != _VQ_CFG.size:
        raise StateError(f"VQ_CFG part must be {_VQ_CFG.size} bytes, got {len(b)}")
    size, vector, enabled, _, desc, driver, device = _VQ_CFG.unpack(b)
    if enabled > 1:
        raise StateError(f"VQ_CFG enabled must be 0 or 1, got {enabled}")
    return dict(
        size=size, vector=vector, enabled=bool(enabled), desc=desc, driver=driver, device=device
    )


def _ring_enc(v: dict) -> bytes:
    return _RING.pack(
        v["next_avail"], v["next_used"], v["avail_wrap"], v["used_wrap"], v["signalled_used"]
    )


def _ring_dec(b: bytes) -> dict:
    if len(b) != _RING.size:
        raise StateError(f"RING_STATE part must be {_RING.size} bytes, got {len(b)}")
    na, nu, aw, uw, su = _RING.unpack(b)
    if aw > 1 or uw > 1:
        raise StateError("RING_STATE wrap counters must be 0 or 1")
    return dict(
        next_avail=na, next_used=nu, avail_wrap=bool(aw), used_wrap=bool(uw), signalled_used=su
    )


def _inflight_enc(chains: list[dict]) -> bytes:
    out = bytearray(struct.pack("<I", len(chains)))
    for c in chains:
        out += _CHAIN.pack(c["head"], c["ndesc"], len(c["segments"]))
        for addr, length, writable in c["segments"]:
            out += _SEG.pack(addr, length, int(writable))
    return bytes(out)


def _inflight_dec(b: bytes) -> list[dict]:
    try:
        (count,) = struct.unpack_from("<I", b)
        if count > MAX_INFLIGHT:
            raise StateError(f"INFLIGHT part: {count} chains, more than any ring holds")
        off, chains = 4, []
        for _ in range(count):
            head, ndesc, nseg = _CHAIN.unpack_from(b, off)
            off += _CHAIN.size
            if off + nseg * _SEG.size > len(b):
                raise StateError("INFLIGHT part: segment list runs past the part")
            segs = []
            for a, n, w in _SEG.iter_unpack(b[off : off + nseg * _SEG.size]):
                if w > 1:
                    raise StateError(f"INFLIGHT part: segment writable flag {w}")
                segs.append((a, n, bool(w)))
            off += nseg * _SEG.size
            chains.append(dict(head=head, ndesc=ndesc, segments=segs))
    except struct.error as e:
        raise StateError(f"INFLIGHT part truncated: {e}") from None
    if off != len(b):
        raise StateError(f"INFLIGHT part has {len(b) - off} stray bytes")
    return chains


def _json_enc(v: Any) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":")).encode()


def _no_constant(name: str) -> Any:
    raise StateError(f"JSON holds {name}, which no state has")


def _json_dec(b: bytes) -> Any:
    # every list or object costs far more in memory than its two bytes: count them first
    if b.count(b"[") + b.count(b"{") > MAX_JSON_CONTAINERS:
        raise StateError(f"JSON part holds more than {MAX_JSON_CONTAINERS} lists and objects")
    try:
        value = json.loads(b, parse_constant=_no_constant)
    except RecursionError:
        raise StateError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, int digit limit
        raise StateError(f"JSON part does not parse: {str(e)[:120]}") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Refuse JSON deeper than MAX_JSON_DEPTH (without recursing: it may be hostile)."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise StateError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        todo.extend((x, depth + 1) for x in v)


#: the version of the extension parts emu writes (JSON parts with a schema: the schema's)
EXT_VERSION: Version = (1, 0)

KINDS: dict[int, PartKind] = {
    DEV_FEATURES: PartKind("DEV_FEATURES", _features_enc, _features_dec),
    DRV_FEATURES: PartKind("DRV_FEATURES", _features_enc, _features_dec),
    DEVICE_STATUS: PartKind("DEVICE_STATUS", lambda v: bytes([v]), _status_dec),
    VQ_CFG: PartKind("VQ_CFG", _vq_cfg_enc, _vq_cfg_dec, per_queue=True),
    RING_STATE: PartKind("RING_STATE", _ring_enc, _ring_dec, EXT_VERSION, per_queue=True),
    INFLIGHT: PartKind("INFLIGHT", _inflight_enc, _inflight_dec, EXT_VERSION, per_queue=True),
    TRANSPORT: PartKind("TRANSPORT", _json_enc, _json_dec, EXT_VERSION),
}


def kind_of(part_type: int) -> PartKind | None:
    """The kind of a part type; device parts of any device type are JSON."""
    if is_device_part(part_type):
        name = f"DEVICE_{part_type - DEVICE_BASE}"
        return PartKind(name, _json_enc, _json_dec, EXT_VERSION)
    return KINDS.get(part_type)


def make(
    part_type: int,
    value: Any,
    vq: int | None = None,
    optional: bool = False,
    version: Version | None = None,
) -> Part:
    """A part of ``part_type`` holding ``value``; ``version`` overrides the kind's (a
    JSON part written by a schema carries the schema's version)."""
    kind = kind_of(part_type)
    if kind is None:
        raise ValueError(f"unknown part type {part_type:#x}")
    raw = kind.encode(value)
    if kind.version is not None:
        raw = _EXT.pack(*(version or kind.version)) + raw
    selector = vq_selector(vq) if vq is not None else bytes(8)
    return Part(part_type, raw, selector, PART_F_OPTIONAL if optional else 0)


def parse(
    state: DeviceState, schemas: Mapping[int, Schema] | None = None
) -> list[tuple[Part, Any]]:
    """Decode every part a restorer must understand; skip unknown optional ones.

    ``schemas`` maps JSON part types to the schema that checks them (and gives their
    version). With ``schemas``, a device part without one is unknown; without (to show a
    file), any device part is decoded as plain JSON. Raises StateError for an unknown
    required part, a required part whose version this emu does not read, or a malformed
    value, so nothing is applied from a state that is not wholly understood.
    """
    out = []
    for i, p in enumerate(state.parts):
        schema = schemas.get(p.type) if schemas is not None else None
        kind = kind_of(p.type)
        if schemas is not None and is_device_part(p.type) and schema is None:
            kind = None
        where = f"part {i} (type {p.type:#06x})"
        if kind is None:
            if p.optional:
                continue
            raise StateError(f"{where} is required but unknown to this emu; refusing the state")
        raw, have = p.value, EXT_VERSION
        if kind.version is not None:
            if len(raw) < _EXT.size:
                raise StateError(f"{where} {kind.name}: no version header")
            have = _EXT.unpack_from(raw)
            if schema is not None:
                problem = version_problem(f"{kind.name} ({schema.name})", have, schema.version)
            elif is_device_part(p.type):  # only shown: no schema to judge its version by
                problem = None
            else:
                problem = version_problem(kind.name, have, kind.version)
            if problem is not None:
                if p.optional:
                    continue
                raise StateError(f"{where} {problem}; refusing the state")
            raw = raw[_EXT.size :]
        try:
            value = kind.decode(raw)
            if schema is not None:
                value = schema.load(value, have)
        except StateError as e:
            raise StateError(f"{where} {kind.name}: {e}") from None
        out.append((p, value))
    return out


def to_json(state: DeviceState, schemas: Mapping[int, Schema] | None = None) -> dict:
    """A readable rendering for ``emu state show``; unknown parts appear as raw hex."""
    parts = []
    known = {id(p): v for p, v in parse(state, schemas)}
    for p in state.parts:
        kind = kind_of(p.type)
        entry: dict[str, Any] = {
            "type": f"{p.type:#06x}",
            "name": kind.name if kind else "unknown",
            "optional": p.optional,
        }
        if kind and kind.version and len(p.value) >= _EXT.size:
            entry["version"] = "{}.{}".format(*_EXT.unpack_from(p.value))
        if kind and kind.per_queue:
            entry["vq"] = p.vq_index
        if kind and id(p) in known:
            v = known[id(p)]
            entry["value"] = f"{v:#x}" if kind.name.endswith("FEATURES") else v
        else:
            entry["skipped"] = True
            entry["raw"] = p.value.hex()
        parts.append(entry)
    return {"device_type": state.device_type, "flags": state.flags, "parts": parts}
