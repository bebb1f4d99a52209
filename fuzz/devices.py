"""blk, net and console request parsing: raw chains in guest memory, served by the device.

The device is activated over a fresh set of rings and its thread is parked, so this
target serves queues itself, synchronously, as the device thread would (``handle_queue``
under the serving lock). The input offers chains (any segments the ring core lets
through: any lengths, any addresses in RAM including the rings themselves, readable bytes
from the input, often starting with a plausible request header), serves queues, hands the
device rx input (frames, console bytes), stops and resumes it (report or drain), and
scribbles on guest memory. Properties:

* serving raises nothing but RingError, GuestMemoryError or DeviceError (the device
  thread turns those into NEEDS_RESET; the input ends there);
* the device writes guest memory only inside the writable buffers of chains it was given
  and its own ring area (used ring / used descriptors);
* a used length never exceeds the chain's writable bytes.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import numpy as np

from emu.devices import blk, console
from emu.devices.base import DeviceError, VirtioDevice
from emu.memory import GuestMemory, GuestMemoryError
from emu.queue import Virtqueue
from emu.ringdefs import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    F_RING_PACKED,
    F_VERSION_1,
    Batch,
    RingError,
)
from fuzz import _devices
from fuzz._draw import Draw
from fuzz._oracle import Finding, Watch

MAX_LEN = 4096
MAX_OPS = 48
RAM0 = (0x0, 0x8000)  # rings (one 0x800 block per queue) and indirect tables
RAM1 = (0x10000, 0x4000)  # buffers
RINGS, STRIDE = 0x1000, 0x800
TABLES = 0x6000
_DESC = struct.Struct("<QIHH")
EXPECTED = (RingError, GuestMemoryError, DeviceError)


def _memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(*RAM0)
    mem.add_region(*RAM1, backing="anon")
    return mem


MEM = _memory()

# plausible starts of a request, per device and queue kind: what a driver would send
BLK_HEADERS = [
    blk.HEADER.pack(t, 0, s)
    for t in (blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD, blk.T_WRITE_ZEROES)
    for s in (0, 1, 8, 127, 128, 2**63)
]
DWZ = [blk.DWZ_SEGMENT.pack(s, n, f) for s in (0, 8, 127) for n in (1, 8, 2**22) for f in (0, 1, 2)]
NET_CTRL = [bytes([c, op]) for c in range(6) for op in range(7)]
CONSOLE_CTRL = [
    console.CTRL_MSG.pack(pid, ev, val) for pid in (0, 1, 2, 7) for ev in range(8) for val in (0, 1)
]


class Driver:
    """Driver side of one queue: offers chains, split or packed."""

    def __init__(self, q: Virtqueue, packed: bool) -> None:
        self.q, self.packed = q, packed
        self.avail_idx = 0
        self.slot, self.wrap = 0, True
        self.free = list(range(q.size))  # split heads / packed ids not offered yet

    def offer(self, segs: list[tuple[int, int, int]], indirect: bool, buf_id: int) -> None:
        q = self.q
        if indirect:
            table = TABLES + 0x100 * (q.index % 16)
            entries = [
                (a, n, f | (DESC_F_NEXT if k < len(segs) - 1 else 0), k + 1)
                for k, (a, n, f) in enumerate(segs[:16])
            ]
            if self.packed:
                entries = [(a, n, 0, f & ~DESC_F_NEXT) for a, n, f, _ in entries]
            MEM.write(table, b"".join(_DESC.pack(*e) for e in entries))
            segs = [(table, 16 * len(entries), DESC_F_INDIRECT)]
        if self.packed:
            self._offer_packed(segs, buf_id)
        else:
            self._offer_split(segs, buf_id)

    def _offer_split(self, segs: list[tuple[int, int, int]], head: int) -> None:
        q, size = self.q, self.q.size
        for k, (a, n, f) in enumerate(segs[:size]):
            i = (head + k) % size
            more = k < min(len(segs), size) - 1
            flags = f | (DESC_F_NEXT if more else 0)
            MEM.write(q.desc + 16 * i, _DESC.pack(a, n, flags, (i + 1) % size))
        MEM.write_int(q.driver + 4 + 2 * (self.avail_idx % size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        MEM.write_int(q.driver + 2, 2, self.avail_idx)

    def _offer_packed(self, segs: list[tuple[int, int, int]], buf_id: int) -> None:
        q = self.q
        head, head_flags = self.slot, 0
        segs = segs[: q.size]
        for k, (a, n, f) in enumerate(segs):
            flags = f | (DESC_F_NEXT if k < len(segs) - 1 else 0)
            flags |= DESC_F_AVAIL if self.wrap else DESC_F_USED
            at = q.desc + 16 * self.slot
            if k == 0:
                head_flags = flags
                MEM.write(at, _DESC.pack(a, n, buf_id, 0)[:14])
            else:
                MEM.write(at, _DESC.pack(a, n, buf_id, flags))
            self.slot += 1
            if self.slot == q.size:
                self.slot, self.wrap = 0, not self.wrap
        MEM.write_int(q.desc + 16 * head + 14, 2, head_flags)


class _Recording:
    """A ring seen through: each pop and push reported first, everything else the ring's."""

    def __init__(self, ring, popped, pushing) -> None:
        self._ring, self._popped, self._pushing = ring, popped, pushing

    def pop(self, *args, **kwargs) -> Batch:
        batch = self._ring.pop(*args, **kwargs)
        self._popped(batch)
        return batch

    def push(self, heads, lengths) -> bool:
        self._pushing(heads, lengths)
        return self._ring.push(heads, lengths)

    def __getattr__(self, name: str):
        return getattr(self._ring, name)


