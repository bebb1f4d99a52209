"""virtio-blk: a host file, block device or NBD export as the guest's disk.

Two data planes serve the same requests with the same guest-visible answers (a
differential test holds them to it); the device picks one (``plane_kind``: native when
built, EMU_BLK_PLANE or ``plane=`` override) and keeps the control plane (config,
features, state, errors) in Python either way.

* native (emu.devices._blkplane): one BlkPlane per queue, the queue's ``deferred``, over
  one asynchronous engine per queue (emu.backends.storage: io_uring for a path, libnbd
  for an NBD URI), so queues run in parallel and each has up to ``iodepth`` requests
  outstanding. ``_handle_native`` pops while the engine has room and hands each batch to
  the plane, which parses, validates, builds iovecs straight onto guest RAM and submits
  in C without the GIL; completions come back through the engine's eventfd in the
  device thread's poll loop. Writethrough is per write (FUA) instead of one fdatasync per
  batch. A report stop cancels reads at the engine and fences the writes before STOPPED.
  Under the delay model (emu.testing.delay replaces the deferred) the Python path runs.
* python, the readable reference described below: one request at a time.

The Python path, one request, kick to interrupt: the device thread pops a batch of
chains; ``_parse`` cuts each chain into the 16-byte header (any readable segments), data,
and the status byte (the last device-writable byte); ``_execute`` runs it: ``preadv`` /
``pwritev`` between the file and memoryviews over guest RAM, so the payload is never
copied in Python. The status bytes are written and all chains of the batch are pushed at
once, which raises one used-buffer interrupt for the batch.

What the guest gets wrong, and the answer:

* a chain with no device-writable byte (nowhere to put the status) or with readable
  descriptors after writable ones: ``DeviceError`` (the device needs a reset). Nothing of
  the batch it came in is executed.
* everything else that has a status byte gets one: a short header, a sector range beyond
  the capacity or not aligned to ``logical_block_size``, more data segments than
  ``seg_max``, a FLUSH with a nonzero sector (the spec requires 0; we refuse rather than
  guess), a discard/write-zeroes payload that is not whole segments -> IOERR; a type we do
  not implement, or DISCARD / WRITE_ZEROES not negotiated -> UNSUPP; discard/write-zeroes
  segments as the spec says (unknown flags or UNMAP on DISCARD -> UNSUPP, more segments than
  the config allows -> UNSUPP as QEMU answers, beyond capacity or too long -> IOERR). All
  segments are checked before any is executed. On a read-only device every write-type
  request is IOERR and touches nothing.

Durability: the image is written with ``pwritev`` on the file itself, so an acknowledged
write is in the host page cache; FLUSH calls ``fdatasync``. In writeback mode (config
``writeback`` = 1, the default) that is all, as on a disk with a volatile cache. In
writethrough mode (``writeback`` = 0 through CONFIG_WCE, or FLUSH not negotiated) the
device ``fdatasync``s after each batch that wrote anything, before the batch is pushed; a
failing sync turns that batch's write statuses into IOERR.

Stop and snapshot: a report stop is honoured between requests: the device checks before
executing each request of a batch, so only a syscall already under way finishes and the
rest of the batch stays in flight, not executed. Requests that ran but whose used entries
were not published (pushes are dropped, delayed completions discarded) stay in flight too
and run again after resume or restore. That is safe because a request's effect does not
depend on having run before: a read fills the same buffer with the same blocks, a write,
discard or write-zeroes leaves the same blocks behind, a flush syncs again. (A guest that
has a read and a write of the same blocks in flight at once has no ordering either way.)
The snapshot keeps the guest-visible config; a restore onto a different disk is refused.

Where the planes differ (never in what a well-formed or merely wrong request gets): a
buffer outside guest RAM fails the device before anything of its batch runs (native) or
after the requests before it in the batch ran (Python).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from emu.backends.storage import open_engine, open_sync
from emu.devices._chain import abandoning
from emu.devices.base import MAX_HOLD, DeviceError, VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register, spec_number
from emu.memory import GuestMemory
from emu.queue import Virtqueue
from emu.ringdefs import Batch
from emu.state.format import StateError
from emu.state.schema import Bool, Int, Schema, Str

log = logging.getLogger(__name__)

# feature bits
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

# status values
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

#: discard / write-zeroes segment flag
DWZ_F_UNMAP = 1

SECTOR = 512
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
DWZ_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
CONFIG_WRITEBACK = 32

#: chains per pop: bounds the work done before the first completions are pushed
BATCH = 64
MAX_DWZ_SECTORS = 0x3FFFFF  # as QEMU: below 2 GiB per segment
MAX_DWZ_SEGMENTS = 16
GEOMETRY_HEADS = 16
GEOMETRY_SECTORS = 63

_WRITE_TYPES = frozenset({T_OUT, T_DISCARD, T_WRITE_ZEROES})

PLANES = ("native", "python")

try:
    from emu.devices import _blkplane
except ImportError:  # not built: the Python path still works
    _blkplane = None


def plane_kind(plane: str | None = None) -> str:
    """ "native" (default when built) or "python"; EMU_BLK_PLANE overrides the default."""
    plane = plane or os.environ.get("EMU_BLK_PLANE") or ("native" if _blkplane else "python")
    if plane not in PLANES:
        raise ValueError(f"unknown blk plane {plane!r} (one of {PLANES})")
    if plane == "native" and _blkplane is None:
        raise RuntimeError(
            "emu.devices._blkplane is not built; run `pip install -e .` or use "
            "plane='python' (EMU_BLK_PLANE=python)"
        )
    return plane


@dataclass(slots=True)
class Request:
    """One chain, cut at byte boundaries: decoded header, data (addr, len) pieces, status."""

    type: int | None  # None when the driver sent fewer than 16 header bytes
    sector: int
    out: list[tuple[int, int]]  # device-readable data after the header
    inp: list[tuple[int, int]]  # device-writable data before the status byte
    status_addr: int


#: the device part of a snapshot (``save_state``): what the guest saw in config space
STATE = Schema(
    "blk state",
    1,
    0,
    {
        "capacity": Int(0, 2**64 - 1),
        "block_size": Int(SECTOR, 2**32 - 1),
        "readonly": Bool(),
        "num_queues": Int(1, 0xFFFF),
        "seg_max": Int(1, 2**32 - 1),
        "serial": Str(2 * ID_BYTES),
        "writeback": Int(0, 1),
    },
)


class BlkDevice(VirtioDevice):
    device_id = 2
    name = "blk"
    state_schema = STATE

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        readonly: bool = False,
        num_queues: int = 1,
        serial: str = "emu-blk",
        queue_max_size: int | None = None,
        logical_block_size: int = 512,
        seg_max: int = 254,
        size_max: int = 1 << 20,
        plane: str | None = None,
        iodepth: int = 128,
        stop_timeout: float = 5.0,
    ) -> None:
        """``target``: a path (file or block device) or an NBD URI (emu.backends.storage).
        ``plane``: "native" or "python" (see ``plane_kind``); ``iodepth``: requests each
        queue's engine holds outstanding (native plane); ``stop_timeout``: how long a stop,
        reset or close waits for storage that stopped answering before the device gives it
        up and needs a reset. ``size_max`` is only reported: a segment of any size is
        served."""
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} not in 1..65535")
        lbs = logical_block_size
        if lbs < SECTOR or lbs & (lbs - 1):
            raise ValueError(f"logical_block_size {lbs} is not a power of 2 >= 512")
        if not 1 <= seg_max <= os.sysconf("SC_IOV_MAX"):
            raise ValueError(f"seg_max {seg_max} not in 1..IOV_MAX (one preadv per request)")
        features = (
            1 << F_SIZE_MAX
            | 1 << F_SEG_MAX
            | 1 << F_GEOMETRY
            | 1 << F_BLK_SIZE
            | 1 << F_FLUSH
            | 1 << F_TOPOLOGY
            | 1 << F_CONFIG_WCE
            | 1 << F_DISCARD
            | 1 << F_WRITE_ZEROES
        )
        if num_queues > 1:
            features |= 1 << F_MQ
        self.plane = plane_kind(plane)
        # first: fails before fds are made
        self.engines: list = []
        if self.plane == "native":
            try:
                for _ in range(num_queues):  # one per queue: queues run their I/O in parallel
                    self.engines.append(open_engine(target, readonly, iodepth))
            except BaseException:
                for e in self.engines:
                    e.close()
                raise
            self.file = self.engines[0]  # size; and the Python path under the delay model
        else:
            self.file = open_sync(target, readonly)
        # a backend that refuses writes (an NBD export the server offers read-only) makes
        # a read-only device: the guest is told so rather than failing every write
        readonly = readonly or bool(getattr(self.file, "readonly", False))
        if readonly:
            features |= 1 << F_RO
        try:
            super().__init__(num_queues, features, queue_max_size)
        except BaseException:  # out of fds, say: the backends opened above go too
            for e in self.engines or [self.file]:
                e.close()
            raise
        self.stop_timeout = stop_timeout
        for e in self.engines:
            e.timeout = stop_timeout  # a silent backend is given up, not waited for forever
        self.readonly = readonly
        self.block_size = lbs
        self.capacity = self.file.size // lbs * (lbs // SECTOR)  # in 512-byte sectors
        self.seg_max = seg_max
        self.size_max = size_max
        self.serial = serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self._writeback = 1
        self._planes = {}
        for q, engine in zip(self.queues, self.engines, strict=False):
            q.deferred = self._planes[q.index] = _blkplane.BlkPlane(
                q,
                engine,
                capacity=self.capacity,
                block_size=lbs,
                seg_max=seg_max,
                readonly=readonly,
                serial=self.serial,
            )
        self._handlers = {
            T_IN: self._read,
            T_OUT: self._write,
            T_FLUSH: self._flush,
            T_GET_ID: self._get_id,
            T_DISCARD: self._discard_or_zero,
            T_WRITE_ZEROES: self._discard_or_zero,
        }

    # -- config space --

    def config_bytes(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            min(self.capacity // (GEOMETRY_HEADS * GEOMETRY_SECTORS), 0xFFFF),
            GEOMETRY_HEADS,
            GEOMETRY_SECTORS,
            self.block_size,
            0,  # physical_block_exp: physical block = logical block
            0,  # alignment_offset
            0,  # min_io_size (unknown)
            0,  # opt_io_size (unknown)
            self.writeback,
            len(self.queues),
            MAX_DWZ_SECTORS,
            MAX_DWZ_SEGMENTS,
            self.block_size // SECTOR,  # discard_sector_alignment
            MAX_DWZ_SECTORS,
            MAX_DWZ_SEGMENTS,
            1,  # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``writeback`` is writable (CONFIG_WCE); 0 = writethrough, 1 = writeback.

        The field reads back what was set, not the effective mode: Linux reads it before
        DRIVER_OK, when the device does not know yet whether FLUSH was negotiated.
        """
        if offset == CONFIG_WRITEBACK and size == 1 and value in (0, 1):
            self.writeback = value
        else:
            super().write_config(offset, size, value)

    @property
    def writeback(self) -> int:
        return self._writeback

    @writeback.setter
    def writeback(self, value: int) -> None:
        self._writeback = value
        self._set_modes()

    @property
    def writethrough(self) -> bool:
        return not self.writeback or not self.has(F_FLUSH)

    def _set_modes(self) -> None:
        """Tell the native planes what the features and the cache mode make of requests;
        whenever either changes (activation, a config write, reset, restore)."""
        mode = (
            (_blkplane.MODE_WRITETHROUGH if self.writethrough else 0)
            | (_blkplane.MODE_DISCARD if self.has(F_DISCARD) else 0)
            | (_blkplane.MODE_WRITE_ZEROES if self.has(F_WRITE_ZEROES) else 0)
        )
        for plane in self._planes.values():
            plane.mode = mode

    def on_activate(self, features: int) -> None:
        self._set_modes()

    def on_reset(self) -> None:
        self.writeback = 1

    def close(self) -> None:
        super().close()
        for q in self.queues:
            q.deferred = None
        self._planes.clear()
        if self.engines:
            for e in self.engines:
                e.close()
        else:
            self.file.close()

    # -- snapshot --

    def save_state(self) -> dict:
        """What the guest read from config space, so a restore can check the backing."""
        return {
            "capacity": self.capacity,
            "block_size": self.block_size,
            "readonly": self.readonly,
            "num_queues": len(self.queues),
            "seg_max": self.seg_max,
            "serial": self.serial.hex(),
            "writeback": self.writeback,
        }

    def load_state(self, state: dict) -> None:
        """Refuse a snapshot of a different disk; take over the guest-chosen cache mode.

        The guest sized its I/O by capacity, block size, seg_max and queue count, and
        knows whether it may write: a backing that differs in any of these is refused.
        The serial is what the guest saw, so it is taken over as well.
        """
        s = STATE.check(state)
        mine = self.save_state()
        for key in ("capacity", "block_size", "readonly", "num_queues", "seg_max"):
            if s[key] != mine[key]:
                raise StateError(
                    f"blk: snapshot has {key} {s[key]!r}, this device's backing has "
                    f"{mine[key]!r}; refusing to restore onto a different disk"
                )
        try:
            serial = bytes.fromhex(s["serial"])
        except ValueError:
            serial = b""
        if len(serial) != ID_BYTES:
            raise StateError(f"blk state: serial is not {ID_BYTES} bytes in hex")
        self.writeback = s["writeback"]
        self.serial = serial
        for plane in self._planes.values():
            plane.set_serial(serial)

    # -- the request path --

    def native_pass(self, q: Virtqueue) -> Callable[[], None] | None:
        plane = self._planes.get(q.index)
        if plane is None or q.deferred is not plane:
            return None  # the delay model (emu.testing.delay) replaced it: the Python path
        return partial(plane.serve_queue, self.mem)

    def handle_queue(self, q: Virtqueue) -> None:
        plane = self._planes.get(q.index)
        if plane is not None and q.deferred is plane:
            plane.serve_queue(self.mem)
            return
        # the Python path; also under the delay model (emu.testing.delay), which
        # replaces the queue's deferred
        while True:
            q.set_kicks(False)
            while batch := q.pop(BATCH):
                self._serve_batch(q, batch)
            if not q.set_kicks(True):
                break

    def _serve_batch(self, q: Virtqueue, batch: Batch) -> None:
        reqs = _parse_batch(self.mem, batch)  # DeviceError before any of the batch runs
        statuses: list[tuple[int, int]] = []
        for r in reqs:
            if abandoning(q):  # report stop: the rest stays in flight, not executed
                reqs = reqs[: len(statuses)]
                break
            statuses.append(self._execute(r))
        if self.writethrough:
            self._sync_writes(reqs, statuses)
        mem = self.mem
        lengths = []
        for r, (status, written) in zip(reqs, statuses, strict=True):
            mem.write(r.status_addr, bytes((status,)))
            lengths.append(written + 1)
        q.push(batch.heads[: len(reqs)], lengths)

    def _execute(self, r: Request) -> tuple[int, int]:
        """(status, data bytes written to the guest) for one request."""
        if r.type is None:
            return S_IOERR, 0
        handler = self._handlers.get(r.type)
        if handler is None:
            return S_UNSUPP, 0
        if self.readonly and r.type in _WRITE_TYPES:
            return S_IOERR, 0
        return handler(r)

    def _sync_writes(self, reqs: list[Request], statuses: list[tuple[int, int]]) -> None:
        wrote = [
            i
            for i, (r, (status, _)) in enumerate(zip(reqs, statuses, strict=True))
            if status == S_OK and r.type in _WRITE_TYPES
        ]
        if not wrote:
            return
        try:
            self.file.flush()
        except OSError as e:
            log.error("blk: fdatasync failed: %s", e)
            for i in wrote:
                statuses[i] = (S_IOERR, 0)

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        align = self.block_size // SECTOR
        return (
            nbytes % self.block_size == 0
            and sector % align == 0
            and sector + nbytes // SECTOR <= self.capacity
        )

    # -- one handler per request type: request -> (status, data bytes written) --

    def _read(self, r: Request) -> tuple[int, int]:
        sector = r.sector
        nbytes = sum(n for _, n in r.inp)
        if not self._range_ok(sector, nbytes) or len(r.inp) > self.seg_max:
            return S_IOERR, 0
        views = [self.mem.view(a, n, write=True) for a, n in r.inp]
        try:
            done = self.file.preadv(views, sector * SECTOR)
        except OSError as e:
            log.error("blk: read at sector %d: %s", sector, e)
            return S_IOERR, 0
        return (S_OK if done == nbytes else S_IOERR), done

    def _write(self, r: Request) -> tuple[int, int]:
        sector = r.sector
        nbytes = sum(n for _, n in r.out)
        if not self._range_ok(sector, nbytes) or len(r.out) > self.seg_max:
            return S_IOERR, 0
        views = [self.mem.view(a, n) for a, n in r.out]
        try:
            done = self.file.pwritev(views, sector * SECTOR)
        except OSError as e:
            log.error("blk: write at sector %d: %s", sector, e)
            return S_IOERR, 0
        return (S_OK if done == nbytes else S_IOERR), 0

    def _flush(self, r: Request) -> tuple[int, int]:
        if r.sector != 0:
            return S_IOERR, 0
        try:
            self.file.flush()
        except OSError as e:
            log.error("blk: flush: %s", e)
            return S_IOERR, 0
        return S_OK, 0

    def _get_id(self, r: Request) -> tuple[int, int]:
        """The serial, NUL-padded to 20 bytes, cut to the space the driver gave."""
        done = 0
        for a, n in r.inp:
            if done == ID_BYTES:
                break
            piece = self.serial[done : done + n]
            self.mem.write(a, piece)
            done += len(piece)
        return S_OK, done

    def _discard_or_zero(self, r: Request) -> tuple[int, int]:
        zeroes = r.type == T_WRITE_ZEROES
        if not self.has(F_WRITE_ZEROES if zeroes else F_DISCARD):
            return S_UNSUPP, 0
        nbytes = sum(n for _, n in r.out)
        if nbytes == 0 or nbytes % DWZ_SEGMENT.size:
            return S_IOERR, 0
        if nbytes // DWZ_SEGMENT.size > MAX_DWZ_SEGMENTS:
            return S_UNSUPP, 0
        payload = b"".join(self.mem.read(a, n) for a, n in r.out)
        segments = list(DWZ_SEGMENT.iter_unpack(payload))
        for start, count, flags in segments:
            if flags & ~DWZ_F_UNMAP or (flags and not zeroes):
                return S_UNSUPP, 0
            if count > MAX_DWZ_SECTORS or not self._range_ok(start, count * SECTOR):
                return S_IOERR, 0
        try:
            for start, count, flags in segments:
                offset, length = start * SECTOR, count * SECTOR
                if zeroes:
                    self.file.write_zeroes(offset, length, unmap=bool(flags))
                else:
                    self.file.discard(offset, length)
        except OSError as e:
            log.error("blk: %s: %s", "write zeroes" if zeroes else "discard", e)
            return S_IOERR, 0
        return S_OK, 0


