"""Guest-side virtio-fs: a FUSE client over the reference driver, for tests and the demo.

``FuseClient.connect`` negotiates, sets up the hiprio queue and every request queue, and
sends INIT with the flags Linux 6.1 asks for. Each method builds one request as Linux's
virtio_fs does (in header, each argument and the data in descriptors of their own; the
out header and the reply in two writable ones), waits for the answer and decodes it; an
error reply raises ``FuseReplyError`` with its errno. ``call`` and ``raw`` send what a
test makes up, for malformed requests.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from emu.devices import fuse as f
from emu.devices.fs import FsDevice
from emu.testing.driver import VirtioMmioDriver
from emu.testing.driver_queue import Completion
from emu.testing.inprocess import attached, rings

CFG_NUM_REQUEST_QUEUES = 36
HIPRIO = 0

#: the INIT flags a Linux 6.1 guest sends (fuse_send_init, without DAX)
LINUX_6_1_FLAGS = (
    f.ASYNC_READ
    | f.POSIX_LOCKS
    | f.ATOMIC_O_TRUNC
    | f.EXPORT_SUPPORT
    | f.BIG_WRITES
    | f.DONT_MASK
    | f.FLOCK_LOCKS
    | f.AUTO_INVAL_DATA
    | f.DO_READDIRPLUS
    | f.READDIRPLUS_AUTO
    | f.ASYNC_DIO
    | f.WRITEBACK_CACHE
    | f.PARALLEL_DIROPS
    | f.HANDLE_KILLPRIV
    | f.POSIX_ACL
    | f.MAX_PAGES
    | f.CACHE_SYMLINKS
    | f.HANDLE_KILLPRIV_V2
    | f.SETXATTR_EXT
    | f.INIT_EXT
    | f.SECURITY_CTX
)


class FuseReplyError(OSError):
    """The device answered a request with an error."""


@dataclass
class Attr:
    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int  # the kernel's 32-bit encoding
    blksize: int

    @classmethod
    def decode(cls, data: bytes) -> Attr:
        (ino, size, blocks, at, mt, ct, ans, mns, cns, mode, nlink, uid, gid, rdev, bs, _) = (
            f.ATTR.unpack(data)
        )
        ns = f.NSEC
        return cls(
            ino, size, blocks, at * ns + ans, mt * ns + mns, ct * ns + cns, mode, nlink, uid,
            gid, rdev, bs,
        )  # fmt: skip


@dataclass
class Entry:
    node: int
    generation: int
    entry_valid: int
    attr_valid: int
    attr: Attr

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        node, gen, ev, av, _, _ = f.ENTRY_OUT.unpack_from(data)[:6]
        return cls(node, gen, ev, av, Attr.decode(data[40 : f.ENTRY_OUT.size]))


@dataclass
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None = None  # READDIRPLUS: None where the device gave no entry


def in_header(op: int, nodeid: int, unique: int, arglen: int, length: int | None = None) -> bytes:
    """A fuse_in_header; ``length`` overrides the true in.len (for lying requests)."""
    n = f.IN_HEADER.size + arglen if length is None else length
    return f.IN_HEADER.pack(n, op, unique, nodeid, 0, 0, 0, 0)


def name(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return raw + b"\0"


class FuseClient:
    def __init__(self, drv: VirtioMmioDriver, num_request_queues: int) -> None:
        self.drv = drv
        self.num_request_queues = num_request_queues
        self.queue = 1  # the request queue used unless a call names another
        self.init_reply: tuple | None = None
        self._unique = 0

    @classmethod
    def connect(
        cls,
        drv: VirtioMmioDriver,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = None,
        init: bool = True,
    ) -> FuseClient:
        """Negotiate, set up hiprio and every request queue, DRIVER_OK, then (``init``) INIT."""
        drv.init(packed=packed, event_idx=event_idx, indirect=indirect)
        nq = drv.config_read(CFG_NUM_REQUEST_QUEUES, 4)
        for i in range(1 + nq):
            drv.setup_queue(i, queue_size)
        drv.driver_ok()
        client = cls(drv, nq)
        if init:
            client.init()
        return client

    @property
    def tag(self) -> str:
        raw = bytes(self.drv.config_read(i, 1) for i in range(36))
        return raw.rstrip(b"\0").decode()

    # -- one request --

    def next_unique(self) -> int:
        self._unique += 2  # as Linux: even ids (odd ones are for interrupts)
        return self._unique

    def raw(self, out: list[bytes], in_sizes: list[int], queue: int | None = None) -> Completion:
        """Submit one chain as given and wait for it."""
        q = self.queue if queue is None else queue
        self.drv.submit(q, out, in_sizes)
        (c,) = self.drv.wait(q)
        return c

    def call(
        self,
        op: int,
        nodeid: int = f.ROOT_ID,
        args: list[bytes] | None = None,
        reply: int = 0,
        queue: int | None = None,
    ) -> bytes:
        """One request; the reply body (FuseReplyError for an error reply)."""
        args = [a for a in args or [] if a]
        unique = self.next_unique()
        hdr = in_header(op, nodeid, unique, sum(len(a) for a in args))
        c = self.raw([hdr, *args], [f.OUT_HEADER.size] + ([reply] if reply else []), queue)
        length, error, got = f.OUT_HEADER.unpack_from(c.data)
        if length != c.length or got != unique or length > len(c.data):
            raise AssertionError(f"reply len {length} unique {got} for used {c.length}, {unique}")
        if error:
            raise FuseReplyError(-error, os.strerror(-error))
        return c.data[f.OUT_HEADER.size : length]

    def no_reply(self, op: int, nodeid: int, args: bytes, queue: int = HIPRIO) -> int:
        """FORGET-like requests: no writable part; the used length (0)."""
        c = self.raw([in_header(op, nodeid, self.next_unique(), len(args)) + args], [], queue)
        return c.length

    # -- session --

    def init(self, flags: int = LINUX_6_1_FLAGS, minor: int = f.KERNEL_MINOR) -> tuple:
        """INIT as Linux 6.1 sends it; the decoded fuse_init_out."""
        body = f.INIT_IN.pack(7, minor, 128 << 10, flags & 0xFFFFFFFF, flags >> 32) + bytes(44)
        self.init_reply = f.INIT_OUT.unpack(self.call(f.Op.INIT, args=[body], reply=64))
        return self.init_reply

    def destroy(self) -> None:
        self.call(f.Op.DESTROY)

    # -- names and attributes --

    def lookup(self, parent: int, n: str | bytes) -> Entry:
        return Entry.decode(self.call(f.Op.LOOKUP, parent, [name(n)], f.ENTRY_OUT.size))

    def walk(self, path: str) -> Entry:
        """Lookups from the root along ``path`` (each adds to a node's lookup count)."""
        entry = self.getattr_entry(f.ROOT_ID)
        for part in path.strip("/").split("/"):
            if part:
                entry = self.lookup(entry.node, part)
        return entry

    def getattr_entry(self, node: int) -> Entry:
        return Entry(node, 0, 0, 0, self.getattr(node))

    def forget(self, node: int, nlookup: int) -> int:
        return self.no_reply(f.Op.FORGET, node, f.FORGET_IN.pack(nlookup))

    def batch_forget(self, pairs: list[tuple[int, int]]) -> int:
        body = f.BATCH_FORGET_IN.pack(len(pairs), 0)
        body += b"".join(f.FORGET_ONE.pack(n, k) for n, k in pairs)
        return self.no_reply(f.Op.BATCH_FORGET, 0, body)

    def interrupt(self, unique: int) -> int:
        return self.no_reply(f.Op.INTERRUPT, 0, f.INTERRUPT_IN.pack(unique), queue=self.queue)

    def getattr(self, node: int, fh: int | None = None) -> Attr:
        args = f.GETATTR_IN.pack(f.GETATTR_FH if fh is not None else 0, 0, fh or 0)
        body = self.call(f.Op.GETATTR, node, [args], f.ATTR_OUT.size)
        return Attr.decode(body[16:])

    def setattr(
        self,
        node: int,
        *,
        fh: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
    ) -> Attr:
        valid = 0
        for bit, value in (
            (f.FATTR_FH, fh),
            (f.FATTR_MODE, mode),
            (f.FATTR_UID, uid),
            (f.FATTR_GID, gid),
            (f.FATTR_SIZE, size),
            (f.FATTR_ATIME, atime_ns),
            (f.FATTR_MTIME, mtime_ns),
        ):
            if value is not None:
                valid |= bit
        valid |= (f.FATTR_ATIME_NOW if atime_now else 0) | (f.FATTR_MTIME_NOW if mtime_now else 0)
        at, ans = divmod(atime_ns or 0, f.NSEC)
        mt, mns = divmod(mtime_ns or 0, f.NSEC)
        args = f.SETATTR_IN.pack(
            valid, 0, fh or 0, size or 0, 0, at, mt, 0, ans, mns, 0, mode or 0, 0, uid or 0,
            gid or 0, 0,
        )  # fmt: skip
        return Attr.decode(self.call(f.Op.SETATTR, node, [args], f.ATTR_OUT.size)[16:])

    def readlink(self, node: int, size: int = 4095) -> bytes:
        return self.call(f.Op.READLINK, node, reply=size)

    def symlink(self, parent: int, n: str | bytes, target: str | bytes) -> Entry:
        body = self.call(f.Op.SYMLINK, parent, [name(n), name(target)], f.ENTRY_OUT.size)
        return Entry.decode(body)

    def mknod(self, parent: int, n: str | bytes, mode: int, rdev: int = 0) -> Entry:
        args = [f.MKNOD_IN.pack(mode, rdev, 0, 0), name(n)]
        return Entry.decode(self.call(f.Op.MKNOD, parent, args, f.ENTRY_OUT.size))

    def mkdir(self, parent: int, n: str | bytes, mode: int = 0o755) -> Entry:
        args = [f.MKDIR_IN.pack(mode, 0), name(n)]
        return Entry.decode(self.call(f.Op.MKDIR, parent, args, f.ENTRY_OUT.size))

    def unlink(self, parent: int, n: str | bytes) -> None:
        self.call(f.Op.UNLINK, parent, [name(n)])

    def rmdir(self, parent: int, n: str | bytes) -> None:
        self.call(f.Op.RMDIR, parent, [name(n)])

    def rename(
        self, parent: int, old: str | bytes, newparent: int, new: str | bytes, flags: int = 0
    ) -> None:
        """RENAME without flags (as Linux sends a plain rename), else RENAME2."""
        if flags:
            self.call(
                f.Op.RENAME2, parent, [f.RENAME2_IN.pack(newparent, flags, 0), name(old), name(new)]
            )
        else:
            self.call(f.Op.RENAME, parent, [f.RENAME_IN.pack(newparent), name(old), name(new)])

    def link(self, node: int, newparent: int, n: str | bytes) -> Entry:
        args = [f.LINK_IN.pack(node), name(n)]
        return Entry.decode(self.call(f.Op.LINK, newparent, args, f.ENTRY_OUT.size))

    def access(self, node: int, mask: int) -> None:
        self.call(f.Op.ACCESS, node, [f.ACCESS_IN.pack(mask, 0)])

    def statfs(self, node: int = f.ROOT_ID) -> tuple:
        return f.STATFS_OUT.unpack(self.call(f.Op.STATFS, node, reply=f.STATFS_OUT.size))

    # -- files --

    def open(self, node: int, flags: int = os.O_RDONLY) -> int:
        body = self.call(f.Op.OPEN, node, [f.OPEN_IN.pack(flags, 0)], f.OPEN_OUT.size)
        return f.OPEN_OUT.unpack(body)[0]

    def create(
        self, parent: int, n: str | bytes, mode: int = 0o644, flags: int = os.O_RDWR
    ) -> tuple[Entry, int]:
        args = [f.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0, 0), name(n)]
        body = self.call(f.Op.CREATE, parent, args, f.ENTRY_OUT.size + f.OPEN_OUT.size)
        return Entry.decode(body), f.OPEN_OUT.unpack_from(body, f.ENTRY_OUT.size)[0]

    def read(self, node: int, fh: int, offset: int, size: int) -> bytes:
        args = f.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.call(f.Op.READ, node, [args], size)

    def write(self, node: int, fh: int, offset: int, data: bytes) -> int:
        args = f.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0)
        body = self.call(f.Op.WRITE, node, [args, data], f.WRITE_OUT.size)
        return f.WRITE_OUT.unpack(body)[0]

    def release(self, node: int, fh: int) -> None:
        self.call(f.Op.RELEASE, node, [f.RELEASE_IN.pack(fh, 0, 0, 0)])

    def flush(self, node: int, fh: int) -> None:
        self.call(f.Op.FLUSH, node, [f.FLUSH_IN.pack(fh, 0, 0, 0)])

    def fsync(self, node: int, fh: int, datasync: bool = False) -> None:
        self.call(f.Op.FSYNC, node, [f.FSYNC_IN.pack(fh, int(datasync), 0)])

    def fallocate(self, node: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        self.call(f.Op.FALLOCATE, node, [f.FALLOCATE_IN.pack(fh, offset, length, mode, 0)])

    def lseek(self, node: int, fh: int, offset: int, whence: int) -> int:
        args = [f.LSEEK_IN.pack(fh, offset, whence, 0)]
        return f.LSEEK_OUT.unpack(self.call(f.Op.LSEEK, node, args, f.LSEEK_OUT.size))[0]

    def copy_file_range(
        self, node_in: int, fh_in: int, off_in: int, node_out: int, fh_out: int, off_out: int,
        length: int, flags: int = 0,
    ) -> int:  # fmt: skip
        args = f.COPY_FILE_RANGE_IN.pack(fh_in, off_in, node_out, fh_out, off_out, length, flags)
        body = self.call(f.Op.COPY_FILE_RANGE, node_in, [args], f.WRITE_OUT.size)
        return f.WRITE_OUT.unpack(body)[0]

    # -- directories --

    def opendir(self, node: int) -> int:
        body = self.call(f.Op.OPENDIR, node, [f.OPEN_IN.pack(os.O_RDONLY, 0)], f.OPEN_OUT.size)
        return f.OPEN_OUT.unpack(body)[0]

    def readdir(
        self, node: int, fh: int, offset: int = 0, size: int = 4096, plus: bool = False
    ) -> list[Dirent]:
        op = f.Op.READDIRPLUS if plus else f.Op.READDIR
        body = self.call(op, node, [f.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)], size)
        return parse_dirents(body, plus)

    def listdir(self, node: int, plus: bool = False, size: int = 4096) -> list[Dirent]:
        """Every entry of a directory: OPENDIR, READDIR(PLUS) until empty, RELEASEDIR."""
        fh = self.opendir(node)
        out: list[Dirent] = []
        while batch := self.readdir(node, fh, out[-1].off if out else 0, size, plus):
            out += batch
        self.releasedir(node, fh)
        return out

    def releasedir(self, node: int, fh: int) -> None:
        self.call(f.Op.RELEASEDIR, node, [f.RELEASE_IN.pack(fh, 0, 0, 0)])

    def fsyncdir(self, node: int, fh: int, datasync: bool = False) -> None:
        self.call(f.Op.FSYNCDIR, node, [f.FSYNC_IN.pack(fh, int(datasync), 0)])

    # -- extended attributes --

    def getxattr(self, node: int, n: str | bytes, size: int = 4096) -> bytes | int:
        """The value; with ``size`` 0 its length."""
        args = [f.GETXATTR_IN.pack(size, 0), name(n)]
        body = self.call(f.Op.GETXATTR, node, args, size or f.GETXATTR_OUT.size)
        return f.GETXATTR_OUT.unpack(body)[0] if size == 0 else body

    def listxattr(self, node: int, size: int = 4096) -> list[bytes] | int:
        """The names; with ``size`` 0 the length of the list."""
        args = [f.GETXATTR_IN.pack(size, 0)]
        body = self.call(f.Op.LISTXATTR, node, args, size or f.GETXATTR_OUT.size)
        return f.GETXATTR_OUT.unpack(body)[0] if size == 0 else body.split(b"\0")[:-1]

    def setxattr(self, node: int, n: str | bytes, value: bytes, flags: int = 0) -> None:
        self.call(f.Op.SETXATTR, node, [f.SETXATTR_IN.pack(len(value), flags), name(n), value])

    def removexattr(self, node: int, n: str | bytes) -> None:
        self.call(f.Op.REMOVEXATTR, node, [name(n)])


