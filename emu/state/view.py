"""A state file decoded into what people ask about: features, status, queues, device.

``emu state show`` summarises a ``View`` and ``emu state diff`` compares two. The state
is decoded exactly as ``emu state show --json`` decodes it (``parts.parse`` with the
device schemas): a part that is required but not understood, or malformed, raises
StateError, and so do two parts of one kind (for one queue), which a restore refuses;
an optional part that is not understood is kept only as its raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emu.ringdefs import F_RING_PACKED
from emu.state import parts
from emu.state.breakdown import PART_HEADER_BYTES, STANDARD, file_bytes
from emu.state.format import DeviceState, StateError
from emu.state.schema import Schema


@dataclass(frozen=True)
class PartInfo:
    """One part as the file holds it."""

    name: str  # the kind's name (VQ_CFG, DEVICE_2), or the type in hex when unknown
    vq: int | None  # per-queue parts: the queue
    version: str | None  # extension parts: "major.minor"
    size: int  # bytes in the file: the 16-byte header and the value
    optional: bool
    standard: bool  # defined by virtio 1.4 (else one of emu's extension parts)
    understood: bool  # decoded (False: an optional part this emu skips)
    raw: bytes  # the value, to compare parts that are not understood

    @property
    def label(self) -> str:
        return self.name if self.vq is None else f"{self.name}[{self.vq}]"


@dataclass
class Queue:
    """What the state says about one virtqueue (each piece None when its part is absent)."""

    index: int
    config: dict | None = None  # VQ_CFG: size, enabled, addresses
    ring: dict | None = None  # RING_STATE: next avail/used, wraps, signalled used
    inflight: list[dict] | None = None  # INFLIGHT: chains fetched and not used, in order


@dataclass
class View:
    device_type: int
    flags: int
    size: int  # bytes of the whole file
    offered: int | None = None
    acked: int | None = None
    status: int | None = None
    transport: Any = None
    device: Any = None  # the device part of ``device_type``, None if absent or skipped
    queues: dict[int, Queue] = field(default_factory=dict)
    parts: list[PartInfo] = field(default_factory=list)

    @property
    def packed(self) -> bool:
        return bool((self.acked or 0) >> F_RING_PACKED & 1)


def view(state: DeviceState, schemas: Mapping[int, Schema] | None = None) -> View:
    """``state`` decoded; StateError for what ``emu state show --json`` refuses too."""
    values = {id(p): v for p, v in parts.parse(state, schemas)}
    out = View(state.device_type, state.flags, file_bytes(state))
    own = parts.device_part(state.device_type)
    seen: set[tuple[int, int | None]] = set()
    for p in state.parts:
        kind = parts.kind_of(p.type)
        understood = id(p) in values
        version = None
        if kind is not None and kind.version is not None and len(p.value) >= 4:
            version = "{}.{}".format(
                *(int.from_bytes(p.value[i : i + 2], "little") for i in (0, 2))
            )
        per_queue = kind is not None and kind.per_queue
        out.parts.append(
            PartInfo(
                name=kind.name if kind else f"{p.type:#06x}",
                vq=p.vq_index if per_queue else None,
                version=version,
                size=PART_HEADER_BYTES + len(p.value),
                optional=p.optional,
                standard=p.type in STANDARD,
                understood=understood,
                raw=p.value,
            )
        )
        if not understood:
            continue
        # one of each, as a restore insists: a second would be shown (and compared) in
        # place of the first, so two files differing in the first would read the same
        key = (p.type, p.vq_index if per_queue else None)
        if key in seen:
            where = f" for queue {key[1]}" if per_queue else ""
            raise StateError(f"two {out.parts[-1].name} parts{where}: a restore refuses it")
        seen.add(key)
        value = values[id(p)]
        if p.type == parts.DEV_FEATURES:
            out.offered = value
        elif p.type == parts.DRV_FEATURES:
            out.acked = value
        elif p.type == parts.DEVICE_STATUS:
            out.status = value
        elif p.type == parts.TRANSPORT:
            out.transport = value
        elif p.type == own:
            out.device = value
        elif per_queue:
            q = out.queues.setdefault(p.vq_index, Queue(p.vq_index))
            if p.type == parts.VQ_CFG:
                q.config = value
            elif p.type == parts.RING_STATE:
                q.ring = value
            else:
                q.inflight = value
    out.queues = dict(sorted(out.queues.items()))
    return out