def _parse_batch(mem: GuestMemory, batch: Batch) -> list[Request]:
    # plain lists: indexing numpy arrays element by element costs more than converting once
    addr = batch.addr.tolist()
    length = batch.length.tolist()
    writable = batch.writable.tolist()
    start = batch.chain_start.tolist()
    return [
        _parse(mem, head, addr, length, writable, start[i], start[i + 1])
        for i, head in enumerate(batch.heads.tolist())
    ]


def _parse(
    mem: GuestMemory,
    head: int,
    addr: list[int],
    length: list[int],
    writable: list[int],
    a: int,
    b: int,
) -> Request:
    """Cut chain segments [a, b) into header, data and status byte, trusting no length."""
    out: list[tuple[int, int]] = []
    inp: list[tuple[int, int]] = []
    for j in range(a, b):
        n = length[j]
        if n == 0:
            continue
        if writable[j]:
            inp.append((addr[j], n))
        elif inp:
            raise DeviceError(f"blk: chain {head}: readable descriptor after a writable one")
        else:
            out.append((addr[j], n))
    if not inp:
        raise DeviceError(f"blk: chain {head}: no device-writable byte for the status")
    last_addr, last_len = inp.pop()
    status_addr = last_addr + last_len - 1
    if last_len > 1:
        inp.append((last_addr, last_len - 1))
    header_pieces, out = _split(out, HEADER.size)
    header = b"".join(mem.read(gpa, size) for gpa, size in header_pieces)
    if len(header) < HEADER.size:
        return Request(None, 0, out, inp, status_addr)
    rtype, _, sector = HEADER.unpack(header)
    return Request(rtype, sector, out, inp, status_addr)


