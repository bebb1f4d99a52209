"""virtio-rng (entropy device): the driver posts empty buffers, the device fills them.

Each chain must be device-writable only; a readable descriptor is a driver bug and makes
the device need a reset. At most ``MAX_REQUEST`` bytes go into one chain (the spec lets the
device use less than the buffer; the driver reads the used length), so a huge buffer cannot
keep the device thread busy or drain a slow source (``/dev/random``, a hardware RNG) for
long; only the first IOV_MAX segments of a chain are filled (one readv). There is no rate
limit beyond that: the default source, os.urandom, never blocks.

A source that runs dry (a regular file at its end, a callable returning b"") or fails
(EIO from a hardware RNG) cannot meet the spec's "at least one byte"; the device reports
NEEDS_RESET.

Stop and snapshot: the device keeps no state of its own (``save_state`` is the base's
empty dict). A chain filled but not published before a report stop is filled again with
fresh bytes after resume or restore; the guest only ever sees the second fill.
"""

from __future__ import annotations

import os

from emu.backends.entropy import EntropySource, Source
from emu.devices.base import DeviceError, VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register
from emu.queue import Virtqueue
from emu.ringdefs import Batch
from emu.state.schema import Schema

#: bytes per request at most
MAX_REQUEST = 64 * 1024
#: segments per request at most: one readv takes no more
IOV_MAX = os.sysconf("SC_IOV_MAX")
BATCH = 64


class RngDevice(VirtioDevice):
    device_id = 4
    name = "rng"
    #: the device part of a snapshot: nothing yet (a later minor may add fields)
    state_schema = Schema("rng state", 1, 0, {})

    def __init__(self, source: Source = None, *, queue_max_size: int | None = None) -> None:
        self.source = EntropySource(source)  # first: fails before fds are made
        super().__init__(1, 0, queue_max_size)

    def close(self) -> None:
        super().close()
        self.source.close()

    def load_state(self, state: dict) -> None:
        self.state_schema.check(state)  # refuse anything this version does not know

    def handle_queue(self, q: Virtqueue) -> None:
        while True:
            q.set_kicks(False)
            while batch := q.pop(BATCH):
                q.push(batch.heads, [self._fill(batch, i) for i in range(len(batch))])
            if not q.set_kicks(True):
                break

    def _fill(self, batch: Batch, i: int) -> int:
        """Fill chain ``i`` up to MAX_REQUEST bytes; the used length."""
        addrs, lengths, writable = batch.segments(i)
        if not writable.all():
            raise DeviceError(f"rng: chain {int(batch.heads[i])} has a device-readable buffer")
        views = []
        room = MAX_REQUEST
        for a, n in zip(addrs.tolist(), lengths.tolist(), strict=True):
            n = min(n, room)
            if n:
                views.append(self.mem.view(a, n, write=True))
                room -= n
            if not room or len(views) == IOV_MAX:
                break
        if not views:
            return 0
        try:
            done = self.source.fill(views)
        except OSError as e:
            raise DeviceError(f"rng: the entropy source failed: {e}") from e
        if done == 0:
            raise DeviceError("rng: the entropy source ran dry")
        return done


# -- the device type: ``rng`` (the host's getrandom()) --


def _from_spec(spec: Spec, build: Build) -> RngDevice:
    if spec.arg:
        raise SpecError("rng takes no argument")
    return RngDevice(queue_max_size=build.queue_max)


register(DeviceType(RngDevice, "rng", _from_spec, "emu.testing.rng"))
