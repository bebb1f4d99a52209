"""The part types emu reads and writes, and what a restorer does with each.

Standard parts (virtio 1.4, device-parts.tex) keep the spec's type numbers and layouts:
0x0100 DEV_FEATURES, 0x0101 DRV_FEATURES, 0x0103 DEVICE_STATUS and 0x0104 VQ_CFG (selector =
vq index). Nothing in the spec carries ring indexes or in-flight requests, so emu adds
extension parts in 0xE000-0xEFFF, a range the spec leaves unassigned. Each extension value
starts with ``le16 version; le16 reserved``; together with the part header's OPTIONAL flag
this lets a restorer understand a part, skip it (optional) or refuse it (required):

    0xE001 RING_STATE  per vq: next_avail, next_used, wrap counters, signalled used index
    0xE002 INFLIGHT    per vq: chains fetched and not used, in fetch order, with segments
    0xE003 TRANSPORT   transport registers worth keeping (JSON object)
    0xE1nn DEVICE      device-specific state of device type nn (JSON object)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emu.state.format import PART_F_OPTIONAL, DeviceState, Part, StateError, vq_selector

DEV_FEATURES = 0x0100
DRV_FEATURES = 0x0101
DEVICE_STATUS = 0x0103
VQ_CFG = 0x0104
RING_STATE = 0xE001
INFLIGHT = 0xE002
TRANSPORT = 0xE003
DEVICE_BASE = 0xE100


def device_part(device_type: int) -> int:
    return DEVICE_BASE + device_type


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
    version: int | None = None  # extension parts only
    per_queue: bool = False


def _features_enc(v: int) -> bytes:
    return struct.pack("<QQ", v & (2**64 - 1), v >> 64 & (2**64 - 1))


def _features_dec(b: bytes) -> int:
    if not b or len(b) % 8:
        raise StateError(f"feature part of {len(b)} bytes is not a list of le64")
    return sum(w << (64 * i) for i, (w,) in enumerate(struct.iter_unpack("<Q", b)))


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
        off, chains = 4, []
        for _ in range(count):
            head, ndesc, nseg = _CHAIN.unpack_from(b, off)
            off += _CHAIN.size
            if off + nseg * _SEG.size > len(b):
                raise StateError("INFLIGHT part: segment list runs past the part")
            segs = [
                (a, n, bool(w)) for a, n, w in _SEG.iter_unpack(b[off : off + nseg * _SEG.size])
            ]
            off += nseg * _SEG.size
            chains.append(dict(head=head, ndesc=ndesc, segments=segs))
    except struct.error as e:
        raise StateError(f"INFLIGHT part truncated: {e}") from None
    if off != len(b):
        raise StateError(f"INFLIGHT part has {len(b) - off} stray bytes")
    return chains


def _json_enc(v: Any) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":")).encode()


def _json_dec(b: bytes) -> Any:
    try:
        return json.loads(b)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"JSON part does not parse: {e}") from None


KINDS: dict[int, PartKind] = {
    DEV_FEATURES: PartKind("DEV_FEATURES", _features_enc, _features_dec),
    DRV_FEATURES: PartKind("DRV_FEATURES", _features_enc, _features_dec),
    DEVICE_STATUS: PartKind("DEVICE_STATUS", lambda v: bytes([v]), _status_dec),
    VQ_CFG: PartKind("VQ_CFG", _vq_cfg_enc, _vq_cfg_dec, per_queue=True),
    RING_STATE: PartKind("RING_STATE", _ring_enc, _ring_dec, version=1, per_queue=True),
    INFLIGHT: PartKind("INFLIGHT", _inflight_enc, _inflight_dec, version=1, per_queue=True),
    TRANSPORT: PartKind("TRANSPORT", _json_enc, _json_dec, version=1),
}

#: device-specific state parts: virtio device id -> version emu writes and reads
DEVICE_VERSIONS = {1: 1, 2: 1, 3: 1, 4: 1}
for _dev, _ver in DEVICE_VERSIONS.items():
    KINDS[device_part(_dev)] = PartKind(f"DEVICE_{_dev}", _json_enc, _json_dec, version=_ver)


def make(part_type: int, value: Any, vq: int | None = None, optional: bool = False) -> Part:
    kind = KINDS[part_type]
    raw = kind.encode(value)
    if kind.version is not None:
        raw = _EXT.pack(kind.version, 0) + raw
    selector = vq_selector(vq) if vq is not None else bytes(8)
    return Part(part_type, raw, selector, PART_F_OPTIONAL if optional else 0)


def parse(state: DeviceState) -> list[tuple[Part, Any]]:
    """Decode every part a restorer must understand; skip unknown optional ones.

    Raises StateError for an unknown required part, an unsupported required version or a
    malformed value, so nothing is applied from a state that is not wholly understood.
    """
    out = []
    for i, p in enumerate(state.parts):
        kind = KINDS.get(p.type)
        where = f"part {i} (type {p.type:#06x})"
        if kind is None:
            if p.optional:
                continue
            raise StateError(f"{where} is required but unknown to this emu; refusing the state")
        raw = p.value
        if kind.version is not None:
            if len(raw) < _EXT.size:
                raise StateError(f"{where} {kind.name}: no version header")
            (version, _) = _EXT.unpack_from(raw)
            if version != kind.version:
                if p.optional:
                    continue
                raise StateError(
                    f"{where} {kind.name} version {version} is not supported "
                    f"(this emu reads version {kind.version}); refusing the state"
                )
            raw = raw[_EXT.size :]
        try:
            value = kind.decode(raw)
        except StateError as e:
            raise StateError(f"{where} {kind.name}: {e}") from None
        out.append((p, value))
    return out


def to_json(state: DeviceState) -> dict:
    """A readable rendering for ``emu state show``; unknown parts appear as raw hex."""
    parts = []
    known = {id(p): v for p, v in parse(state)}
    for p in state.parts:
        kind = KINDS.get(p.type)
        entry: dict[str, Any] = {
            "type": f"{p.type:#06x}",
            "name": kind.name if kind else "unknown",
            "optional": p.optional,
        }
        if kind and kind.per_queue:
            entry["vq"] = p.vq_index
        if id(p) in known:
            v = known[id(p)]
            entry["value"] = f"{v:#x}" if kind.name.endswith("FEATURES") else v
        else:
            entry["skipped"] = True
            entry["raw"] = p.value.hex()
        parts.append(entry)
    return {"device_type": state.device_type, "flags": state.flags, "parts": parts}