class Harness:
    def __init__(self, d: Draw) -> None:
        how = d.u8()
        self.kind = (2, 1, 3)[how % 3]
        self.dev: VirtioDevice = _devices.make(self.kind, how >> 2 & 3, queue_max_size=16)
        offered = self.dev.features
        features = offered & (d.u64() | 1 << F_VERSION_1) if d.flag() else offered
        if not self.dev.accept_features(features):
            features = offered
        self.packed = bool(features >> F_RING_PACKED & 1)
        self.drivers: list[Driver] = []
        self.given: dict[int, dict[int, int]] = {}  # queue -> head -> writable bytes
        self.allowed = [np.zeros(r.size, bool) for r in MEM.regions]
        for q in self.dev.queues:
            k = d.u8()
            q.size = 1 << (1 + k % 4) if k < 0xF0 else 1 + k % 16
            if not self.packed and q.size & (q.size - 1):
                q.size = 8
            base = RINGS + STRIDE * q.index
            q.desc, q.driver, q.device = base, base + 0x200, base + 0x400
            q.ready = True
            self.drivers.append(Driver(q, self.packed))
            self._watch(q)
        self.dev.activate(MEM, features)
        self._release = _park_thread(self.dev)
        for q in self.dev.queues:  # the device's own ring area (and packed: the whole ring)
            self._allow(q.device, 0x200)
            if self.packed:
                self._allow(q.desc, 16 * q.size)
        self.broken = False

    def _allow(self, gpa: int, length: int) -> None:
        for r, mask in zip(MEM.regions, self.allowed, strict=True):
            lo, hi = max(gpa, r.gpa), min(gpa + length, r.end)
            if lo < hi:
                mask[lo - r.gpa : hi - r.gpa] = True

    def _watch(self, q: Virtqueue) -> None:
        """Record what each pop from the ring hands out and check what each push claims,
        whoever pops and pushes (the queue, or blk's native plane straight from the ring):
        every ring the queue starts is seen through ``_Recording``."""
        start = q.start

        def started(*args, **kwargs) -> None:
            start(*args, **kwargs)
            q.ring = _Recording(q.ring, lambda batch: self._popped(q, batch), self._pushed(q))

        q.start = started

    def _popped(self, q: Virtqueue, batch: Batch) -> None:
        given = self.given.setdefault(q.index, {})
        for i, head in enumerate(batch.heads.tolist()):
            addrs, lengths, writable = batch.segments(i)
            room = 0
            for a, n, w in zip(addrs.tolist(), lengths.tolist(), writable.tolist(), strict=True):
                if w:
                    self._allow(a, n)
                    room += n
            given[head] = room

    def _pushed(self, q: Virtqueue):
        def check(heads, lengths) -> None:
            given = self.given.get(q.index, {})
            for h, n in zip(np.asarray(heads).tolist(), np.asarray(lengths).tolist(), strict=True):
                if n > given.get(h, 0):
                    raise Finding(
                        f"queue {q.index}: used length {n} for head {h}, "
                        f"which has {given.get(h, 0)} writable bytes"
                    )

        return check

    def serve(self, q: Virtqueue) -> None:
        """What the device thread does for a kick (VirtioDevice._serve), here."""
        if self.dev.broken is not None:
            self.broken = True
            return
        if not q.started or self.dev.stopped:
            return
        before = [r.array.copy() for r in MEM.regions]
        try:
            q.begin_pass()
            self.dev.handle_queue(q)
            self.dev.on_wake()
        except EXPECTED:
            self.broken = True
        except Exception as e:
            raise Finding(f"{self.dev.name} queue {q.index}: {e!r:.300}") from e
        finally:
            self._check_writes(before)

    def _check_writes(self, before: list[np.ndarray]) -> None:
        for r, old, mask in zip(MEM.regions, before, self.allowed, strict=True):
            # np.not_equal, not "!=": atheris traces compare operators and leaks the
            # arrays they return
            bad = np.flatnonzero(np.not_equal(r.array, old) & ~mask)
            if len(bad):
                raise Finding(
                    f"{self.dev.name} wrote guest memory outside the buffers it was given "
                    f"and its ring: gpa {r.gpa + int(bad[0]):#x} ({len(bad)} bytes)"
                )

    def stop_and_resume(self, policy: str) -> None:
        """A stop and a resume, carried out by the device thread between this target's
        passes: asked while the thread is held (so no pass of its own runs first)."""
        self.dev.request_stop(policy)
        self._release.set()
        if not self.dev.wait_stopped(5):
            raise Finding(f"{self.dev.name}: not stopped after 5 s")
        self._release = _park_thread(self.dev, then=self.dev._resume)

    def close(self) -> None:
        self._release.set()
        self.dev.close()


