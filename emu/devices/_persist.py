"""Checking a device's saved state before any of it is applied.

A device part is JSON from a file that may be corrupt, hand-edited or written by another
emu; ``load_state`` must refuse it whole rather than apply half. These helpers raise
``StateError`` with the field's name, so a refusal says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from emu.state.format import StateError


def fields(state: Any, spec: dict[str, type | tuple[type, ...]], what: str) -> dict:
    """``state`` as a dict with exactly the keys of ``spec``, each of the given type."""
    if not isinstance(state, dict):
        raise StateError(f"{what}: expected a JSON object, got {type(state).__name__}")
    missing = sorted(spec.keys() - state.keys())
    if missing:
        raise StateError(f"{what}: missing fields {missing}")
    unknown = sorted(state.keys() - spec.keys())
    if unknown:
        raise StateError(f"{what}: unknown fields {unknown}")
    for key, kind in spec.items():
        value = state[key]
        # JSON true/false arrive as bool, which Python also counts as an int
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise StateError(f"{what}: field {key!r} has the wrong type ({value!r})")
    return state


def in_range(value: int, low: int, high: int, what: str) -> int:
    if not low <= value <= high:
        raise StateError(f"{what} {value} is outside {low}..{high}")
    return value


def int_list(value: list, low: int, high: int, what: str) -> list[int]:
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool):
            raise StateError(f"{what}: {v!r} is not an integer")
        in_range(v, low, high, what)
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise StateError(f"{what}: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise StateError(f"{what}: bad base64: {e}") from None
