"""The one check of a snapshot against the device that is to take it.

Both restorers use it: the virtio-mmio transport (``MmioTransport.restore``) and the
vhost-user bridge (DEVICE_STATE, ``emu serve --restore-dir``); and both savers run what
they produced through it, so a state that could not be restored is never written.

``check`` reads only the state and a description of the device (``Target``): every part
decoded and versioned, every field's type and range, the rings as the ring core would
take them (sizes, alignment, indexes inside the ring, in-flight heads), the device part
through the device's schema. ``check_memory`` adds what depends on the guest RAM the
state is restored over. Nothing is applied here; what comes back (``Checked``) is what
the restorer applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from emu.memory import GuestMemory, GuestMemoryError
from emu.ringdefs import F_RING_PACKED, MAX_PACKED_SIZE, MAX_SPLIT_SIZE, InflightChain, RingState
from emu.state import parts
from emu.state.format import DeviceState, StateError
from emu.state.schema import Const, Schema

log = logging.getLogger(__name__)

Ring = tuple[RingState, list[InflightChain]]


@dataclass(frozen=True)
class Target:
    """What a state is checked against: the device (not its object) and the transport."""

    device_type: int
    name: str
    features: int  # what the device offers
    queue_max: tuple[int, ...]  # each queue's largest size
    schema: Schema  # the device part's
    transport: Schema | None = None  # the TRANSPORT part's (None: not read)


@dataclass
class Checked:
    """A state that passed ``check``: values ready to apply."""

    offered: int
    acked: int
    status: int
    queues: dict[int, dict]  # VQ_CFG values by queue
    rings: dict[int, Ring]  # queues that were running: where they continue
    device: dict  # the device part, at the schema's current version
    transport: dict | None  # the TRANSPORT part, if the target reads one and it is there

    @property
    def packed(self) -> bool:
        return bool(self.acked >> F_RING_PACKED & 1)


_REQUIRED = (parts.DEV_FEATURES, parts.DRV_FEATURES, parts.DEVICE_STATUS)
_PER_QUEUE = (parts.VQ_CFG, parts.RING_STATE, parts.INFLIGHT)


def check(state: DeviceState, target: Target) -> Checked:
    """``state`` checked whole against ``target``; StateError names the first fault."""
    if state.device_type != target.device_type:
        raise StateError(
            f"snapshot is of virtio device type {state.device_type}, "
            f"this is {target.name} (type {target.device_type})"
        )
    dev_part = parts.device_part(target.device_type)
    schemas = {dev_part: target.schema}
    if target.transport is not None:
        schemas[parts.TRANSPORT] = target.transport
        state = _own_transport(state, target.transport)
    single: dict[int, Any] = {}
    per_queue: dict[int, dict[int, Any]] = {t: {} for t in _PER_QUEUE}
    for p, value in parts.parse(state, schemas):
        name = parts.KINDS[p.type].name if p.type in parts.KINDS else target.schema.name
        if p.type in per_queue:
            if not 0 <= p.vq_index < len(target.queue_max):
                raise StateError(
                    f"{name} for queue {p.vq_index}: "
                    f"{target.name} has {len(target.queue_max)} queues"
                )
            if p.vq_index in per_queue[p.type]:
                raise StateError(f"two {name} parts for queue {p.vq_index}")
            per_queue[p.type][p.vq_index] = value
        else:
            if p.type in single:
                raise StateError(f"two {name} parts")
            single[p.type] = value
    for need in (*_REQUIRED, dev_part):
        if need not in single:
            what = parts.KINDS[need].name if need in parts.KINDS else target.schema.name
            raise StateError(f"snapshot has no {what} part")
    offered, acked = single[parts.DEV_FEATURES], single[parts.DRV_FEATURES]
    if offered & ~target.features:
        raise StateError(
            f"snapshot's device offered features {offered & ~target.features:#x} "
            f"that this {target.name} does not"
        )
    if acked & ~offered:
        raise StateError("snapshot's driver features are not a subset of the device's")
    cfgs, rings, inflight = (per_queue[t] for t in _PER_QUEUE)
    for i, cfg in cfgs.items():
        if not 0 < cfg["size"] <= target.queue_max[i]:
            raise StateError(f"queue {i}: size {cfg['size']} outside 1..{target.queue_max[i]}")
    if set(rings) != set(inflight) or not set(rings) <= set(cfgs):
        raise StateError("RING_STATE and INFLIGHT parts must come in pairs, for configured queues")
    packed = bool(acked >> F_RING_PACKED & 1)
    return Checked(
        offered=offered,
        acked=acked,
        status=single[parts.DEVICE_STATUS],
        queues=cfgs,
        rings={i: ring_from_parts(i, cfgs[i], packed, rings[i], inflight[i]) for i in rings},
        device=single[dev_part],
        transport=single.get(parts.TRANSPORT),
    )


def _own_transport(state: DeviceState, schema: Schema) -> DeviceState:
    """``state`` without an optional TRANSPORT part that another transport wrote: a device
    saved behind virtio-mmio and restored behind vhost-user (or back) carries the other
    side's registers, which this transport has no use for; a required one is refused by
    the check as any part it cannot read."""
    own = schema.fields.get("transport")
    if not isinstance(own, Const):
        return state
    kept = []
    for p in state.parts:
        if p.type == parts.TRANSPORT and p.optional:
            try:  # (an optional part of a version not read here decodes to nothing)
                found = parts.parse(DeviceState(state.device_type, [p], state.flags))
            except StateError:
                found = []  # the check reports what is wrong with it
            value = found[0][1] if found else None
            other = value.get("transport") if isinstance(value, dict) else None
            if isinstance(other, str) and other != own.value:
                log.info("state: the TRANSPORT part of %r is not read by %r", other, own.value)
                continue
        kept.append(p)
    return DeviceState(state.device_type, kept, state.flags)


#: ring areas (descriptors, driver, device): alignment and size for a ring of n
_SPLIT_AREAS = ((16, lambda n: 16 * n), (2, lambda n: 6 + 2 * n), (4, lambda n: 6 + 8 * n))
_PACKED_AREAS = ((16, lambda n: 16 * n), (4, lambda n: 4), (4, lambda n: 4))
_AREA_NAMES = ("descriptor", "driver", "device")


def ring_from_parts(i: int, cfg: dict, packed: bool, r: dict, chain_parts: list[dict]) -> Ring:
    """Queue ``i``'s RING_STATE and INFLIGHT, checked against each other and the ring
    as the ring core would build it (it refuses the same things, later, as a broken
    device)."""
    size = cfg["size"]
    if packed and size > MAX_PACKED_SIZE:
        raise StateError(f"queue {i}: packed ring of {size} over {MAX_PACKED_SIZE}")
    if not packed and (size & (size - 1) or size > MAX_SPLIT_SIZE):
        raise StateError(f"queue {i}: split ring size {size} is not a power of 2 up to 32768")
    areas = _PACKED_AREAS if packed else _SPLIT_AREAS
    for name, (align, _), addr in zip(_AREA_NAMES, areas, _addrs(cfg), strict=True):
        if addr % align:
            raise StateError(f"queue {i}: {name} area {addr:#x} is not {align}-byte aligned")
    chains = [InflightChain(c["head"], c["ndesc"], c["segments"]) for c in chain_parts]
    heads = [c.head for c in chains]
    if len(set(heads)) != len(heads) or any(h >= size for h in heads):
        raise StateError(f"queue {i}: in-flight heads {heads[:16]} not unique below {size}")
    if any(not c.segments or not 1 <= c.ndesc <= size for c in chains):
        raise StateError(f"queue {i}: an in-flight chain without buffers or slots")
    if packed:
        # A driver may reuse the slots of chains still in flight (their buffers are in
        # the state), so the slots in flight may add up to more than the ring: only each
        # index must lie inside it.
        for key in ("next_avail", "next_used", "signalled_used"):
            if r[key] >= size:
                raise StateError(f"queue {i}: {key} {r[key]} beyond a packed ring of {size}")
    elif (r["next_avail"] - r["next_used"]) & 0xFFFF != len(chains):
        raise StateError(
            f"queue {i}: avail {r['next_avail']} and used {r['next_used']} "
            f"do not leave {len(chains)} chains in flight"
        )
    rs = RingState(
        r["next_avail"],
        r["next_used"],
        r["avail_wrap"],
        r["used_wrap"],
        r["signalled_used"],
        [(c.head, c.ndesc) for c in chains],
    )
    return rs, chains


def _addrs(cfg: dict) -> tuple[int, int, int]:
    return cfg["desc"], cfg["driver"], cfg["device"]


def check_memory(checked: Checked, mem: GuestMemory) -> None:
    """The running rings and the buffers of chains in flight lie inside ``mem``."""
    areas = _PACKED_AREAS if checked.packed else _SPLIT_AREAS
    for i, (_, chains) in checked.rings.items():
        cfg = checked.queues[i]
        for name, (_, length), addr in zip(_AREA_NAMES, areas, _addrs(cfg), strict=True):
            _inside(mem, addr, length(cfg["size"]), f"queue {i}: {name} area")
        for c in chains:
            for addr, n, _ in c.segments:
                _inside(mem, addr, n, f"queue {i}: in-flight chain {c.head}: buffer")


def _inside(mem: GuestMemory, addr: int, length: int, what: str) -> None:
    try:
        mem.translate(addr, length)
    except GuestMemoryError:
        raise StateError(f"{what} {addr:#x}+{length:#x} is outside guest RAM") from None