def parse_dirents(body: bytes, plus: bool = False) -> list[Dirent]:
    out: list[Dirent] = []
    pos = 0
    while pos < len(body):
        entry = None
        if plus:
            entry = Entry.decode(body[pos : pos + f.ENTRY_OUT.size])
            pos += f.ENTRY_OUT.size
            if entry.node == 0:
                entry = None
        ino, off, namelen, dtype = f.DIRENT.unpack_from(body, pos)
        raw = body[pos + f.DIRENT.size : pos + f.DIRENT.size + namelen]
        out.append(Dirent(ino, off, dtype, raw, entry))
        pos += f.dirent_size(raw)
    return out


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process fs``: mount a temporary directory, write a file through
    FUSE, read it back, list the directory, compare with what the host sees."""
    with tempfile.TemporaryDirectory() as tmp:
        (open(os.path.join(tmp, "hello.txt"), "wb")).close()
        with attached(FsDevice(tmp, tag="demo")) as drv:
            fs = FuseClient.connect(drv, **opts)
            minor, flags = fs.init_reply[1], fs.init_reply[3]
            say(
                f"fs: tag {fs.tag!r}, FUSE 7.{minor}, flags {flags:#x}, rings {rings(drv.features)}"
            )
            data = bytes(range(256)) * 256  # 64 KiB
            entry, fh = fs.create(f.ROOT_ID, "data.bin")
            fs.write(entry.node, fh, 0, data)
            back = fs.read(entry.node, fh, 0, len(data))
            fs.release(entry.node, fh)
            with open(os.path.join(tmp, "data.bin"), "rb") as host:
                on_host = host.read()
            names = sorted(d.name.decode() for d in fs.listdir(f.ROOT_ID, plus=True))
            same = "matches" if on_host == data == back else "DIFFERS"
            say(
                f"fs: wrote 64 KiB to data.bin (crc32 {zlib.crc32(data):08x}), read back "
                f"crc32 {zlib.crc32(back):08x}, host file {same}"
            )
            say(f"fs: the guest lists {names}, the host {sorted(['.', '..', *os.listdir(tmp)])}")
