"""A device's snapshot: what the spec's parts carry, plus what only emu knows.

``save_device`` reads a stopped (or never started) device; ``restore_device`` checks a
whole snapshot against a fresh device of the same kind and only then applies it, so a
refused snapshot leaves the device untouched. Whoever drives the transport (the
virtio-mmio transport, or the vhost-user bridge) saves and restores its own registers
beside this, in the optional TRANSPORT part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emu.devices.base import RunState, VirtioDevice
from emu.ringdefs import F_RING_PACKED, InflightChain, RingState
from emu.state import parts
from emu.state.format import DeviceState, StateError


@dataclass
class Restored:
    """What the transport needs after the device took the snapshot."""

    status: int
    driver_features: int
    transport: dict[str, Any] = field(default_factory=dict)


def save_device(dev: VirtioDevice, status: int, transport: dict | None = None) -> DeviceState:
    if dev.run_state in (RunState.RUNNING, RunState.STOPPING):
        raise StateError(
            f"{dev.name}: stop the device before saving it (it is {dev.run_state.value})"
        )
    out = [
        parts.make(parts.DEV_FEATURES, dev.features),
        parts.make(parts.DRV_FEATURES, dev.driver_features),
        parts.make(parts.DEVICE_STATUS, status & 0xFF),
    ]
    for q in dev.queues:
        cfg = dict(size=q.size, enabled=q.ready, desc=q.desc, driver=q.driver, device=q.device)
        out.append(parts.make(parts.VQ_CFG, cfg, vq=q.index))
        if not q.started:
            continue
        rs = q.state()
        ring = dict(
            next_avail=rs.next_avail,
            next_used=rs.next_used,
            avail_wrap=rs.avail_wrap,
            used_wrap=rs.used_wrap,
            signalled_used=rs.signalled_used,
        )
        out.append(parts.make(parts.RING_STATE, ring, vq=q.index))
        chains = [dict(head=c.head, ndesc=c.ndesc, segments=c.segments) for c in q.inflight()]
        out.append(parts.make(parts.INFLIGHT, chains, vq=q.index))
    if transport is not None:
        out.append(parts.make(parts.TRANSPORT, transport, optional=True))
    out.append(parts.make(parts.device_part(dev.device_id), dev.save_state()))
    return DeviceState(dev.device_id, out)


def restore_device(dev: VirtioDevice, state: DeviceState) -> Restored:
    """Check ``state`` against ``dev`` (fresh, not activated), then apply it."""
    if state.device_type != dev.device_id:
        raise StateError(
            f"snapshot is of virtio device type {state.device_type}, "
            f"this is {dev.name} (type {dev.device_id})"
        )
    if dev.run_state is not RunState.IDLE:
        raise StateError(f"{dev.name}: restore needs a fresh device (it is {dev.run_state.value})")
    decoded = parts.parse(state)

    def one(ptype: int) -> Any:
        found = [v for p, v in decoded if p.type == ptype]
        if len(found) != 1:
            raise StateError(f"snapshot needs exactly one {parts.KINDS[ptype].name} part")
        return found[0]

    def per_queue(ptype: int) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for p, v in decoded:
            if p.type == ptype:
                if not 0 <= p.vq_index < len(dev.queues):
                    raise StateError(
                        f"{parts.KINDS[ptype].name} for queue {p.vq_index}: "
                        f"{dev.name} has {len(dev.queues)} queues"
                    )
                if p.vq_index in out:
                    raise StateError(f"two {parts.KINDS[ptype].name} parts for queue {p.vq_index}")
                out[p.vq_index] = v
        return out

    offered, acked, status = (
        one(parts.DEV_FEATURES),
        one(parts.DRV_FEATURES),
        one(parts.DEVICE_STATUS),
    )
    if offered & ~dev.features:
        raise StateError(
            f"snapshot's device offered features {offered & ~dev.features:#x} "
            "that this device does not"
        )
    if acked & ~offered:
        raise StateError("snapshot's driver features are not a subset of the device's")
    cfgs, rings, inflight = (
        per_queue(parts.VQ_CFG),
        per_queue(parts.RING_STATE),
        per_queue(parts.INFLIGHT),
    )
    for i, cfg in cfgs.items():
        q = dev.queues[i]
        if not 0 < cfg["size"] <= q.max_size:
            raise StateError(f"queue {i}: size {cfg['size']} outside 1..{q.max_size}")
    if set(rings) != set(inflight) or not set(rings) <= set(cfgs):
        raise StateError("RING_STATE and INFLIGHT parts must come in pairs, for configured queues")
    packed = bool(acked >> F_RING_PACKED & 1)
    ring_states = {
        i: ring_from_parts(i, cfgs[i]["size"], packed, rings[i], inflight[i]) for i in rings
    }
    dev_part = [v for p, v in decoded if p.type == parts.device_part(dev.device_id)]
    transport = [v for p, v in decoded if p.type == parts.TRANSPORT]

    # everything checked: apply
    dev.load_state(dev_part[0] if dev_part else {})
    for i, cfg in cfgs.items():
        q = dev.queues[i]
        q.size, q.ready = cfg["size"], cfg["enabled"]
        q.desc, q.driver, q.device = cfg["desc"], cfg["driver"], cfg["device"]
        if i in rings:
            dev.restore_queue(i, *ring_states[i])
    return Restored(status, acked, transport[0] if transport else {})


def ring_from_parts(
    i: int, size: int, packed: bool, r: dict, chain_parts: list[dict]
) -> tuple[RingState, list[InflightChain]]:
    """Queue ``i``'s RING_STATE and INFLIGHT values, checked against each other and the ring."""
    chains = [InflightChain(c["head"], c["ndesc"], c["segments"]) for c in chain_parts]
    heads = [c.head for c in chains]
    if len(set(heads)) != len(heads) or any(h >= size for h in heads):
        raise StateError(f"queue {i}: in-flight heads {heads} not unique below {size}")
    if any(not c.segments or not 1 <= c.ndesc <= size for c in chains):
        raise StateError(f"queue {i}: an in-flight chain without buffers or slots")
    if packed:
        if max(r["next_avail"], r["next_used"]) >= size or sum(c.ndesc for c in chains) > size:
            raise StateError(f"queue {i}: packed ring state beyond a ring of {size}")
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
