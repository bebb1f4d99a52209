"""Differential target: the pure-Python ring core and the Cython one on the same guest memory.

Two identical guest memories, one per core. The input is a program: the ring format, size
and feature bits (any 64-bit word), the ring areas (usually sane, sometimes any address),
then driver actions (descriptors, whole chains, raw bytes anywhere in the ring areas and
indirect tables, avail index jumps, event suppression fields) and device calls (pop with
any batch size, push of any subset of heads in any order with any lengths, set_notify,
pending, state, set_state with any values, a save/restore onto fresh rings). After every
call both cores must agree on the outcome: the same result or the same exception class
(only RingError and ValueError are allowed), the same bytes and dirty pages in guest
memory, the same ring state. A RingError breaks the ring: the program stops there.
"""

from __future__ import annotations

import struct

import numpy as np

from emu import _ring, pyring
from emu.memory import GuestMemory
from emu.ringdefs import (
    DESC_F_AVAIL,
    DESC_F_NEXT,
    DESC_F_USED,
    F_EVENT_IDX,
    F_IN_ORDER,
    F_INDIRECT_DESC,
    Batch,
    RingError,
    RingState,
)
from fuzz._draw import Draw
from fuzz._oracle import Finding, Watch

MAX_LEN = 2048
MAX_OPS = 64

RAM0 = (0x0, 0x8000)  # rings and indirect tables
RAM1 = (0x10000, 0x2000)  # buffers; the gap between the two is not RAM
DESC, DRIVER, DEVICE = 0x1000, 0x2000, 0x3000
TABLES = 0x4000  # 32 indirect table slots of 0x200 bytes
HOSTILE = [0x7FF8, 0x7FFF, 0x8000, 0xFFF0, 0x11FFF, 0x12000, 2**64 - 1, 2**64 - 16, 2**63]
_DESC = struct.Struct("<QIHH")  # split: addr len flags next / packed: addr len id flags
ALLOWED = (RingError, ValueError)


def _memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(*RAM0)
    mem.add_region(*RAM1, backing="anon")
    return mem


MEMS = (_memory(), _memory())  # made once: a fresh memfd per input would dominate the run


def _clear(mem: GuestMemory) -> None:
    for r in mem.regions:
        r.array[:] = 0
        r.dirty[:] = 0


def same(a: object, b: object) -> bool:
    if isinstance(a, Batch) and isinstance(b, Batch):
        return all(
            x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in zip(
                (a.heads, a.chain_start, a.addr, a.length, a.writable),
                (b.heads, b.chain_start, b.addr, b.length, b.writable),
                strict=True,
            )
        )
    return type(a) is type(b) and a == b


def _same_memory() -> bool:
    return all(
        np.array_equal(ra.array, rb.array) and np.array_equal(ra.dirty, rb.dirty)
        for ra, rb in zip(MEMS[0].regions, MEMS[1].regions, strict=True)
    )


def _outcome(fn, *args) -> tuple[str, object]:
    try:
        return "ok", fn(*args)
    except Exception as e:
        if not isinstance(e, ALLOWED):
            raise Finding(f"{fn.__qualname__}{args!r:.200}: unexpected {e!r}") from e
        return "raise", type(e)


