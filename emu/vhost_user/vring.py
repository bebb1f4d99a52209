"""Per-vring state a vhost-user connection builds up before a ring can start.

``Vring`` holds what the SET_VRING_* messages said (size, base, user addresses, enable)
plus the state saved when the ring was stopped; ``Notifier`` is the call or err fd the
device thread signals. The base encodings are the spec's (GET/SET_VRING_BASE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emu.ringdefs import InflightChain, RingState
from emu.vhost_user._notifier import Notifier


@dataclass
class Vring:
    index: int
    num: int = 0
    base: int = 0  # as SET_VRING_BASE encoded it
    addr: tuple[int, int, int] | None = None  # user addresses: desc, driver (avail), device
    #: log_guest_addr while VHOST_VRING_F_LOG is set: where the used ring's writes are logged
    log_addr: int | None = None
    kicked: bool = False  # SET_VRING_KICK came: the ring may start
    enabled: bool = False
    started: bool = False
    #: ring state and in-flight chains when the ring stopped (ENABLE 0, GET_VRING_BASE)
    saved: tuple[RingState, list[InflightChain]] | None = None
    call: Notifier = field(init=False)
    err: Notifier = field(init=False)

    def __post_init__(self) -> None:
        self.call = Notifier(f"vring {self.index} call")
        self.err = Notifier(f"vring {self.index} err")

    def close(self) -> None:
        self.call.close()
        self.err.close()


def encode_base(state: RingState, packed: bool) -> int:
    """GET_VRING_BASE: split = next avail index; packed = avail idx|wrap, used idx|wrap."""
    if not packed:
        return state.next_avail & 0xFFFF
    return (
        state.next_avail & 0x7FFF
        | state.avail_wrap << 15
        | (state.next_used & 0x7FFF) << 16
        | state.used_wrap << 31
    )


def decode_base(base: int, packed: bool, used_idx: int) -> RingState:
    """SET_VRING_BASE; a split ring's used index comes from guest memory (``used_idx``)."""
    if not packed:
        return RingState(base & 0xFFFF, used_idx, True, True, used_idx)
    used = base >> 16 & 0x7FFF
    return RingState(base & 0x7FFF, used, bool(base >> 15 & 1), bool(base >> 31), used)
