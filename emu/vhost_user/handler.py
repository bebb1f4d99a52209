"""What a vhost-user request handler is, for the session and the extensions it owns.

A handler is a method marked ``@handles(request, size, fds)``. ``handlers_of(obj)``
collects an object's marked methods, so a session builds its dispatch table from its own
handlers and its extensions' (device state, dirty log) with no registry at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emu.vhost_user.protocol import Message


class Refused(Exception):
    """A well-formed request the backend will not carry out."""


#: a handler's answer: a payload of its own (with fds to send), or None (ack if asked)
Reply = bytes | tuple[bytes, list[int]] | None


@dataclass(frozen=True)
class Handler:
    fn: Callable[[Message], Reply]
    size: int | None  # exact payload size, or None when the handler checks it
    min_fds: int
    max_fds: int


def handles(req: int, size: int | None, fds: tuple[int, int] = (0, 0)) -> Callable:
    """Mark a method as the handler of ``req``, with its payload size and fd count."""

    def mark(fn: Callable) -> Callable:
        fn._vhost_user_request = (req, size, *fds)  # type: ignore[attr-defined]
        return fn

    return mark


def handlers_of(obj: Any) -> dict[int, Handler]:
    """``obj``'s marked methods, bound, by request."""
    out = {}
    for name in dir(type(obj)):
        spec = getattr(getattr(type(obj), name), "_vhost_user_request", None)
        if spec is not None:
            req, size, min_fds, max_fds = spec
            out[req] = Handler(getattr(obj, name), size, min_fds, max_fds)
    return out
