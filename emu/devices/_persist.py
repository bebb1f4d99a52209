"""Checking a device's saved state before any of it is applied.

A device part is JSON from a file that may be corrupt, hand-edited or written by another
emu; ``load_state`` must refuse it whole rather than apply half. Types and ranges that
hold for every instance are the device's schema (``emu.state.schema``); these helpers
check what depends on the instance (its queue size, its pairs), raising ``StateError``
with the field's name, so a refusal says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from emu.state.format import StateError


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