def _split(
    pieces: list[tuple[int, int]], nbytes: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The first ``nbytes`` of a scatter list and the rest (fewer if it is shorter)."""
    head: list[tuple[int, int]] = []
    for i, (a, n) in enumerate(pieces):
        if nbytes <= 0:
            return head, pieces[i:]
        if n > nbytes:
            head.append((a, nbytes))
            return head, [(a + nbytes, n - nbytes), *pieces[i + 1 :]]
        head.append((a, n))
        nbytes -= n
    return head, []


# -- the device type: ``blk:TARGET[:ro][:queues=N][,hold=US]`` --

#: how long a served blk holds an interrupt by default, us (VirtioDevice.hold_interrupts;
#: docs/architecture.md, "Held interrupts"; bench/guest_io.py measures what it does)
SERVED_HOLD_US = 100


def _parse_arg(arg: str) -> tuple[str, bool, int]:
    """``TARGET[:ro][:queues=N]`` -> (TARGET, readonly, queues).

    TARGET is a raw image FILE (or block device) or an NBD URI, which has ':' of its own:
    the options are taken off the end, so a TARGET ending in ":ro" or ":queues=N" cannot
    be named this way."""
    target, readonly, queues = arg, False, 1
    while True:
        rest, _, last = target.rpartition(":")
        if not rest:
            break
        count = last[7:] if last.startswith("queues=") else ""
        if last == "ro" and not readonly:
            readonly = True
        elif count.isascii() and count.isdigit() and queues == 1:
            queues = spec_number(count, 0xFFFF) or 0  # 0, or out of range: refused below
        else:
            break
        target = rest
    if not target or not 1 <= queues <= 0xFFFF:
        raise SpecError(
            "a raw image FILE or nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH, "
            "then :ro for read-only, :queues=N for N queues"
        )
    return target, readonly, queues


def _hold_us(spec: Spec) -> int:
    text = spec.options.get("hold", str(SERVED_HOLD_US))
    limit = int(MAX_HOLD * 1e6)
    hold = spec_number(text, limit)
    if hold is None:
        raise SpecError(f"hold={text[:20]!r}: microseconds an interrupt may be held, 0..{limit}")
    return hold


def _from_spec(spec: Spec, build: Build) -> BlkDevice:
    target, readonly, queues = _parse_arg(spec.arg)
    hold = _hold_us(spec)
    try:
        dev = BlkDevice(
            target, readonly=readonly, num_queues=queues, queue_max_size=build.queue_max
        )
    except RuntimeError as e:  # a native part not built
        raise SpecError(str(e)) from e
    dev.hold_interrupts(hold * 1e-6)
    return dev


def _frontend(spec: Spec) -> dict[str, str]:
    """QEMU's vhost-user-blk on virtio-mmio sets up one queue unless told how many."""
    queues = _parse_arg(spec.arg)[2]
    return {"num-queues": str(queues)} if queues > 1 else {}


register(
    DeviceType(
        BlkDevice,
        "blk:TARGET[:ro][:queues=N][,hold=US]",
        _from_spec,
        "emu.testing.blk",
        frontend=_frontend,
        options=("hold",),
    )
)
