"""One registry of device types: what emu needs to know to build, serve, save and drive one.

A device module registers its type once, at import (``register(DeviceType(...))``):

* its class, which carries the virtio device id, the name and the state schema (the
  device part DEVICE_<id> of a snapshot, ``emu.state.schema``);
* how it is built from a CLI spec, ``NAME[:ARG][,OPTION=on|off...]`` (``emu serve``,
  ``emu guest run --emu``); the ring OPTIONs are common to all types, and a type may
  accept options of its own (``fs:DIR,tag=NAME,ro``: ``NAME`` or ``NAME=VALUE``);
* its reference-driver helper, a module of ``emu.testing`` named by its dotted path so
  that production code never imports it: the driver side of the device for tests, and
  its ``demo(ring_options, say)`` for ``emu demo --in-process``;
* what a vhost-user frontend must be told to match the backend (net: its MAC).

``emu serve``, ``emu demo``, ``emu state show``, the guest runner and the tests find device
types here; a new device is its module and its driver helper, nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from emu.devices.base import VirtioDevice
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.state.parts import device_part
from emu.state.schema import Schema

#: the device types emu ships; each module registers its own at import
BUILTIN = (
    "emu.devices.blk",
    "emu.devices.net",
    "emu.devices.console",
    "emu.devices.rng",
    "emu.devices.fs",
    "emu.devices.balloon",
    "emu.devices.vsock",
)
#: ring size limit for served devices: what frontends ask for (QEMU microvm: 1024)
QUEUE_MAX = 1024
#: spec options that withhold a ring feature: name -> feature bit
RING_OPTIONS = {"packed": F_RING_PACKED, "event_idx": F_EVENT_IDX, "indirect": F_INDIRECT_DESC}


class SpecError(ValueError):
    """A device spec that names no device, or that its device type refuses."""


@dataclass(frozen=True)
class Spec:
    """One parsed ``NAME[:ARG][,OPTION...]`` at ``position`` among the specs."""

    text: str
    kind: str
    arg: str  # after the first ':' ("" without)
    withheld: int  # ring feature bits the options switch off
    position: int = 0
    #: options that are not ring options, in order: NAME -> VALUE ("" for a bare NAME);
    #: the device type says which it accepts (``DeviceType.options``)
    options: dict[str, str] = field(default_factory=dict)

    def switch(self, name: str, default: bool) -> bool:
        """Option ``name`` as a switch: ``name`` or ``name=on`` is on, ``name=off`` off,
        absent ``default``; anything else is a SpecError."""
        value = self.options.get(name)
        if value is None:
            return default
        if value not in ("", "on", "off"):
            raise SpecError(f"{name}={value!r}: on or off (a bare {name} is on)")
        return value != "off"


def spec_number(text: str, limit: int) -> int | None:
    """``text`` as a whole decimal number in 0..``limit``, None if it is not one: int()
    alone takes signs, spaces and underscores, and raises for more than 4300 digits."""
    digits = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(limit)):
        return None
    value = int(digits)
    return value if value <= limit else None


@dataclass
class Build:
    """What the devices made from one list of specs share while they are made."""

    queue_max: int = QUEUE_MAX
    say: Callable[[str], None] = print  # messages for the user (a console's pty path)
    shared: dict[str, Any] = field(default_factory=dict)  # per type (net: a cable end)


@dataclass(frozen=True)
class DeviceType:
    cls: type[VirtioDevice]
    usage: str  # the spec syntax, e.g. "blk:TARGET[:ro][:queues=N]"
    build: Callable[[Spec, Build], VirtioDevice]
    driver: str | ModuleType  # the reference-driver helper module (dotted path: imported late)
    #: after all specs: complain about what is left unfinished (a net cable without its pair)
    finish: Callable[[Build], None] | None = None
    #: properties the frontend's own device needs to match this backend (QEMU -device)
    frontend: Callable[[Spec], dict[str, str]] | None = None
    #: names of the type's own spec options (``Spec.options``); others are refused
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def device_id(self) -> int:
        return self.cls.device_id

    @property
    def schema(self) -> Schema:
        return self.cls.state_schema

    @property
    def state_part(self) -> int:
        return device_part(self.device_id)

    def driver_module(self) -> ModuleType:
        if isinstance(self.driver, ModuleType):
            return self.driver
        return importlib.import_module(self.driver)


_types: dict[str, DeviceType] = {}
_builtins_loaded = False


def register(t: DeviceType) -> DeviceType:
    """Add a device type; its name and virtio id must be new."""
    for other in _types.values():
        if other.name == t.name or other.device_id == t.device_id:
            raise ValueError(
                f"device type {t.name} (id {t.device_id}) clashes with "
                f"{other.name} (id {other.device_id})"
            )
    _types[t.name] = t
    return t


def unregister(name: str) -> None:
    _types.pop(name, None)


def _load() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def types() -> list[DeviceType]:
    _load()
    return sorted(_types.values(), key=lambda t: t.device_id)


def get(name: str) -> DeviceType:
    _load()
    if name not in _types:
        raise SpecError(f"no device type {name!r} (known: {', '.join(sorted(_types))})")
    return _types[name]


def schemas() -> dict[int, Schema]:
    """Every known device part and its schema (to read states of any device type)."""
    return {t.state_part: t.schema for t in types()}


def parse_spec(text: str, position: int = 0) -> Spec:
    """``"blk:d.img,packed=off"`` -> Spec("blk", "d.img", withheld=packed bit).

    Ring options must say on or off; any other option is kept in ``options`` for the
    device type to accept or refuse (``make_devices``)."""
    base, *options = text.split(",")
    withheld = 0
    own: dict[str, str] = {}
    for opt in options:
        name, _, value = opt.partition("=")
        if name not in RING_OPTIONS:
            if not name or name in own:
                raise SpecError(f"{text}: option {opt!r} is empty or given twice")
            own[name] = value
            continue
        if value not in ("on", "off"):
            known = ", ".join(f"{n}=on|off" for n in RING_OPTIONS)
            raise SpecError(f"{text}: option {opt!r} (known: {known})")
        bit = 1 << RING_OPTIONS[name]
        withheld = withheld | bit if value == "off" else withheld & ~bit
    kind, _, arg = base.partition(":")
    return Spec(text, kind, arg, withheld, position, own)


def make_devices(specs: list[str], build: Build | None = None) -> list[VirtioDevice]:
    """One device per spec, in order; SpecError names the spec that is wrong (and the
    devices made before it are closed)."""
    build = build or Build()
    devices: list[VirtioDevice] = []
    try:
        used: list[DeviceType] = []
        for i, text in enumerate(specs):
            spec = parse_spec(text, i)
            t = get(spec.kind)
            unknown = [name for name in spec.options if name not in t.options]
            if unknown:
                known = [f"{n}=on|off" for n in RING_OPTIONS] + list(t.options)
                raise SpecError(f"{text!r}: option {unknown[0]!r} (known: {', '.join(known)})")
            try:
                dev = t.build(spec, build)
            except SpecError as e:
                raise SpecError(f"{text!r}: {e} (expected {t.usage}[,OPTION=on|off...])") from e
            except OSError as e:  # the backend (image file, TAP, socket) cannot be had
                raise SpecError(f"{text!r}: {e}") from e
            dev.features &= ~spec.withheld
            devices.append(dev)
            if t not in used:
                used.append(t)
        for t in used:
            if t.finish is not None:
                t.finish(build)
    except BaseException:
        for dev in devices:
            dev.close()
        raise
    return devices
