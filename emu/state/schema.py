"""Schemas for the JSON parts of a snapshot (device state, transport registers).

A schema says, for every field, its type and range, and for a field added after the
first version of the part, the default an older snapshot gets. It is checked whole
before any of the value is used, and every refusal is a StateError that names the
field, so a corrupt, hand-edited or hostile file never reaches a device half-checked.

Versions: a part's header carries ``major.minor``. The rule (``Schema.load``):

* same major, same or older minor: loads; missing fields take their defaults, and the
  schema's upgrade functions (one per minor step) turn an older value into the current
  shape first, where defaults are not enough;
* a newer minor, or another major: refused, saying which.

A new field with a default is a minor step; removing or changing the meaning of a field
is a major one (old snapshots then no longer load).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emu.state.format import StateError

#: marks a field that must be present (it has no default)
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


def show(value: Any) -> str:
    """A value for an error message, cut short (a hostile file can hold huge ones)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Field:
    """One value's type and range; ``check`` returns it (normalised) or raises StateError."""

    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> Any:
        raise NotImplementedError


def _wrong(what: str, value: Any, expected: str) -> StateError:
    return StateError(f"{what} has the wrong type ({show(value)}, expected {expected})")


@dataclass(frozen=True)
class Int(Field):
    low: int
    high: int
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> int:
        # JSON true/false arrive as bool, which Python also counts as an int
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong(what, value, "an integer")
        if not self.low <= value <= self.high:
            raise StateError(f"{what} {show(value)} is outside {self.low}..{self.high}")
        return value


@dataclass(frozen=True)
class Bool(Field):
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> bool:
        if not isinstance(value, bool):
            raise _wrong(what, value, "true or false")
        return value


@dataclass(frozen=True)
class Str(Field):
    max_len: int = 256
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _wrong(what, value, "a string")
        if len(value) > self.max_len:
            raise StateError(f"{what} is longer than {self.max_len} characters")
        return value


@dataclass(frozen=True)
class Const(Field):
    """A field that must hold exactly this value (e.g. which transport wrote the part)."""

    value: Any
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> Any:
        if value != self.value or type(value) is not type(self.value):
            raise StateError(f"{what} is {show(value)}, expected {self.value!r}")
        return value


@dataclass(frozen=True)
class Bytes(Field):
    """Bytes carried as base64 text; ``check`` returns the text, ``decode`` the bytes."""

    max_bytes: int
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> str:
        self.decode(value, what)
        return value

    def decode(self, value: Any, what: str) -> bytes:
        if not isinstance(value, str):
            raise _wrong(what, value, "base64 text")
        if len(value) > (self.max_bytes + 2) // 3 * 4:
            raise StateError(f"{what} holds more than {self.max_bytes} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise StateError(f"{what}: bad base64: {e}") from None


@dataclass(frozen=True)
class Nullable(Field):
    inner: Field
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> Any:
        return None if value is None else self.inner.check(value, what)


@dataclass(frozen=True)
class List(Field):
    item: Field
    max_len: int
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> list:
        if not isinstance(value, list):
            raise _wrong(what, value, "a list")
        if len(value) > self.max_len:
            raise StateError(f"{what} is longer than {self.max_len}")
        return [self.item.check(v, f"{what}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Map(Field):
    """A JSON object with keys of the caller's choosing (e.g. queue numbers as text)."""

    value: Field
    max_len: int
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise _wrong(what, value, "a JSON object")
        if len(value) > self.max_len:
            raise StateError(f"{what} has more than {self.max_len} entries")
        return {k: self.value.check(v, f"{what}[{k!r}]") for k, v in value.items()}


@dataclass(frozen=True)
class Obj(Field):
    """A JSON object with exactly these fields (those with a default may be missing)."""

    fields: Mapping[str, Field]
    default: Any = REQUIRED

    def check(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise _wrong(what, value, "a JSON object")
        unknown = sorted(str(k) for k in value.keys() - self.fields.keys())
        if unknown:
            names = [k if len(k) <= 40 else k[:37] + "..." for k in unknown[:8]]
            raise StateError(f"{what}: unknown fields {names}")
        missing = sorted(
            k for k, f in self.fields.items() if k not in value and f.default is REQUIRED
        )
        if missing:
            raise StateError(f"{what}: missing fields {missing}")
        out = {}
        for key, f in self.fields.items():
            if key in value:
                out[key] = f.check(value[key], f"{what} field {key!r}")
            else:
                out[key] = f.default
        return out


Version = tuple[int, int]


def version_problem(name: str, have: Version, mine: Version) -> str | None:
    """Why a part of version ``have`` cannot be read by a reader of ``mine`` (None: it can)."""
    if have[0] != mine[0]:
        return (
            f"{name} is version {have[0]}.{have[1]}, of another major version "
            f"than this emu reads ({mine[0]}.x, up to {mine[0]}.{mine[1]})"
        )
    if have[1] > mine[1]:
        return (
            f"{name} is version {have[0]}.{have[1]}, a newer minor version "
            f"than this emu reads (up to {mine[0]}.{mine[1]})"
        )
    return None


@dataclass(frozen=True)
class Schema:
    """A JSON part: its name in messages, current version, fields and upgrades.

    ``upgrades[m]`` turns a value of minor ``m`` into one of minor ``m + 1``; a step
    without an entry needs only the defaults of the fields added in it.
    """

    name: str
    major: int
    minor: int
    fields: Mapping[str, Field]
    upgrades: Mapping[int, Callable[[dict], dict]] = field(default_factory=dict)

    @property
    def version(self) -> Version:
        return self.major, self.minor

    def check(self, value: Any) -> dict:
        """``value`` of the current version, checked whole; defaults filled in."""
        return Obj(self.fields).check(value, self.name)

    def load(self, value: Any, version: Version) -> dict:
        """``value`` of ``version``, brought to the current version and checked."""
        problem = version_problem(self.name, version, self.version)
        if problem is not None:
            raise StateError(problem)
        for minor in range(version[1], self.minor):
            upgrade = self.upgrades.get(minor)
            if upgrade is not None:
                if not isinstance(value, dict):
                    raise _wrong(self.name, value, "a JSON object")
                value = upgrade(dict(value))
        return self.check(value)