class Pair:
    """The same ring over each memory; ``call`` runs a method on both and compares."""

    def __init__(self, d: Draw) -> None:
        self.packed = d.flag()
        if self.packed:
            self.size = 1 + d.below(32)
        else:
            self.size = 1 << d.below(6)
        self.features = d.u64() if d.u8() == 0xFF else _features(d.u8())
        self.areas = (DESC, DRIVER, DEVICE)
        if d.u8() >= 0xF0:  # anywhere: misaligned, outside RAM, straddling the gap
            self.areas = tuple(_address(d) for _ in range(3))
        self.avail_idx = 0  # split driver's next avail index
        self.slot, self.wrap = 0, True  # packed driver's next slot and wrap counter
        self.rings: list = []
        self.broken = False

    def build(self) -> bool:
        """Both constructors; True when both made a ring."""
        got = [
            _outcome(self._cls(mod), mem, self.size, *self.areas, self.features)
            for mod, mem in zip((pyring, _ring), MEMS, strict=True)
        ]
        (ka, a), (kb, b) = got
        if ka != kb or (ka == "raise" and a is not b):
            raise Finding(f"constructor: python {ka} {a!r:.200}, cython {kb} {b!r:.200}")
        self.rings = [v for _, v in got]
        return got[0][0] == "ok"

    def _cls(self, mod):
        return mod.PackedRing if self.packed else mod.SplitRing

    def call(self, name: str, *args) -> object:
        got = [_outcome(getattr(r, name), *args) for r in self.rings]
        self._agree(name, got, args)
        kind, value = got[0]
        if kind == "raise" and issubclass(value, RingError):
            self.broken = True
        return value if kind == "ok" else None

    def _agree(self, name: str, got: list, args: tuple = ()) -> None:
        (ka, a), (kb, b) = got
        if ka != kb or not same(a, b):
            raise Finding(f"{name}{args!r:.300}: python {ka} {a!r:.300}, cython {kb} {b!r:.300}")
        if not _same_memory():
            raise Finding(f"{name}{args!r:.300}: guest memory differs")
        if ka == "ok" and self.rings and not isinstance(a, type):
            sa, sb = (r.state() for r in self.rings)
            if sa != sb:
                raise Finding(f"{name}{args!r:.300}: state python {sa}, cython {sb}")

    def restore(self) -> None:
        """Fresh rings from state(): migration in miniature."""
        states = [r.state() for r in self.rings]
        mods = (pyring, _ring)
        self.rings = [
            self._cls(mod)(mem, self.size, *self.areas, self.features)
            for mod, mem in zip(mods, MEMS, strict=True)
        ]
        got = [_outcome(r.set_state, s) for r, s in zip(self.rings, states, strict=True)]
        self._agree("restore", got)
        if got[0][0] != "ok":
            raise Finding(f"a ring's own state {states[0]} does not restore: {got[0][1]}")

    # -- the driver's side: the same write to both memories --

    def write(self, gpa: int, data: bytes) -> None:
        for mem in MEMS:
            try:
                mem.write(gpa, data)
            except Exception:
                return  # outside RAM: a driver cannot write there either

    def desc(self, table: int, i: int, addr: int, length: int, flags: int, last: int) -> None:
        self.write(table + 16 * i, _DESC.pack(addr, length, flags, last))

    def offer_split(self, d: Draw) -> None:
        n = 1 + d.below(4)
        head = d.below(self.size)
        for k in range(n):
            i = (head + k) % self.size
            addr, length, flags = _buffer(d)
            flags |= DESC_F_NEXT if k < n - 1 else 0
            self.desc(self.areas[0], i, addr, length, flags, (i + 1) % self.size)
        self.write(self.areas[1] + 4 + 2 * (self.avail_idx % self.size), head.to_bytes(2, "little"))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(self.areas[1] + 2, self.avail_idx.to_bytes(2, "little"))

    def offer_packed(self, d: Draw) -> None:
        n = 1 + d.below(4)
        buf_id = d.below(self.size + 1)
        raw_flags = d.u8() >= 0xF8
        head_slot, head_flags = self.slot, 0
        for k in range(n):
            addr, length, flags = _buffer(d)
            flags |= DESC_F_NEXT if k < n - 1 else 0
            if not raw_flags:
                flags |= DESC_F_AVAIL if self.wrap else DESC_F_USED
            at = self.areas[0] + 16 * self.slot
            if k == 0:
                head_flags = flags
                self.write(at, _DESC.pack(addr, length, buf_id, 0)[:14])
            else:
                self.write(at, _DESC.pack(addr, length, buf_id, flags))
            self.slot += 1
            if self.slot == self.size:
                self.slot, self.wrap = 0, not self.wrap
        self.write(self.areas[0] + 16 * head_slot + 14, head_flags.to_bytes(2, "little"))


def _features(b: int) -> int:
    return (
        (b & 1) << F_INDIRECT_DESC
        | (b >> 1 & 1) << F_EVENT_IDX
        | (b >> 2 & 1) << F_IN_ORDER
        | (b >> 3) << 40  # other bits: a core must ignore what it does not implement
    )


def _address(d: Draw) -> int:
    a = d.u8()
    if a < 0xC0:
        return RAM1[0] + 0x20 * a
    if a < 0xE0:
        return TABLES + 0x200 * (a - 0xC0)
    if a < 0xF0:
        return (DESC, DRIVER, DEVICE)[a % 3] + 8 * (a & 7)
    if a < 0xFF:
        return HOSTILE[a % len(HOSTILE)]
    return d.u64()


def _length(d: Draw) -> int:
    n = d.u8()
    if n < 0xF0:
        return 8 * n
    return [0, 1, 0x200, 0x1000, 0x2001, 2**31, 2**32 - 1][n % 7] if n < 0xFF else d.u32()


def _buffer(d: Draw) -> tuple[int, int, int]:
    """(addr, len, flags) for one descriptor: WRITE and INDIRECT from the input."""
    addr, length, flags = _address(d), _length(d), d.u8()
    return addr, length, flags & 0x6 if flags < 0xF0 else flags << 8 | d.u8()


