"""A device's snapshot: what the spec's parts carry, plus what only emu knows.

``save_device`` reads a stopped (or never started) device and refuses to hand out a state
that ``emu.state.validate.check`` would refuse on restore. ``check_restore`` checks a whole
snapshot against a fresh device of the same kind (and the guest RAM it comes back over);
``apply`` then applies it, so a refused snapshot leaves the device untouched. Whoever
drives the transport (the virtio-mmio transport, or the vhost-user bridge) saves and
restores its own registers beside this, in the optional TRANSPORT part, under its own
schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emu.devices.base import RunState, VirtioDevice
from emu.memory import GuestMemory
from emu.state import parts
from emu.state.format import DeviceState, Part, StateError
from emu.state.schema import Schema
from emu.state.validate import Checked, Target, check, check_memory


@dataclass
class Restored:
    """What the transport needs after the device took the snapshot."""

    status: int
    driver_features: int
    transport: dict[str, Any] = field(default_factory=dict)


def target_of(dev: VirtioDevice, transport: Schema | None = None) -> Target:
    return Target(
        dev.device_id,
        dev.name,
        dev.features | dev.legacy_features,  # a legacy transport also offers those
        tuple(q.max_size for q in dev.queues),
        dev.state_schema,
        transport,
    )


def device_part_of(dev: VirtioDevice) -> Part:
    """The device's own part, at its schema's version."""
    return parts.make(
        parts.device_part(dev.device_id), dev.save_state(), version=dev.state_schema.version
    )


def checked_save(state: DeviceState, target: Target) -> DeviceState:
    """``state`` if it would restore; otherwise StateError (and nothing is written)."""
    try:
        check(state, target)
    except StateError as e:
        raise StateError(f"{target.name}: this state cannot be restored, not saving it: {e}") from e
    return state


#: device status bit DEVICE_NEEDS_RESET: a state saved with it restores as a device that
#: still needs a reset, never one that runs its rings again
NEEDS_RESET = 0x40


def save_device(
    dev: VirtioDevice,
    status: int,
    transport: dict | None = None,
    transport_schema: Schema | None = None,
) -> DeviceState:
    if dev.run_state in (RunState.RUNNING, RunState.STOPPING):
        raise StateError(
            f"{dev.name}: stop the device before saving it (it is {dev.run_state.value})"
        )
    if dev.run_state is RunState.BROKEN and not status & NEEDS_RESET:
        # its rings are gone: only a state that says "needs a reset" restores it safely
        raise StateError(f"{dev.name}: the device needs a reset ({dev.broken}); nothing to save")
    out = [
        parts.make(parts.DEV_FEATURES, dev.features | dev.legacy_features),
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
        version = transport_schema.version if transport_schema else None
        out.append(parts.make(parts.TRANSPORT, transport, optional=True, version=version))
    out.append(device_part_of(dev))
    return checked_save(DeviceState(dev.device_id, out), target_of(dev, transport_schema))


def check_restore(
    dev: VirtioDevice,
    state: DeviceState,
    transport: Schema | None = None,
    mem: GuestMemory | None = None,
) -> Checked:
    """Check ``state`` against ``dev`` (fresh, not activated) and ``mem``; applies nothing."""
    if dev.run_state is not RunState.IDLE:
        raise StateError(f"{dev.name}: restore needs a fresh device (it is {dev.run_state.value})")
    checked = check(state, target_of(dev, transport))
    if mem is not None:
        check_memory(checked, mem)
    return checked


def apply(dev: VirtioDevice, checked: Checked) -> Restored:
    """Apply a checked state; only the device's ``load_state`` may still refuse, and it
    refuses before it changes anything (and before the queues are touched)."""
    dev.load_state(checked.device)
    for i, cfg in checked.queues.items():
        q = dev.queues[i]
        q.size, q.ready = cfg["size"], cfg["enabled"]
        q.desc, q.driver, q.device = cfg["desc"], cfg["driver"], cfg["device"]
        if i in checked.rings:
            dev.restore_queue(i, *checked.rings[i])
    return Restored(checked.status, checked.acked, checked.transport or {})


def restore_device(
    dev: VirtioDevice, state: DeviceState, transport: Schema | None = None
) -> Restored:
    """``check_restore`` then ``apply``."""
    return apply(dev, check_restore(dev, state, transport))