def _park_thread(dev: VirtioDevice, then: Callable[[], None] | None = None) -> threading.Event:
    """Let this target serve queues itself, one pass at a time: the device thread is held
    inside a command (after running ``then`` there) until the returned event is set, so
    nothing else touches the device. Tied to VirtioDevice's command queue."""
    parked, release = threading.Event(), threading.Event()

    def hold() -> None:
        if then is not None:
            then()
        parked.set()
        release.wait()

    dev._post(hold, wait=False)
    parked.wait()
    return release


def _address(d: Draw) -> int:
    k = d.u8()
    if k < 0xD0:
        return RAM1[0] + 0x40 * k
    if k < 0xF0:  # the rings and tables: a hostile driver's aliasing
        return RINGS + 0x40 * (k - 0xD0) * 8
    return [RAM0[1] - 1, RAM1[0] + RAM1[1] - 1, RAM1[0] + RAM1[1] - 0x200][k % 3]


def _length(d: Draw) -> int:
    k = d.u8()
    if k < 0xC0:
        return k
    return [0, 1, 16, 17, 512, 513, 1024, 4096, 0x1000 - 1, 0x4000][k % 10]


def _prefixes(h: Harness, q: Virtqueue) -> list[bytes]:
    if h.kind == 2:
        return (
            BLK_HEADERS
            + [BLK_HEADERS[6 * 4] + s for s in DWZ]
            + [BLK_HEADERS[6 * 5] + s for s in DWZ]
        )
    if h.kind == 1:
        if q.index == len(h.dev.queues) - 1:
            return NET_CTRL
        return [bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00"]
    if q.index in (2, 3) and len(h.dev.queues) > 2:
        return CONSOLE_CTRL
    return [b"hello\n"]


def _offer(h: Harness, d: Draw) -> None:
    q = h.dev.queues[d.below(len(h.dev.queues))]
    drv = h.drivers[q.index]
    n_read, n_write = d.below(4), d.below(3)
    segs = []
    prefix = d.pick(_prefixes(h, q)) if d.u8() < 0xC0 else b""
    content = prefix + d.blob(64)
    for k in range(n_read + n_write):
        a, n = _address(d), _length(d)
        if k == 0 and n_read and prefix and d.flag():
            n = len(prefix)  # the header alone in its buffer, as Linux sends it
        writable = k >= n_read
        if not writable:
            chunk, content = content[:n], content[n:]
            if chunk:
                try:
                    MEM.write(a, chunk)
                except GuestMemoryError:
                    pass
        segs.append((a, n, DESC_F_WRITE if writable else 0))
    if not segs:
        return
    buf_id = drv.free.pop(d.below(len(drv.free))) if drv.free else d.below(q.size)
    drv.free.append(buf_id) if d.u8() >= 0xF8 else None  # offered twice: a driver bug
    drv.offer(segs, indirect=d.u8() >= 0xE0, buf_id=buf_id)


def _rx_input(h: Harness, d: Draw) -> None:
    data = d.blob(200)
    if h.kind == 1:
        frame = d.pick([b"\xff" * 6, b"\x52\x54\x00\x12\x34\x56", b"\x01\x00\x5e\x00\x00\x01"])
        h.dev.deliver(frame + data)
    elif h.kind == 3:
        port = h.dev.ports.get(d.below(2))
        if port is not None:
            port.backend.feed(data)
    h.dev.on_wake()


def one_input(data: bytes) -> None:
    d = Draw(data)
    for r in MEM.regions:
        r.array[:] = 0
    with Watch(fds=True, threads=True):
        h = Harness(d)
        try:
            for _ in range(MAX_OPS):
                if not d.left or h.broken:
                    break
                _step(h, d)
        finally:
            h.close()


def _step(h: Harness, d: Draw) -> None:
    op = d.below(10)
    if op < 4:
        _offer(h, d)
    elif op < 7:
        h.serve(h.dev.queues[d.below(len(h.dev.queues))])
    elif op == 7:
        _rx_input(h, d)
    elif op == 8:
        h.stop_and_resume(d.pick(("drain", "report")))
    else:
        try:
            MEM.write(d.u16() % RAM0[1], d.blob(16))
        except GuestMemoryError:
            pass


def seeds() -> dict[str, bytes]:
    """A few requests of each kind per device and queue, served; split and packed rings."""
    out = {}
    nqueues = {}
    for how in range(12):
        dev = _devices.make((2, 1, 3)[how % 3], how >> 2 & 3)
        nqueues[how] = len(dev.queues)
        dev.close()
    split = (2**64 - 1 & ~(1 << F_RING_PACKED)).to_bytes(8, "little")
    for how in range(12):
        for queue in range(3):
            for ring, features in (("packed", b"\0"), ("split", b"\1" + split)):
                prog = bytes([how]) + features + bytes([3] * nqueues[how])  # size 16
                for prefix in range(0, 60, 7):
                    # queue, 1 readable (the header alone), 1 writable, a fresh id, direct
                    prog += bytes([0, queue, 1, 1, 0, prefix, 0, 0x10, 16, 1, 0x20, 64, 0, 0, 0])
                    prog += bytes([4, queue])
                out[f"{how:02x}-q{queue}-{ring}"] = prog
    return out