def _push(p: Pair, d: Draw) -> None:
    inflight = p.rings[0].inflight()
    mode = d.u8()
    if mode < 0x80:  # fetch order, as IN_ORDER needs
        heads = inflight[: d.below(len(inflight) + 1)]
    else:
        pool = list(inflight)
        heads = [pool.pop(d.below(len(pool))) for _ in range(d.below(len(pool) + 1))]
        if mode >= 0xF0:
            heads.insert(d.below(len(heads) + 1), d.u16())  # not in flight: a device bug
    lengths = [d.u32() if d.flag() else d.u8() for _ in heads]
    p.call("push", np.array(heads, np.uint16), np.array(lengths, np.uint32))


def _set_state(p: Pair, d: Draw) -> None:
    def index() -> int:
        return d.u16() if d.u8() < 0xF0 else d.uint(3) % 0x20000

    inflight = [(d.below(p.size + 2), d.below(p.size + 2)) for _ in range(d.below(6))]
    rs = RingState(index(), index(), d.flag(), d.flag(), index(), inflight)
    p.call("set_state", rs)


def _driver_event(p: Pair, d: Draw) -> None:
    if p.packed:
        p.write(p.areas[1], d.bytes(4))
    else:
        p.write(p.areas[1], d.bytes(2))  # avail flags
        p.write(p.areas[1] + 4 + 2 * p.size, d.bytes(2))  # used_event


def _raw(p: Pair, d: Draw) -> None:
    base = (*p.areas, TABLES)[d.below(4)]
    p.write(base + d.u16() % 0x400, d.blob(16))


def _desc(p: Pair, d: Draw) -> None:
    if d.flag():
        table, i = p.areas[0], d.below(p.size)
    else:
        table, i = TABLES + 0x200 * d.below(32), d.below(32)
    addr, length, flags = _buffer(d)
    p.desc(table, i, addr, length, flags | (d.u8() & DESC_F_NEXT), d.u16() % (p.size + 2))


def one_input(data: bytes) -> None:
    d = Draw(data)
    for mem in MEMS:
        _clear(mem)
    with Watch():
        p = Pair(d)
        if not p.build():
            return
        for _ in range(MAX_OPS):
            if not d.left or p.broken:
                return
            op = d.below(12)
            if op in (0, 1):
                p.offer_packed(d) if p.packed else p.offer_split(d)
            elif op == 2:
                _desc(p, d)
            elif op == 3:
                _raw(p, d)
            elif op in (4, 5):
                p.call("pop", d.below(p.size + 2))
            elif op == 6:
                _push(p, d)
            elif op == 7:
                p.call("set_notify", d.flag())
                p.call("pending")
            elif op == 8:
                _driver_event(p, d)
            elif op == 9:
                p.restore()
            elif op == 10:
                _set_state(p, d)
            elif p.packed:
                p.call("inflight")
            else:  # the avail index jumps anywhere
                p.avail_idx = d.u16()
                p.write(p.areas[1] + 2, p.avail_idx.to_bytes(2, "little"))


def seeds() -> dict[str, bytes]:
    """Chains offered, popped, pushed back, notified, restored; split and packed, each
    feature combination; one with an indirect table."""
    out = {}
    for packed in (0, 1):
        for features in (0, 1, 2, 3, 4, 7):
            prog = bytes([packed, 7 if packed else 3, 0, features, 0])  # size 8
            for head in range(3):
                # offer: 2 descriptors, a readable one and a writable one
                prog += bytes([0, 1, head]) + (b"" if not packed else b"\0")
                prog += bytes([head * 8, 8, 0, head * 8 + 4, 16, 2])
            prog += bytes([4, 9])  # pop all
            prog += bytes([6, 0, 2, 0, 32, 0, 16])  # push the first two, in fetch order
            prog += bytes([7, 1, 9])  # notify on, restore
            prog += bytes([6, 0, 1, 0, 0])  # push the last one
            out[f"{'packed' if packed else 'split'}-f{features}"] = prog
    # an indirect table of two entries in table slot 0, then a chain of just that table
    table = bytes([2, 0, 0, 0, 0, 16, 0, 1, 1, 0]) + bytes([2, 0, 0, 1, 8, 16, 2, 0, 0, 0])
    head = bytes([0, 0, 0, 0xC0, 4, 4])
    out["split-indirect"] = bytes([0, 3, 0, 1, 0]) + table + head + bytes([4, 9, 6, 0, 1, 0, 8])
    return out
