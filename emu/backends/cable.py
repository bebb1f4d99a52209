"""An in-process Ethernet cable between two emu NICs (tests, demos, two-guest setups).

``a, b = Cable.pair()``; give ``a`` to one ``NetDevice`` and ``b`` to the other. A frame
one device transmits is handed to the other's ``deliver``, which only queues it (thread
safe) and wakes that device's thread, so a device thread never runs the peer's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.devices.net import NetDevice


class Cable:
    """One end of the cable."""

    def __init__(self) -> None:
        self.peer: Cable | None = None
        self.device: NetDevice | None = None
        self.dropped = 0  # frames sent while nothing was plugged into the other end

    @classmethod
    def pair(cls) -> tuple[Cable, Cable]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def attach(self, device: NetDevice) -> None:
        self.device = device

    def send(self, frame: bytes) -> None:
        other = self.peer.device if self.peer is not None else None
        if other is None:
            self.dropped += 1
        else:
            other.deliver(frame)

    def close(self) -> None:
        self.device = None
