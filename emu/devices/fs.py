"""virtio-fs (device id 26): FUSE requests over virtqueues, answered from one host directory.

Queues: 0 is hiprio (the guest's FORGET and BATCH_FORGET), 1..N carry every other request
(``num_request_queues`` = N in the config space, beside the 36-byte ``tag`` the guest
mounts by). No feature bits: no notification queue, no DAX window. Every request may
arrive on any queue; each is served the same way.

One chain is one request: the device-readable part holds the fuse_in_header, the
arguments and (WRITE) the data; the device-writable part takes the fuse_out_header and
the reply. Requests run one at a time on the device thread, synchronously, in the order
they are popped: a request's reply is written before the next request is looked at, so
there is never anything for an INTERRUPT to interrupt (INTERRUPT is read and dropped).
The FUSE semantics are ``emu.backends.hostdir.HostDir``'s (node ids, lookup counts,
handles, the sandbox); this module maps the wire format (``emu.devices.fuse``) onto it.
READ and WRITE move the data between the host file and guest RAM with ``preadv`` /
``pwritev`` straight into and out of the chain's buffers (the ring core's ``readv`` /
``writev``): the payload is never copied in Python. The request's header and arguments
and the reply are copied by the ring core too (``gather`` / ``scatter``).

INIT, negotiated honestly: the reply's minor is the lower of the guest's and 7.37; the
flags are the guest's intersected with what this device does:

* ASYNC_READ: several READs of one file may be outstanding; each is a positioned read.
* ATOMIC_O_TRUNC: OPEN passes O_TRUNC to the host open (HostDir refuses it read-only)
  instead of a separate SETATTR.
* BIG_WRITES: WRITEs up to ``max_write`` rather than one page.
* AUTO_INVAL_DATA: the guest drops cached pages when the host changes a file's size or
  mtime; nothing to do here, and right for a directory the host may change.
* DO_READDIRPLUS, READDIRPLUS_AUTO: READDIRPLUS is served.
* PARALLEL_DIROPS: the guest may send lookups and readdirs of one directory at once;
  they run one after the other here, which is one of the orders allowed.
* MAX_PAGES: ``max_pages`` (below) replaces the kernel's default 32.

Not offered: locks (GETLK/SETLK answer ENOSYS, so the guest keeps locks to itself),
WRITEBACK_CACHE, DONT_MASK (the guest applies its umask before sending a mode),
HANDLE_KILLPRIV(_V2) (the guest clears set-id bits itself with SETATTR), POSIX_ACL,
EXPORT_SUPPORT, SETXATTR_EXT, SECURITY_CTX, SUBMOUNTS, DAX.

Sizes: Linux 6.1 puts one descriptor per data page in a chain and, on the ring, never
more descriptors than the queue size (emu's rings refuse longer chains). So ``max_pages``
is the smallest request queue's size less 8 (descriptors for headers and arguments),
capped at the kernel's ceiling of 256 pages (1 MiB); ``max_write`` is ``max_pages`` pages
of 4 KiB. READ and READDIR sizes are capped by the writable room, by 1 MiB and by IOV_MAX
buffers (a shorter READ reply is what the guest sees at the end of a file).

What the guest gets wrong, and the answer (an error reply is a bare fuse_out_header with
``-errno``; nothing of the request is executed unless said):

* fewer than 16 writable bytes for a request that needs a reply: nowhere to answer, so
  the request is not executed and the chain is used with length 0. FORGET, BATCH_FORGET
  and INTERRUPT need no writable part; their used length is always 0.
* fewer than 40 readable bytes (no whole in header): EIO, unique 0.
* ``in.len`` below 40 or above the readable bytes: EINVAL. Readable bytes past ``in.len``
  are ignored (a request is what its header says it is).
* a READ or WRITE offset negative as a loff_t: EINVAL (preadv2 would take -1 as "the
  fd's own position").
* an argument struct cut short, a name without its NUL, a WRITE whose ``size`` is more
  than the data sent or than ``max_write``, more than 128 KiB of arguments, writable room
  too small for a fixed-size reply, a time with nanoseconds >= 10^9: EINVAL.
* a request before INIT (or after DESTROY): EIO; a second INIT: EIO; a guest speaking an
  older protocol than 7.31: EPROTO (a newer major gets our major, as the protocol asks).
* an opcode not served: ENOSYS.
* every name, node id and handle is HostDir's to check: its errno is the answer.
* a write-type request on a ``ro`` device: EROFS, before HostDir is asked.
* anything unexpected while serving a request: logged, EIO; the device carries on.

Only what the rings and guest memory refuse (a descriptor outside guest RAM, a looping
chain) makes the device need a reset, as for every emu device.

Stop and snapshot: a report stop is honoured between requests. A request that ran but
whose used entry a stop withheld must not run again (a MKDIR would answer EEXIST, a
LOOKUP would count twice): its reply is in guest RAM already, so the device remembers its
used length and, when the chain is handed to it again after resume or restore, publishes
that length without executing it. The snapshot holds HostDir's nodes and handles
(``HostDir.save``), the negotiated INIT parameters, those remembered lengths, and the tag,
queue count and ``ro`` the guest saw (a restore onto a device that differs is refused).
Nodes whose files were deleted or replaced on the host between save and restore come
back stale: the guest gets ESTALE for them, never another file's data (``load_state``).
A state's remembered lengths are taken only for chains its restore put in flight and
that have room for them (checked on each queue's first pass); others are dropped, and
the request is served.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, NamedTuple

from emu.backends.hostdir import HostDir, HostDirStateError
from emu.devices import _persist
from emu.devices import fuse as f
from emu.devices._chain import (
    Chain,
    ChainError,
    chains,
    inflight_heads,
)
from emu.devices.base import DeviceError, VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register, spec_number
from emu.memory import GuestMemoryError, span
from emu.queue import CLOSED, Virtqueue
from emu.state.format import StateError
from emu.state.schema import Bool, Field, Int, List, Map, Nullable, Obj, Schema, Str

log = logging.getLogger(__name__)

TAG_MAX = 36
#: guest page size the kernel counts max_pages in (x86: the guests emu serves)
PAGE = 4096
#: the kernel's ceiling for max_pages (FUSE_MAX_MAX_PAGES)
MAX_PAGES_LIMIT = 256
#: descriptors of a READ/WRITE chain besides its data pages (headers, args; with margin)
CHAIN_OVERHEAD = 8
#: the largest READ / READDIR reply and WRITE served
MAX_IO = MAX_PAGES_LIMIT * PAGE
#: arguments of any request but WRITE: a struct, two names, an xattr value (64 KiB)
MAX_ARGS = 128 << 10
#: bytes one COPY_FILE_RANGE copies at most (a shorter count is a valid answer; the guest
#: asks again): small enough that one request holds the device thread for milliseconds
MAX_COPY = 8 << 20
#: seconds the guest may cache names and attributes (as virtiofsd's cache=auto)
TTL = 1
BATCH = 64
IN_HEADER_SIZE = f.IN_HEADER.size
OUT_HEADER_SIZE = f.OUT_HEADER.size
#: a request whose readable bytes are at most this many is copied whole in one pass (every
#: request but a WRITE with data is: a header, a struct, one or two names)
INLINE = 4096
#: opcodes the request path compares with (plain ints: no enum lookup per request)
_INIT, _READ, _WRITE = int(f.Op.INIT), int(f.Op.READ), int(f.Op.WRITE)
_IN_HEADER, _NO_REPLY = f.IN_HEADER, f.NO_REPLY

OFFERED = (
    f.ASYNC_READ
    | f.ATOMIC_O_TRUNC
    | f.BIG_WRITES
    | f.AUTO_INVAL_DATA
    | f.DO_READDIRPLUS
    | f.READDIRPLUS_AUTO
    | f.PARALLEL_DIROPS
    | f.MAX_PAGES
)

#: requests that change the shared directory: EROFS on a ``ro`` device
WRITE_OPS = frozenset(
    {
        f.Op.SETATTR,
        f.Op.SYMLINK,
        f.Op.MKNOD,
        f.Op.MKDIR,
        f.Op.UNLINK,
        f.Op.RMDIR,
        f.Op.RENAME,
        f.Op.RENAME2,
        f.Op.LINK,
        f.Op.CREATE,
        f.Op.WRITE,
        f.Op.SETXATTR,
        f.Op.REMOVEXATTR,
        f.Op.FALLOCATE,
        f.Op.COPY_FILE_RANGE,
    }
)


class Header(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    padding: int


#: a Header from the unpacked in header, made in C (Header._make is a Python call)
_header = partial(tuple.__new__, Header)


@dataclass
class Session:
    """What INIT negotiated; kept in the snapshot so a restored device goes on serving."""

    minor: int
    flags: int
    max_write: int
    max_pages: int
    max_readahead: int


#: one request's handler: (header, arguments, reply room) -> reply body
_Handler = Callable[[Header, f.Args, int], bytes]


class _JsonObject(Field):
    """HostDir's own state: a JSON object, size-bounded here, checked by ``HostDir.load``."""

    max_bytes = 64 << 20

    def check(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise StateError(f"{what} is not a JSON object")
        if len(json.dumps(value)) > self.max_bytes:
            raise StateError(f"{what} is larger than {self.max_bytes} bytes")
        return value


#: the device part of a snapshot (``save_state``)
STATE = Schema(
    "fs state",
    1,
    0,
    {
        "tag": Str(4 * TAG_MAX),
        "num_request_queues": Int(1, 0xFFFF),
        "readonly": Bool(),
        "session": Nullable(
            Obj(
                {
                    "minor": Int(f.MIN_MINOR, f.KERNEL_MINOR),
                    "flags": Int(0, 2**64 - 1),
                    "max_write": Int(PAGE, MAX_IO),
                    "max_pages": Int(1, MAX_PAGES_LIMIT),
                    "max_readahead": Int(0, 2**32 - 1),
                }
            )
        ),
        # per queue (its index as text): [head, used length] of chains answered whose
        # used entries a stop withheld
        "replied": Map(List(List(Int(0, 2**32 - 1), 2), 0x10000), 0x10001),
        "dir": _JsonObject(),
    },
)


class FsDevice(VirtioDevice):
    device_id = 26
    name = "fs"
    state_schema = STATE

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        tag: str = "emu",
        readonly: bool = False,
        num_request_queues: int = 1,
        queue_max_size: int | None = None,
        strict_restore: bool = False,
    ) -> None:
        """``strict_restore``: refuse a snapshot whose nodes and handles cannot all be
        reopened as they were, instead of restoring those stale (see ``load_state``)."""
        raw = tag.encode()
        if not 1 <= len(raw) <= TAG_MAX or b"\0" in raw:
            raise ValueError(f"tag {tag!r}: 1 to {TAG_MAX} bytes of UTF-8, no NUL")
        if not 1 <= num_request_queues <= 0xFFFF - 1:
            raise ValueError(f"num_request_queues {num_request_queues} not in 1..65534")
        self.dir = HostDir(root, readonly=readonly)  # first: fails before fds are made
        self.root = os.path.abspath(root)  # a restore opens it again (load_state)
        try:
            super().__init__(1 + num_request_queues, 0, queue_max_size)
        except BaseException:
            self.dir.close()
            raise
        self.tag = tag
        self.readonly = readonly
        self.num_request_queues = num_request_queues
        self.strict_restore = strict_restore
        self.session: Session | None = None
        #: the ring of the queue being served: it copies request and reply bytes in C
        #: (gather / scatter) through its table of the guest's regions
        self._io: Any = None
        #: per queue: head -> used length of chains answered whose push a stop withheld
        self._withheld: dict[int, dict[int, int]] = {q.index: {} for q in self.queues}
        #: per queue: head -> used length of chains answered before a stop, still in flight
        self._replied: dict[int, dict[int, int]] = {q.index: {} for q in self.queues}
        #: queues whose ``_replied`` a state gave and no pass has checked against the
        #: chains that restore put in flight
        self._unchecked: set[int] = set()
        #: requests read since INIT, by opcode (slot 0: a value that is none): what a
        #: guest's workload costs in round trips, beside virtiofsd's ``-d`` log (logged at
        #: DESTROY with -vv, as every request is; ``requests`` has them by name)
        self._counts = [0] * _SLOTS
        #: debug logging on, as seen at INIT (a look per request would cost one in 60
        #: of a request's instructions)
        self._debug = log.isEnabledFor(logging.DEBUG)
        Op = f.Op
        #: opcode -> (handler, reply size when fixed, else None); READ, WRITE and the
        #: no-reply requests are served apart
        self._ops: dict[int, tuple[_Handler, int | None]] = {
            Op.INIT: (self._init, f.INIT_OUT.size),
            Op.DESTROY: (self._destroy, 0),
            Op.LOOKUP: (self._lookup, f.ENTRY_OUT.size),
            Op.GETATTR: (self._getattr, f.ATTR_OUT.size),
            Op.SETATTR: (self._setattr, f.ATTR_OUT.size),
            Op.READLINK: (self._readlink, None),
            Op.SYMLINK: (self._symlink, f.ENTRY_OUT.size),
            Op.MKNOD: (self._mknod, f.ENTRY_OUT.size),
            Op.MKDIR: (self._mkdir, f.ENTRY_OUT.size),
            Op.UNLINK: (self._unlink, 0),
            Op.RMDIR: (self._rmdir, 0),
            Op.RENAME: (self._rename, 0),
            Op.RENAME2: (self._rename2, 0),
            Op.LINK: (self._link, f.ENTRY_OUT.size),
            Op.OPEN: (self._open, f.OPEN_OUT.size),
            Op.CREATE: (self._create, f.ENTRY_OUT.size + f.OPEN_OUT.size),
            Op.STATFS: (self._statfs, f.STATFS_OUT.size),
            Op.RELEASE: (self._release, 0),
            Op.FSYNC: (self._fsync, 0),
            Op.FLUSH: (self._flush, 0),
            Op.OPENDIR: (self._opendir, f.OPEN_OUT.size),
            Op.READDIR: (self._readdir, None),
            Op.READDIRPLUS: (self._readdirplus, None),
            Op.RELEASEDIR: (self._releasedir, 0),
            Op.FSYNCDIR: (self._fsyncdir, 0),
            Op.ACCESS: (self._access, 0),
            Op.GETXATTR: (self._getxattr, None),
            Op.SETXATTR: (self._setxattr, 0),
            Op.LISTXATTR: (self._listxattr, None),
            Op.REMOVEXATTR: (self._removexattr, 0),
            Op.FALLOCATE: (self._fallocate, 0),
            Op.LSEEK: (self._lseek, f.LSEEK_OUT.size),
            Op.COPY_FILE_RANGE: (self._copy_file_range, f.WRITE_OUT.size),
        }

    def requests(self) -> dict[str, int]:
        """Requests read since INIT by opcode name ("other": values that are none)."""
        out: dict[str, int] = {}
        for op, n in enumerate(self._counts):
            if n:
                name = _op_name(op)
                out[name] = out.get(name, 0) + n
        return out

    # -- config space --

    def config_bytes(self) -> bytes:
        tag = self.tag.encode().ljust(TAG_MAX, b"\0")
        return tag + self.num_request_queues.to_bytes(4, "little")

    # -- lifecycle --

    def on_reset(self) -> None:
        """A reset ends the FUSE session: every node but the root and every handle goes."""
        self.dir.forget_all()
        self.session = None
        self._counts = [0] * _SLOTS
        for q in self.queues:
            self._withheld[q.index].clear()
            self._replied[q.index].clear()
        self._unchecked.clear()

    def on_queue_reset(self, index: int) -> None:
        """The reset ring hands the heads out again for new requests: an answer kept for
        one of them belongs to a request the driver gave up."""
        self._withheld[index].clear()
        self._replied[index].clear()

    def close(self) -> None:
        super().close()
        self.dir.close()

    # -- the request path --

    def handle_queue(self, q: Virtqueue) -> None:
        """Serve every chain the driver made available, a batch at a time.

        A batch shorter than asked emptied the ring, so the next look is
        ``set_kicks(True)``, which says whether more came meanwhile: one pop per
        wake-up when the guest sends one request at a time.

        A chain answered must not run again, so the used lengths of a push that may not
        reach the guest are kept in ``_withheld`` until a stop settles them
        (``forget_inflight``: the heads still in flight are answered without running
        when handed out again) or a reset drops them. A push is held back by a closed
        gate (a report stop), and a closed gate stays closed until the stop settles, so
        that check alone is needed after each push; an entry for a push that got out
        just before the gate closed names a head no longer in flight, which the stop
        ignores. A queue with a Deferred (a delay model) holds pushes past the moment:
        there every push is kept, and a head handed out again drops its old entry."""
        replied, withheld = self._replied[q.index], self._withheld[q.index]
        if q.index in self._unchecked:
            self._unchecked.discard(q.index)
            self._drop_stray(q, replied)
        self._io = q.ring
        while True:
            q.set_kicks(False)
            while True:
                batch = q.pop(BATCH)
                if not len(batch.heads):
                    break
                heads: list[int] = []
                lengths: list[int] = []
                batch_chains = chains(batch)
                if q.deferred is not None:  # a head handed out again: its last use is out
                    for c in batch_chains:
                        withheld.pop(c.head, None)
                for c in batch_chains:
                    if q.gate is CLOSED:  # report stop: the rest stays in flight, not run
                        break
                    used = replied.pop(c.head, None) if replied else None
                    if used is not None and used > c.in_len:  # a state's lie: no reply fits
                        log.warning("fs: head %d: state says %d bytes used, serving", c.head, used)
                        used = None
                    if used is None:  # not answered before a stop: serve it now
                        used = self._serve(c)
                    heads.append(c.head)
                    lengths.append(used)
                q.push(heads, lengths)
                if q.gate is CLOSED or q.deferred is not None:
                    withheld.update(zip(heads, lengths, strict=True))
                if len(heads) < BATCH:
                    break
            if not q.set_kicks(True):
                return

    def _drop_stray(self, q: Virtqueue, replied: dict[int, int]) -> None:
        """Only a chain the restore put in flight can have been answered before the
        stop; a state naming other heads would make later requests on them look
        answered, unexecuted, so those entries go."""
        stray = set(replied) - set(inflight_heads(q))
        if stray:
            log.warning(
                "fs: queue %d: the state answered heads %s, not in flight: ignored",
                q.index,
                sorted(stray)[:8],
            )
            for head in stray:
                del replied[head]

    def _serve(self, c: Chain) -> int:
        """Execute one request and write its reply; the chain's used length.

        The chain's buffers are read and written through plain (gpa, length) lists
        (``_gather`` / ``_scatter``), not a reader and writer object per request: a
        metadata request is a few microseconds of host work, so the per-request Python
        around it is what a guest waits for."""
        # a request without data is read whole at once (header and arguments); a WRITE's
        # data stays where it is
        raw, sent = self._io.gather(c.readable, INLINE)
        if sent < IN_HEADER_SIZE:
            log.info("fs: chain %d: %d readable bytes, no whole in header", c.head, sent)
            return self._answer_error(c, 0, errno.EIO)
        if raw is None:
            raw = self._gather(c.readable, 0, IN_HEADER_SIZE)
        h = _header(_IN_HEADER.unpack_from(raw))
        op = h.opcode
        self._counts[op if op < _SLOTS else 0] += 1  # 0: no opcode
        if self._debug:
            log.debug("fs: request %d: %s node %d", h.unique, _op_name(op), h.nodeid)
        if op in _NO_REPLY:
            self._no_reply(h, c, raw, sent)
            return 0
        room = -OUT_HEADER_SIZE  # the writable bytes after the out header
        for _, k in c.writable:
            room += k
        if room < 0:
            log.info("fs: request %d (opcode %d) has no room for a reply", h.unique, h.opcode)
            return 0
        try:
            return self._dispatch(h, c, raw, sent, room)
        except ChainError as e:  # a length the checks missed: still the guest's fault
            log.info("fs: request %d (opcode %d): %s", h.unique, h.opcode, e)
            err = errno.EINVAL
        except (DeviceError, GuestMemoryError):
            raise
        except OSError as e:
            err = e.errno or errno.EIO
            if isinstance(e, f.Malformed):
                log.info("fs: request %d (opcode %d): %s", h.unique, h.opcode, e.strerror)
        except Exception:
            log.exception("fs: request %d (opcode %d) failed", h.unique, h.opcode)
            err = errno.EIO
        if self._debug:
            log.debug("fs: request %d: error %d", h.unique, err)
        return self._answer_error(c, h.unique, err)

    def _answer_error(self, c: Chain, unique: int, err: int) -> int:
        """A bare out header with ``-err`` (written afresh: a failed READ may have taken
        room already); 0 when there is no room for it."""
        if _length(c.writable) < OUT_HEADER_SIZE:
            return 0
        self._scatter(c.writable, f.OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique))
        return OUT_HEADER_SIZE

    def _dispatch(self, h: Header, c: Chain, raw: bytes, sent: int, room: int) -> int:
        """Check the request against the session and the device, then run it (``raw``:
        the request's first bytes, the in header at least)."""
        if not IN_HEADER_SIZE <= h.len <= sent:
            raise f.Malformed(f"in.len {h.len} with {sent} bytes sent")
        op = h.opcode
        served = self._ops.get(op)
        if served is None and op != _READ and op != _WRITE:
            raise OSError(errno.ENOSYS, "not served")
        if self.session is None and op != _INIT:
            raise OSError(errno.EIO, "no INIT yet")
        if self.readonly and op in WRITE_OPS:
            raise OSError(errno.EROFS, "read-only")
        arglen = h.len - IN_HEADER_SIZE
        if op == _WRITE:  # only the struct is copied; the data stays in guest RAM
            if room < f.WRITE_OUT.size:
                raise f.Malformed(f"{room} bytes of room for a WRITE reply")
            fixed = min(arglen, f.WRITE_IN.size)
            args = self._args(c, raw, fixed)
            body = self._write(args, c, IN_HEADER_SIZE + fixed, arglen - fixed)
            return self._reply(c, h, body, room)
        if arglen > MAX_ARGS:
            raise f.Malformed(f"{arglen} bytes of arguments")
        end = IN_HEADER_SIZE + arglen
        args = f.Args(raw[IN_HEADER_SIZE:end]) if len(raw) >= end else self._args(c, raw, arglen)
        if served is None:
            return self._read(h, args, c, room)
        handler, size = served
        if size is not None and size > room:
            raise f.Malformed(f"{room} bytes of room for a {size}-byte reply")
        return self._reply(c, h, handler(h, args, room), room)

    def _reply(self, c: Chain, h: Header, body: bytes, room: int) -> int:
        """The out header and ``body`` into the writable buffers (``room``: their bytes
        after the header); the used length."""
        n = len(body)
        if n > room:
            raise ChainError(f"{n} bytes of reply, {room} of room")
        self._io.scatter(c.writable, f.OUT_HEADER.pack(OUT_HEADER_SIZE + n, 0, h.unique) + body)
        return OUT_HEADER_SIZE + n

    def _args(self, c: Chain, raw: bytes, n: int) -> f.Args:
        """The ``n`` argument bytes after the in header (the caller checked that they were
        sent), from ``raw`` when it holds them."""
        end = IN_HEADER_SIZE + n
        if len(raw) >= end:
            return f.Args(raw[IN_HEADER_SIZE:end])
        return f.Args(self._gather(c.readable, IN_HEADER_SIZE, n))

    def _gather(self, segments: list[tuple[int, int]], start: int, n: int) -> bytes:
        """Bytes ``start`` to ``start + n`` of the readable buffers (the caller checked
        that they hold that many): one read when a buffer holds them all, as the in
        header and each argument of a Linux request do."""
        pieces = span(segments, start, n)
        if len(pieces) == 1:
            return self.mem.read(*pieces[0])
        return b"".join([self.mem.read(gpa, k) for gpa, k in pieces])

    def _scatter(self, segments: list[tuple[int, int]], data: bytes) -> None:
        """``data`` into the writable buffers, front to back (ChainError, nothing written,
        when they hold less)."""
        n = len(data)
        if n > _length(segments):
            raise ChainError(f"{n} bytes of reply, {_length(segments)} of room")
        off = 0
        for gpa, k in segments:
            if off >= n:
                break
            self.mem.write(gpa, data[off : off + k])
            off += k

    def _no_reply(self, h: Header, c: Chain, raw: bytes, sent: int) -> None:
        """FORGET, BATCH_FORGET, INTERRUPT: nothing goes back, whatever is wrong."""
        try:
            if not IN_HEADER_SIZE <= h.len <= sent:
                raise f.Malformed(f"in.len {h.len}")
            args = self._args(c, raw, min(h.len - IN_HEADER_SIZE, MAX_ARGS))
            if h.opcode == f.Op.FORGET:
                (nlookup,) = args.take(f.FORGET_IN)
                self.dir.forget(h.nodeid, nlookup)
            elif h.opcode == f.Op.BATCH_FORGET:
                count, _ = args.take(f.BATCH_FORGET_IN)
                if count * f.FORGET_ONE.size > args.left:
                    raise f.Malformed(f"BATCH_FORGET of {count} with {args.left} bytes")
                for _ in range(count):
                    self.dir.forget(*args.take(f.FORGET_ONE))
            # INTERRUPT: requests run to completion before the next is read; nothing to do
        except OSError as e:
            log.info("fs: %s of node %d: %s", f.Op(h.opcode).name, h.nodeid, e)

    # -- INIT and DESTROY --

    def _init(self, h: Header, a: f.Args, room: int) -> bytes:
        if self.session is not None:
            raise OSError(errno.EIO, "second INIT")
        self._debug = log.isEnabledFor(logging.DEBUG)
        major, minor, max_readahead, flags = a.take(f.INIT_IN_OLD)
        if major > f.KERNEL_VERSION:  # the guest will send INIT again with our major
            return f.INIT_OUT.pack(f.KERNEL_VERSION, f.KERNEL_MINOR, *([0] * 9))
        if major < f.KERNEL_VERSION or minor < f.MIN_MINOR:
            raise OSError(errno.EPROTO, f"protocol {major}.{minor}")
        if flags & f.INIT_EXT and a.left >= 4:
            flags |= int.from_bytes(a.rest(4), "little") << 32
        sizes = [q.size for q in self.queues[1:] if q.started] or [self.queue_max_size]
        max_pages = max(1, min(MAX_PAGES_LIMIT, min(sizes) - CHAIN_OVERHEAD))
        agreed = flags & OFFERED
        self.session = Session(
            min(minor, f.KERNEL_MINOR),
            agreed,
            max_pages * PAGE,
            max_pages,
            max_readahead,  # the guest's own: it reads ahead in max_pages pieces
        )
        s = self.session
        return f.INIT_OUT.pack(
            f.KERNEL_VERSION,
            s.minor,
            s.max_readahead,
            agreed & 0xFFFFFFFF,
            0,  # max_background: the kernel's default
            0,  # congestion_threshold: the kernel's default
            s.max_write,
            1,  # time_gran: nanoseconds
            s.max_pages,
            0,  # map_alignment: no DAX
            agreed >> 32,
        )

    def _destroy(self, h: Header, a: f.Args, room: int) -> bytes:
        """The guest unmounted: forget its nodes and handles; the next mount INITs again."""
        if self._debug:
            counts = sorted(self.requests().items(), key=lambda kv: -kv[1])
            log.debug("fs: requests: %s", ", ".join(f"{k} {n}" for k, n in counts))
        self._counts = [0] * _SLOTS
        self.dir.forget_all()
        self.session = None
        return b""

    # -- names and attributes --

    def _entry(self, node: int, st: os.stat_result) -> bytes:
        return f.entry_out(node, st, TTL)

    def _lookup(self, h: Header, a: f.Args, room: int) -> bytes:
        node, st = self.dir.lookup(h.nodeid, a.name())
        return f.entry_out(node, st, TTL)

    def _getattr(self, h: Header, a: f.Args, room: int) -> bytes:
        a.take(f.GETATTR_IN)  # a handle given (GETATTR_FH) names the same node
        return f.attr_out(self.dir.getattr(h.nodeid), TTL)

    def _setattr(self, h: Header, a: f.Args, room: int) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, ansec, mnsec, _, mode, _, uid, gid, _) = a.take(
            f.SETATTR_IN
        )
        kw: dict[str, Any] = {}
        if valid & f.FATTR_MODE:
            kw["mode"] = mode & 0o7777
        if valid & f.FATTR_UID:
            kw["uid"] = uid
        if valid & f.FATTR_GID:
            kw["gid"] = gid
        if valid & f.FATTR_SIZE:
            kw["size"] = size
        if valid & f.FATTR_ATIME_NOW:
            kw["atime_now"] = True
        elif valid & f.FATTR_ATIME:
            kw["atime_ns"] = _ns(atime, ansec)
        if valid & f.FATTR_MTIME_NOW:
            kw["mtime_now"] = True
        elif valid & f.FATTR_MTIME:
            kw["mtime_ns"] = _ns(mtime, mnsec)
        # CTIME cannot be set on a host file (it moves with any change); LOCKOWNER and
        # KILL_SUIDGID belong to features not offered
        st = self.dir.setattr(h.nodeid, fh if valid & f.FATTR_FH else None, **kw)
        return f.attr_out(st, TTL)

    def _readlink(self, h: Header, a: f.Args, room: int) -> bytes:
        target = self.dir.readlink(h.nodeid)
        if len(target) > room:
            raise OSError(errno.ENAMETOOLONG, "link target longer than the reply room")
        return target

    def _symlink(self, h: Header, a: f.Args, room: int) -> bytes:
        name = a.name()
        return self._entry(*self.dir.symlink(h.nodeid, name, a.name()))

    def _mknod(self, h: Header, a: f.Args, room: int) -> bytes:
        mode, rdev, _, _ = a.take(f.MKNOD_IN)
        return self._entry(*self.dir.mknod(h.nodeid, a.name(), mode, f.decode_dev(rdev)))

    def _mkdir(self, h: Header, a: f.Args, room: int) -> bytes:
        mode, _ = a.take(f.MKDIR_IN)
        return self._entry(*self.dir.mkdir(h.nodeid, a.name(), mode))

    def _unlink(self, h: Header, a: f.Args, room: int) -> bytes:
        self.dir.unlink(h.nodeid, a.name())
        return b""

    def _rmdir(self, h: Header, a: f.Args, room: int) -> bytes:
        self.dir.rmdir(h.nodeid, a.name())
        return b""

    def _rename(self, h: Header, a: f.Args, room: int) -> bytes:
        (newdir,) = a.take(f.RENAME_IN)
        old = a.name()
        self.dir.rename(h.nodeid, old, newdir, a.name())
        return b""

    def _rename2(self, h: Header, a: f.Args, room: int) -> bytes:
        newdir, flags, _ = a.take(f.RENAME2_IN)
        old = a.name()
        self.dir.rename(h.nodeid, old, newdir, a.name(), flags)
        return b""

    def _link(self, h: Header, a: f.Args, room: int) -> bytes:
        (node,) = a.take(f.LINK_IN)
        return self._entry(*self.dir.link(node, h.nodeid, a.name()))

    def _access(self, h: Header, a: f.Args, room: int) -> bytes:
        mask, _ = a.take(f.ACCESS_IN)
        self.dir.access(h.nodeid, mask)
        return b""

    def _statfs(self, h: Header, a: f.Args, room: int) -> bytes:
        return f.statfs_out(self.dir.statfs(h.nodeid))

    # -- files --

    def _open(self, h: Header, a: f.Args, room: int) -> bytes:
        flags, _ = a.take(f.OPEN_IN)
        return f.OPEN_OUT.pack(self.dir.open(h.nodeid, flags), 0, 0)

    def _create(self, h: Header, a: f.Args, room: int) -> bytes:
        flags, mode, _, _ = a.take(f.CREATE_IN)
        node, st, fh = self.dir.create(h.nodeid, a.name(), mode, flags)
        return self._entry(node, st) + f.OPEN_OUT.pack(fh, 0, 0)

    def _read(self, h: Header, a: f.Args, c: Chain, room: int) -> int:
        """preadv from the host file straight into the chain's buffers after the header
        (by the ring, in C, with at most IOV_MAX buffers: a shorter read is an answer)."""
        fh, offset, size, *_ = a.take(f.READ_IN)
        fd = self.dir.fd(fh)
        limit = min(size, room, MAX_IO)
        try:
            done = self._io.readv(fd, c.writable, OUT_HEADER_SIZE, limit, _offset(offset))
        except OSError as e:
            header = f.OUT_HEADER.pack(OUT_HEADER_SIZE, -(e.errno or errno.EIO), h.unique)
            self._io.scatter(c.writable, header)
            return OUT_HEADER_SIZE
        self._io.scatter(c.writable, f.OUT_HEADER.pack(OUT_HEADER_SIZE + done, 0, h.unique))
        return OUT_HEADER_SIZE + done

    def _write(self, a: f.Args, c: Chain, start: int, sent: int) -> bytes:
        """pwritev from the chain's buffers (its data from byte ``start`` on, ``sent``
        bytes of it) straight into the host file."""
        fh, offset, size, *_ = a.take(f.WRITE_IN)
        if size > sent:
            raise f.Malformed(f"WRITE of {size} bytes with {sent} sent")
        if size > self.session.max_write:
            raise f.Malformed(f"WRITE of {size} bytes, max_write {self.session.max_write}")
        fd = self.dir.fd(fh)
        done = self._io.writev(fd, c.readable, start, size, _offset(offset))
        return f.WRITE_OUT.pack(done, 0)

    def _release(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, *_ = a.take(f.RELEASE_IN)
        self.dir.release(fh)
        return b""

    def _flush(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, *_ = a.take(f.FLUSH_IN)
        self.dir.flush(fh)
        return b""

    def _fsync(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, flags, _ = a.take(f.FSYNC_IN)
        self.dir.fsync(fh, bool(flags & f.FSYNC_FDATASYNC))
        return b""

    def _fallocate(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, offset, length, mode, _ = a.take(f.FALLOCATE_IN)
        self.dir.fallocate(fh, mode, f.signed64(offset), f.signed64(length))
        return b""

    def _lseek(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, offset, whence, _ = a.take(f.LSEEK_IN)
        return f.LSEEK_OUT.pack(self.dir.lseek(fh, f.signed64(offset), whence))

    def _copy_file_range(self, h: Header, a: f.Args, room: int) -> bytes:
        fh_in, off_in, _, fh_out, off_out, length, flags = a.take(f.COPY_FILE_RANGE_IN)
        done = self.dir.copy_file_range(
            fh_in, f.signed64(off_in), fh_out, f.signed64(off_out), min(length, MAX_COPY), flags
        )
        return f.WRITE_OUT.pack(done, 0)

    # -- directories --

    def _opendir(self, h: Header, a: f.Args, room: int) -> bytes:
        a.take(f.OPEN_IN)
        return f.OPEN_OUT.pack(self.dir.opendir(h.nodeid), 0, 0)

    def _readdir(self, h: Header, a: f.Args, room: int) -> bytes:
        return self._listing(h, a, room, plus=False)

    def _readdirplus(self, h: Header, a: f.Args, room: int) -> bytes:
        return self._listing(h, a, room, plus=True)

    def _listing(self, h: Header, a: f.Args, room: int, plus: bool) -> bytes:
        """Whole records while they fit in the size asked for (and the room); a READDIRPLUS
        entry takes its lookup count only once it is known to fit."""
        fh, offset, size, *_ = a.take(f.READ_IN)
        left = min(size, room, MAX_IO)
        out = bytearray()
        fixed = f.DIRENT.size + (f.ENTRY_OUT.size if plus else 0)  # f.dirent_size, inline
        entries = self.dir.readdir(fh, offset)
        try:
            for ino, next_off, dtype, name in entries:
                need = (fixed + len(name) + 7) & ~7
                if need > left:
                    break
                if plus:
                    out += self._plus_entry(h.nodeid, name)
                out += f.dirent(ino, next_off, dtype, name)
                left -= need
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()
        return bytes(out)

    def _plus_entry(self, parent: int, name: bytes) -> bytes:
        """The entry_out of one READDIRPLUS record; zeroes ("no entry") for "." and ".."
        and for a name that is gone or cannot be looked up now."""
        try:
            found = self.dir.readdirplus_entry(parent, name)
        except OSError as e:
            log.info("fs: READDIRPLUS lookup of %r: %s", name, e)
            found = None
        return f.entry_out(0, None, TTL) if found is None else self._entry(*found)

    def _releasedir(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, *_ = a.take(f.RELEASE_IN)
        self.dir.releasedir(fh)
        return b""

    def _fsyncdir(self, h: Header, a: f.Args, room: int) -> bytes:
        fh, flags, _ = a.take(f.FSYNC_IN)
        self.dir.fsyncdir(fh, bool(flags & f.FSYNC_FDATASYNC))
        return b""

    # -- extended attributes --

    def _getxattr(self, h: Header, a: f.Args, room: int) -> bytes:
        size, _ = a.take(f.GETXATTR_IN)
        return _sized(self.dir.getxattr(h.nodeid, a.name()), size, room)

    def _listxattr(self, h: Header, a: f.Args, room: int) -> bytes:
        size, _ = a.take(f.GETXATTR_IN)
        names = self.dir.listxattr(h.nodeid)
        return _sized(b"".join(n + b"\0" for n in names), size, room)

    def _setxattr(self, h: Header, a: f.Args, room: int) -> bytes:
        size, flags = a.take(f.SETXATTR_IN)
        name = a.name()
        self.dir.setxattr(h.nodeid, name, a.rest(size), flags)
        return b""

    def _removexattr(self, h: Header, a: f.Args, room: int) -> bytes:
        self.dir.removexattr(h.nodeid, a.name())
        return b""

    # -- stop and snapshot --

    def forget_inflight(self, queues: set[int]) -> None:
        """Remember the used lengths of answered chains a stop left in flight."""
        for q in self.queues:
            if q.started and q.index in queues:
                withheld = self._withheld[q.index]
                replied = self._replied[q.index]
                for head in inflight_heads(q):
                    if head in withheld:
                        replied[head] = withheld[head]
                withheld.clear()

    def save_state(self) -> dict:
        return {
            "tag": self.tag,
            "num_request_queues": self.num_request_queues,
            "readonly": self.readonly,
            "session": None if self.session is None else asdict(self.session),
            "replied": {
                str(i): [[h, n] for h, n in sorted(r.items())]
                for i, r in self._replied.items()
                if r
            },
            "dir": self.dir.save(),
        }

    def load_state(self, state: dict) -> None:
        """Refuse a snapshot of another share (tag, queues, ``ro``), check every field,
        then let a new HostDir over the same directory reopen the nodes and handles by
        path and check their identity; only then is anything of this device changed, and
        then all of it: the nodes and handles it held go (a load may come again, as
        ``emu serve --restore-dir`` loads at start and at the first ring start).

        A node whose file was deleted or replaced on the host since the save (or that had
        no path then: an open but unlinked file) cannot be reopened: it and its handles
        are restored stale, and every request on them answers ESTALE, never another
        file's data (``strict_restore`` refuses the snapshot instead). HostDir does not
        refuse a different shared directory in that mode: every node but the root is
        then stale."""
        s = STATE.check(state)
        mine = {"tag": self.tag, "num_request_queues": self.num_request_queues}
        mine["readonly"] = self.readonly
        for key, value in mine.items():
            if s[key] != value:
                raise StateError(f"fs: snapshot has {key} {s[key]!r}, this device {value!r}")
        replied: dict[int, dict[int, int]] = {}
        for key, pairs in s["replied"].items():
            if not (key.isascii() and key.isdigit()) or int(key) >= len(self.queues):
                raise StateError(f"fs state: replied names queue {key!r}")
            heads = {}
            for pair in pairs:
                if len(pair) != 2:
                    raise StateError("fs state: replied entry is not [head, length]")
                head, used = pair
                _persist.in_range(head, 0, self.queue_max_size - 1, "fs replied head")
                _persist.in_range(used, 0, f.OUT_HEADER.size + MAX_IO, "fs replied length")
                heads[head] = used
            replied[int(key)] = heads
        session = None if s["session"] is None else Session(**s["session"])
        fresh = HostDir(self.root, readonly=self.readonly)
        try:
            try:
                fresh.load(s["dir"])
            except HostDirStateError as e:
                if self.strict_restore:
                    raise
                # the rule: a file deleted or replaced meanwhile answers ESTALE
                log.warning("fs: restoring with stale nodes (the guest gets ESTALE): %s", e)
                fresh.load(s["dir"], strict=False)
        except BaseException as e:
            fresh.close()
            if isinstance(e, (ValueError, OSError)):
                raise StateError(f"fs: the shared directory cannot be restored: {e}") from e
            raise
        self.dir.close()
        self.dir = fresh
        self.session = session
        for i in self._replied:
            self._replied[i] = replied.get(i, {})
        self._unchecked = set(replied)


_OPS = frozenset(f.Op)
#: opcode slots counted (FUSE opcodes are small; 0 is none and counts the rest)
_SLOTS = max(f.Op) + 1


def _op_name(op: int) -> str:
    return f.Op(op).name if op in _OPS else "other"


def _offset(value: int) -> int:
    """A READ / WRITE offset: EINVAL when negative as a loff_t (-1 would not be refused
    by preadv2 / pwritev2 but mean "at the fd's own position, and move it")."""
    pos = f.signed64(value)
    if pos < 0:
        raise OSError(errno.EINVAL, f"offset {pos}")
    return pos


def _length(segments: list[tuple[int, int]]) -> int:
    n = 0
    for _, k in segments:
        n += k
    return n


def _ns(sec: int, nsec: int) -> int:
    if nsec >= f.NSEC:
        raise f.Malformed(f"{nsec} nanoseconds")
    return f.signed64(sec) * f.NSEC + nsec


def _sized(value: bytes, size: int, room: int) -> bytes:
    """GETXATTR / LISTXATTR: size 0 asks how long; else the value if it fits in ``size``."""
    if size == 0:
        if room < f.GETXATTR_OUT.size:
            raise f.Malformed(f"{room} bytes of room for the length")
        return f.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > min(size, room):
        raise OSError(errno.ERANGE, "value longer than the buffer")
    return value


# -- the device type: ``fs:DIR[,tag=NAME][,ro][,queues=N][,strict]`` --


def _options(spec: Spec) -> tuple[str, bool, int, bool]:
    opts = spec.options
    tag = opts.get("tag", "emu")
    text = opts.get("queues", "1")
    queues = spec_number(text, 0xFFFE)
    if not queues:
        raise SpecError(f"queues={text[:20]!r}: a number of request queues, 1..65534")
    return tag, spec.switch("ro", False), queues, spec.switch("strict", False)


def _from_spec(spec: Spec, build: Build) -> FsDevice:
    if not spec.arg:
        raise SpecError("the host directory to share")
    tag, ro, queues, strict = _options(spec)
    try:
        return FsDevice(
            spec.arg,
            tag=tag,
            readonly=ro,
            num_request_queues=queues,
            queue_max_size=build.queue_max,
            strict_restore=strict,
        )
    except ValueError as e:
        raise SpecError(str(e)) from e


def _frontend(spec: Spec) -> dict[str, str]:
    """QEMU's vhost-user-fs-device must be told the tag and the request queue count."""
    tag, _, queues, _ = _options(spec)
    props = {"tag": tag}
    if queues > 1:
        props["num-request-queues"] = str(queues)
    return props


register(
    DeviceType(
        FsDevice,
        "fs:DIR[,tag=NAME][,ro][,queues=N][,strict]",
        _from_spec,
        "emu.testing.fs",
        frontend=_frontend,
        options=("tag", "ro", "queues", "strict"),
    )
)
