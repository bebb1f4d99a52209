"""The FUSE wire format as Linux 6.1 speaks it (protocol 7.37): opcodes, flags, the
structs of requests and replies, and the two directions of byte handling a device needs.

Layouts follow the kernel's UAPI header ``include/uapi/linux/fuse.h`` of v6.1 (all
little-endian on the guests emu serves, every struct padded to 8 bytes). Only what a
virtio-fs device answers is here: no CUSE, no DAX mappings, no locks, no ioctl, no poll.

Decoding trusts nothing: ``Args`` hands out a request's argument bytes front to back and
raises ``Malformed`` (an ``OSError`` with EINVAL, so the device answers it like any
other error) when a struct is cut short or a name has no NUL. Encoding turns
``os.stat_result`` / ``os.statvfs_result`` into the kernel's structs.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from enum import IntEnum

#: the protocol this module speaks (major.minor); a guest's lower minor wins
KERNEL_VERSION = 7
KERNEL_MINOR = 37
#: the oldest minor served: 7.31 is the first with virtio-fs (Linux 5.4)
MIN_MINOR = 31

ROOT_ID = 1


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


#: requests the kernel sends without expecting an answer (virtio-fs: no writable part)
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})

# -- INIT flags (fuse_init_in/out.flags; bits 32.. go in flags2 with INIT_EXT) --
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33

# -- SETATTR valid bits --
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FSYNC_FDATASYNC = 1 << 0
GETATTR_FH = 1 << 0
RELEASE_FLUSH = 1 << 0

# -- structs: the fixed parts of requests and replies --
IN_HEADER = struct.Struct("<IIQQIIII")  # len opcode unique nodeid uid gid pid padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # 128
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # 104
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
LSEEK_OUT = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs, 80
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name, padded to 8
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (then 44 unused)
INIT_IN_OLD = struct.Struct("<IIII")  # what a kernel before 7.36 sends
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes

FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("<II")  # size flags (the short form: SETXATTR_EXT not offered)
GETXATTR_IN = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
INTERRUPT_IN = struct.Struct("<Q")  # unique
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags

NAME_MAX = 255
NSEC = 1_000_000_000
_U64 = (1 << 64) - 1
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)


class Malformed(OSError):
    """A request whose bytes do not hold what its opcode needs (answered EINVAL)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EINVAL, why)


def signed64(value: int) -> int:
    """A u64 field that the kernel fills from a signed loff_t."""
    return value - (1 << 64) if value >= 1 << 63 else value


class Args:
    """A request's argument bytes (after the in header), taken front to back."""

    __slots__ = ("_data", "_off")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._off = 0

    @property
    def left(self) -> int:
        return len(self._data) - self._off

    def take(self, st: struct.Struct) -> tuple:
        if len(self._data) - self._off < st.size:  # (self.left, inline: once per request)
            raise Malformed(f"argument of {st.size} bytes, {self.left} left")
        values = st.unpack_from(self._data, self._off)
        self._off += st.size
        return values

    def name(self) -> bytes:
        """The next NUL-terminated string, without its NUL (the kernel ends names with one)."""
        end = self._data.find(b"\0", self._off)
        if end < 0:
            raise Malformed("name without a terminating NUL")
        name = self._data[self._off : end]
        self._off = end + 1
        return name

    def rest(self, n: int) -> bytes:
        """Exactly ``n`` more bytes (an xattr value)."""
        if self.left < n:
            raise Malformed(f"{n} bytes of value, {self.left} left")
        value = self._data[self._off : self._off + n]
        self._off += n
        return value


# -- encoding replies --


def encode_dev(rdev: int) -> int:
    """A host dev_t as the kernel's 32-bit "new" encoding (fuse_attr.rdev, mknod_in.rdev)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12) & 0xFFFFFFFF


def decode_dev(value: int) -> int:
    """The kernel's 32-bit device number as a host dev_t."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | (value >> 12 & 0xFFF00)
    return os.makedev(major, minor)


def _attr_fields(st: os.stat_result) -> tuple:
    """fuse_attr's fields of ``st`` (on every LOOKUP, GETATTR and CREATE: kept flat)."""
    asec, ansec = divmod(st.st_atime_ns, NSEC)
    msec, mnsec = divmod(st.st_mtime_ns, NSEC)
    csec, cnsec = divmod(st.st_ctime_ns, NSEC)
    mode = st.st_mode
    return (
        st.st_ino,
        st.st_size,
        st.st_blocks,
        asec & _U64,
        msec & _U64,
        csec & _U64,
        ansec,
        mnsec,
        cnsec,
        mode,
        min(st.st_nlink, 0xFFFFFFFF),
        st.st_uid,
        st.st_gid,
        encode_dev(st.st_rdev) if stat.S_IFMT(mode) in _DEVICES else 0,
        st.st_blksize,
        0,  # flags: no submounts, no DAX
    )


def entry_out(node: int, st: os.stat_result | None, valid_s: int) -> bytes:
    """fuse_entry_out; ``node`` 0 with ``st`` None: "no entry given" (READDIRPLUS)."""
    if st is None:
        return bytes(ENTRY_OUT.size)
    return ENTRY_OUT.pack(node, 0, valid_s, valid_s, 0, 0, *_attr_fields(st))


def attr_out(st: os.stat_result, valid_s: int) -> bytes:
    return ATTR_OUT.pack(valid_s, 0, 0, *_attr_fields(st))


def statfs_out(v: os.statvfs_result) -> bytes:
    return STATFS_OUT.pack(
        v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax,
        v.f_frsize, 0,
    )  # fmt: skip


def dirent_size(name: bytes, plus: bool = False) -> int:
    """Bytes one READDIR (or READDIRPLUS) record of ``name`` takes, padding included."""
    n = DIRENT.size + len(name) + (ENTRY_OUT.size if plus else 0)
    return (n + 7) & ~7


def dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + bytes(-len(rec) % 8)
