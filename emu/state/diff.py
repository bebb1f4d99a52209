"""``emu state diff A B``: what changed between two snapshots of one device, field by field.

Both files are decoded as ``emu state show`` decodes them (``emu.state.view``), so a
corrupt or incompatible file is refused before anything is compared, and snapshots of
two different device types are refused too: their fields do not line up. Then, in the
order a reader checks them: the file's flags, the features (bits added and removed, in
words), the status bits, each queue (config, ring indexes, the heads in flight), the
transport's registers, the device's own state (JSON paths such as ``dir.nodes[1].nlookup``)
and the parts (present, version, bytes; an optional part this emu does not understand
is compared by its bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emu.state.format import StateError
from emu.state.names import feature_words, status_words
from emu.state.text import cut
from emu.state.view import PartInfo, View


class _Missing:
    def __repr__(self) -> str:
        return "(none)"


#: the value of a field one side does not have
MISSING: Any = _Missing()
#: a value longer than this is cut in the text output (JSON output keeps it whole)
_CELL = 60
#: a field's path longer than this is cut in the text output (a JSON key can be huge)
_FIELD = 120
#: a JSON key written as is in a path (others are quoted: ``nodes["a.b"]``)
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
#: queue config fields shown as addresses
_ADDRESSES = ("desc", "driver", "device")


@dataclass(frozen=True)
class Change:
    where: str  # "features", "status", "queue 0", "transport", "device", "part VQ_CFG[0]"...
    field: str
    a: Any = MISSING
    b: Any = MISSING
    note: str = ""  # the change in words, where the values alone do not say it

    def to_json(self) -> dict:
        out: dict[str, Any] = {"where": self.where, "field": self.field}
        for side, value in (("a", self.a), ("b", self.b)):
            if value is not MISSING:
                out[side] = value
        if self.note:
            out["note"] = self.note
        return out

    def text(self) -> str:
        field = cut(self.field, _FIELD)
        if self.a is MISSING and self.b is MISSING:
            return f"{self.where}: {field}: {self.note}"
        line = f"{self.where}: {field} {_cell(self.a, self.field)} -> "
        line += _cell(self.b, self.field)
        return line + (f" ({self.note})" if self.note else "")


def diff(a: View, b: View, device_names: Mapping[int, str] | None = None) -> list[Change]:
    """The changes from ``a`` to ``b`` (empty: the same state); StateError when the two are
    not states of the same device type (``device_names``: virtio id -> name, to say so)."""
    if a.device_type != b.device_type:
        names = device_names or {}
        kinds = [f"{names.get(t, 'device')} (type {t})" for t in (a.device_type, b.device_type)]
        raise StateError(
            f"the snapshots are of different devices, {kinds[0]} and {kinds[1]}: "
            "their fields do not compare"
        )
    out: list[Change] = []
    if a.flags != b.flags:
        out.append(Change("file", "flags", a.flags, b.flags))
    for name, x, y in (("offered", a.offered, b.offered), ("negotiated", a.acked, b.acked)):
        if x != y:
            out.append(Change("features", name, x, y, _bits(x, y, a.device_type)))
    if a.status != b.status:
        out.append(Change("status", "status", a.status, b.status, _status(a.status, b.status)))
    for i in sorted(set(a.queues) | set(b.queues)):
        out += _queue(i, a, b)
    out += _tree("transport", a.transport, b.transport)
    out += _tree("device", a.device, b.device)
    out += _parts(a.parts, b.parts)
    return out


def _bits(x: int | None, y: int | None, device_type: int) -> str:
    x, y = x or 0, y or 0
    added = [f"+{w}" for w in feature_words(y & ~x, device_type)]
    gone = [f"-{w}" for w in feature_words(x & ~y, device_type)]
    return " ".join(added + gone)


def _status(x: int | None, y: int | None) -> str:
    x, y = x or 0, y or 0
    return " ".join(
        [f"+{w}" for w in status_words(y & ~x)] + [f"-{w}" for w in status_words(x & ~y)]
    )


def _queue(i: int, a: View, b: View) -> list[Change]:
    where = f"queue {i}"
    qa, qb = a.queues.get(i), b.queues.get(i)
    if qa is None or qb is None:
        return [Change(where, "set up", qa is not None, qb is not None)]
    out = []
    for part, x, y in (("config", qa.config, qb.config), ("ring state", qa.ring, qb.ring)):
        if x is None or y is None:
            if (x is None) != (y is None):
                out.append(Change(where, part, x is not None, y is not None))
            continue
        for key in dict.fromkeys([*x, *y]):
            if x.get(key, MISSING) != y.get(key, MISSING):
                out.append(Change(where, key, x.get(key, MISSING), y.get(key, MISSING)))
    if qa.inflight != qb.inflight:
        heads_a = [c["head"] for c in qa.inflight or []]
        heads_b = [c["head"] for c in qb.inflight or []]
        if heads_a != heads_b:
            note = f"{len(heads_a)} -> {len(heads_b)} chains"
            out.append(Change(where, "in flight heads", heads_a, heads_b, note))
        else:
            differ = [
                str(x["head"])
                for x, y in zip(qa.inflight or [], qb.inflight or [], strict=True)
                if x != y
            ]
            note = f"the chains of heads {' '.join(differ)} hold other buffers"
            out.append(Change(where, "in flight buffers", note=note))
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a JSON value by path: ``a.b``, ``a[2].c``, ``a["x.y"]``; lists of scalars
    stay whole. A key that could read as a path of its own is quoted, so two leaves never
    share a path (and one never hides the other's change)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not _PLAIN.fullmatch(k):
                out.update(_flatten(v, f"{prefix}[{json.dumps(k)}]"))
            else:
                out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(value, list) and any(isinstance(x, dict | list) for x in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix or "(value)": value}


def _same(x: Any, y: Any) -> bool:
    """Equal as JSON: Python calls ``true`` and ``1`` equal, a snapshot does not."""
    if x is MISSING or y is MISSING:
        return x is y
    return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def _tree(where: str, x: Any, y: Any) -> list[Change]:
    if _same(x, y):
        return []
    if x is None or y is None:
        return [Change(where, "present", x is not None, y is not None)]
    fa, fb = _flatten(x), _flatten(y)
    return [
        Change(where, k, fa.get(k, MISSING), fb.get(k, MISSING))
        for k in dict.fromkeys([*fa, *fb])
        if not _same(fa.get(k, MISSING), fb.get(k, MISSING))
    ]


def _parts(pa: list[PartInfo], pb: list[PartInfo]) -> list[Change]:
    ia, ib = _by_label(pa), _by_label(pb)
    out = []
    for label in dict.fromkeys([*ia, *ib]):
        x, y = ia.get(label), ib.get(label)
        where = f"part {label}"
        if x is None or y is None:
            out.append(Change(where, "bytes", x.size if x else MISSING, y.size if y else MISSING))
            continue
        if x.version != y.version:
            out.append(Change(where, "version", x.version, y.version))
        if x.optional != y.optional:
            out.append(Change(where, "optional", x.optional, y.optional))
        if x.size != y.size:
            out.append(Change(where, "bytes", x.size, y.size))
        elif not (x.understood and y.understood) and x.raw != y.raw:
            out.append(Change(where, "value", note="not understood here: its bytes differ"))
    return out


def _by_label(infos: list[PartInfo]) -> dict[str, PartInfo]:
    """Parts by label; a label seen twice (a malformed file) gets a #n suffix."""
    out: dict[str, PartInfo] = {}
    for p in infos:
        label, n = p.label, 1
        while label in out:
            n += 1
            label = f"{p.label}#{n}"
        out[label] = p
    return out


def _cell(value: Any, key: str) -> str:
    if value is MISSING:
        return "(none)"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and (
        key in _ADDRESSES or key.endswith(("features", "offered", "negotiated"))
    ):
        return f"{value:#x}"
    if isinstance(value, int) and key in ("status", "flags"):
        return f"{value:#04x}"
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        text = "[" + " ".join(map(str, value)) + "]"
    else:
        text = json.dumps(value, sort_keys=True)
    return text if len(text) <= _CELL else f"{text[: _CELL - 20]}...({len(text)} chars)"


def to_json(path_a: str, path_b: str, changes: list[Change]) -> dict:
    return {
        "a": path_a,
        "b": path_b,
        "equal": not changes,
        "changes": [c.to_json() for c in changes],
    }
