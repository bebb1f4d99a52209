"""One host directory shared with a guest, in FUSE terms: node ids, lookup counts, handles.

virtio-fs passes a guest's file system calls through to a host directory. The guest is
hostile and the directory is the sandbox, so nothing here ever resolves a path the guest
wrote: every node (a host inode the guest looked up) holds an ``O_PATH | O_NOFOLLOW`` fd,
and every call is an ``*at`` call on a node's fd with one checked name component, or acts
on the node's own inode through ``/proc/self/fd/N``. The device (emu/devices/fs.py) speaks
FUSE and maps every ``OSError`` raised here to ``-errno`` for the guest.

Sandbox decisions
- Names are bytes. Empty, containing ``/`` or NUL: EINVAL; longer than NAME_MAX (255):
  ENAMETOOLONG. ``.`` and ``..`` are accepted only by ``lookup`` (and
  ``readdirplus_entry``); every call that creates, removes or renames an entry refuses
  them with EINVAL.
- ``..`` at ROOT is ROOT. Below ROOT it is the host parent, taken only after walking up
  from it on the host meets ROOT (else EACCES): a directory moved out of the tree on the
  host cannot lead the guest further out.
- Host symlinks are never followed: lookups open the link itself (a node of type
  symlink); open of a symlink node is ELOOP, and a lookup under it is ENOTDIR.
- Only regular files are opened for I/O (EISDIR for a directory, ENXIO for FIFOs,
  sockets and devices): a Linux guest serves special files itself, and a host open
  could block (FIFO) or reach a host device. Those opens are non-blocking, so a host
  process's lease on the file (F_SETLEASE) answers EAGAIN rather than holding the
  device thread until the lease breaks.
- No host device nodes: mknod of a character or block device is EPERM (a device node
  the guest made would open a host device for any host user who can reach the tree),
  and so is RENAME_WHITEOUT (EINVAL: it makes one). For the same reason no set-user-ID
  files, nor set-group-ID ones but directories (where it only passes the group on):
  the device's files belong to its own user (root, often), so such a file would run
  as that user for whoever starts it. A mode adding those bits (CREATE, MKNOD,
  SETATTR) is EPERM; bits the host gave a file stay through a chmod.
- xattrs are read and listed in every namespace but written (set / remove) only in
  ``user.``: EPERM for the others, whose values the host acts on (``security.capability``
  grants capabilities, ``trusted.*``, ACLs).
- Unknown node ids, and node ids whose inode could not be reopened after a restore:
  ESTALE. Unknown file handles, or a handle of the wrong kind (a directory handle for a
  file call and back): EBADF.
- At most ``max_nodes`` nodes and ``max_handles`` handles at once (ENFILE beyond), so a
  guest cannot exhaust the host's fds: a node holds one fd, a file handle one, a
  directory handle two while it is being listed. Whatever those bounds, no fd is kept
  at a number within the top eighth of RLIMIT_NOFILE (at least ``FD_RESERVE``): ENFILE
  there too, so the rest of the process (other devices, vhost-user's memory and
  eventfds, state files) always has fds, however low the limit and however many
  HostDirs share it.
- FALLOCATE that would allocate more than the file system has free is ENOSPC before the
  host is asked: ext4 allocates until the disk is full and keeps what it got (past EOF,
  with KEEP_SIZE, where the file's size does not show it).
- ``readonly``: every call that would change the tree or a file raises EROFS.
- Open flags: only the access mode, O_APPEND, O_TRUNC, O_SYNC, O_DSYNC, O_NOATIME and
  O_NONBLOCK reach the host. The rest is dropped: O_DIRECT as the C virtiofsd does by
  default (tmpfs refuses it, and the alignment it demands is the guest's business),
  O_PATH / O_DIRECTORY / O_TMPFILE because they would change what the fd is.
- ``access`` is faccessat(AT_EACCESS) as this process (root here: R_OK and W_OK always
  pass, X_OK needs some x bit), EROFS for W_OK when read-only. A Linux virtio-fs guest
  mounts with default_permissions and checks the mode bits itself, so it never asks.

What a held node still does: a node keeps its inode, so a directory a host user moves
out of the tree stays reachable through a node the guest already holds (as with the C
virtiofsd). The guest itself cannot move anything out: every target is a node of this
tree.

Credentials: the device runs as one host user and does not switch to the guest's
uid/gid (no setfsuid); files it creates belong to that user. Modes are the guest's: the
guest kernel applied its umask before sending, so bits the host umask removed are put
back.

State (``save`` / ``load``): per node its path relative to ROOT, its identity
((st_dev, st_ino) and the name_to_handle_at file handle, which carries the inode's
generation, so a new file that got a deleted one's inode number is told apart) and its
lookup count; per handle its node, open flags and kind. ``load`` reopens each node by
path, one component at a time from ROOT (no symlink followed, no ``..``), and checks its
identity. An open but unlinked file cannot be reopened by path: it is saved without one
and ``load`` refuses it, as it refuses a node whose path is gone or holds another inode
now; with ``strict=False`` such nodes and their handles come back stale instead, and
every call on them answers ESTALE (never another file's data). The directory must be the
same one (a copy elsewhere has other inodes).

Not thread-safe: one device thread calls it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import stat
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from emu.state.format import StateError

ROOT = 1
NAME_MAX = 255
#: default bounds on what one guest can hold open at once (ENFILE beyond)
MAX_NODES = 16384
MAX_HANDLES = 1024

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: added to every open of a regular file for I/O: a host process's lease on it then
#: answers EAGAIN at once instead of holding the device thread for the lease break
#: (lease-break-time, 45 s by default); local file I/O ignores the flag otherwise
_IO = os.O_NONBLOCK | os.O_CLOEXEC
#: open flags a guest may pass through (access mode and flags with a file meaning only)
_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_NONBLOCK
)
#: how far ``..`` may walk up looking for ROOT before giving up
_MAX_DEPTH = 4096
_DOTS = (b".", b"..")
#: byte values a name may not hold, tested as ints: ``b"/" in name`` makes bytes try the
#: operand as an int first and format a TypeError it then drops, on every lookup
_SLASH, _NUL = ord("/"), 0
_OFF_MAX = (1 << 63) - 1
#: the most one read/write/copy moves in Linux (MAX_RW_COUNT)
_RW_MAX = 0x7FFFF000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
#: the only xattr namespace a guest may write: others carry host meaning (file
#: capabilities in security.capability, trusted.*, ACLs the host enforces)
_XATTR_WRITABLE = b"user."
#: every fallocate mode Linux 6.1 knows (KEEP_SIZE .. UNSHARE_RANGE)
_FALLOC_MODES = 0x7F
#: modes that free or move blocks (PUNCH_HOLE, COLLAPSE_RANGE, INSERT_RANGE); the rest
#: allocate up to ``length`` bytes
_FALLOC_NO_ALLOC = 0x02 | 0x08 | 0x20
#: fd numbers at the top of RLIMIT_NOFILE left to the rest of the process (at least
#: this many, or an eighth of the limit)
FD_RESERVE = 256
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_MAX_HANDLE_SZ = 128

Key = tuple[int, int]
#: the shape of ``save``'s dict (a change of shape is a new version)
STATE_VERSION = 1
_PATH_MAX = 4096
#: JSON characters ``save`` spends on paths at most (a byte that is not UTF-8 takes six):
#: the device part and the whole state file each take at most 64 MiB
_PATHS_BUDGET = 32 << 20
_U64 = (1 << 64) - 1
#: node ids and handles in a state stay well inside FUSE's u64
_ID_MAX = (1 << 63) - 1

# ctypes only where the os module has no equivalent: renameat2 (flags), fallocate
# (modes), utimensat / futimens with UTIME_NOW / UTIME_OMIT (os.utime always sets both
# times itself), name_to_handle_at
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_futimens = _libc.futimens
_futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ),
    ]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_FileHandle),
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]


_statx = _libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_STATX_BTIME = 0x800
_STATX = struct.Struct("<I76xqI")  # stx_mask ... stx_btime (tv_sec, tv_nsec) at offset 80


class HostDirStateError(StateError, ValueError):
    """A saved state this directory cannot take back (names the node or handle)."""


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def _check_name(name: bytes) -> None:
    """One path component the host may resolve: no separator, no NUL, not too long."""
    if not isinstance(name, bytes):
        raise TypeError(f"names are bytes, not {type(name).__name__}")
    if not name or _SLASH in name or _NUL in name:
        raise _error(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise _error(errno.ENAMETOOLONG)


def _libc_check(ret: int) -> None:
    if ret != 0:
        raise _error(ctypes.get_errno())


def _check_off(value: int, low: int = 0) -> int:
    """A guest's offset or size for a 64-bit signed host argument (EINVAL outside)."""
    if not low <= value <= _OFF_MAX:
        raise _error(errno.EINVAL)
    return value


def _fd_ceiling() -> int:
    """The fd number HostDir keeps no fd at or above (read each time: the limit may move)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    return soft - max(FD_RESERVE, soft // 8)


def _kept(fd: int, fds: int = 1) -> None:
    """ENFILE unless ``fd``, just opened, leaves room for ``fds`` fds below the ceiling:
    an open takes the lowest free number, so this is ``_fd_room``'s check made after an
    open that changed nothing on the host, without its probe (the caller closes ``fd``)."""
    if fd + fds > _fd_ceiling():
        raise _error(errno.ENFILE)


def _check_mode(kind: int, mode: int) -> None:
    """EPERM for a mode with set-user-ID, or set-group-ID on anything but a directory."""
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and kind != stat.S_IFDIR):
        raise _error(errno.EPERM)


def _timespec(ns: int | None, now: bool) -> tuple[int, int]:
    if now:
        return 0, _UTIME_NOW
    if ns is None:
        return 0, _UTIME_OMIT
    sec, nsec = divmod(ns, 1_000_000_000)
    _check_off(sec, -_OFF_MAX - 1)
    return sec, nsec


def _file_handle(fd: int) -> str | None:
    """The kernel's export handle of ``fd``'s inode, as hex (None if the file system has
    none). It holds the inode's generation, so unlike (st_dev, st_ino) it tells a file
    from a new one that got the same inode number after the first was deleted."""
    fh = _FileHandle(handle_bytes=_MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), _AT_EMPTY_PATH):
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.EOVERFLOW):
            return None
        raise _error(code)
    raw = fh.handle_type.to_bytes(4, "little", signed=True) + bytes(fh.f_handle)
    return raw[: 4 + fh.handle_bytes].hex()


def _birth_ns(fd: int) -> int | None:
    """The birth time of ``fd``'s inode in ns (None if the file system keeps none).

    Where there is no file handle, it tells a new file from a deleted one whose inode
    number it got (ext4 hands a freed number out again at once); unlike ctime it never
    changes while the inode lives."""
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_BTIME, buf):
        raise _error(ctypes.get_errno())
    mask, sec, nsec = _STATX.unpack_from(buf)
    return sec * 1_000_000_000 + nsec if mask & _STATX_BTIME else None


def _check_xattr_name(name: bytes) -> None:
    if not isinstance(name, bytes):
        raise TypeError(f"xattr names are bytes, not {type(name).__name__}")
    if _NUL in name:
        raise _error(errno.EINVAL)
    if not name or len(name) > NAME_MAX:  # the kernel's XATTR_NAME_MAX answer
        raise _error(errno.ERANGE)


def _check_entry(name: bytes) -> None:
    """A name to create, remove or rename: a component, and not ``.`` or ``..``."""
    _check_name(name)
    if name in _DOTS:
        raise _error(errno.EINVAL)


def _dtype(entry: os.DirEntry) -> int:
    """The d_type of a listed entry (DT_* is the S_IFMT value shifted down by 12)."""
    try:
        if entry.is_symlink():
            return stat.S_IFLNK >> 12
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR >> 12
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG >> 12
        return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
    except OSError:  # gone meanwhile: DT_UNKNOWN, the kernel then asks
        return 0


class _Node:
    """A host inode the guest holds: its O_PATH fd (-1: stale after a restore)."""

    __slots__ = ("fd", "key", "kind", "nlookup", "nopen")

    def __init__(self, fd: int, key: Key, kind: int) -> None:
        self.fd = fd
        self.key = key
        self.kind = kind  # S_IFMT bits: an inode's type never changes
        self.nlookup = 0
        self.nopen = 0  # handles on it: the node outlives its last FORGET until they close


class _DirScan:
    """A directory listing read lazily, with offsets stable while the directory is.

    Entry ``i`` of the listing has offset ``i``. The kernel asks again from the offset
    after the last entry it kept, so entries read but not yet kept stay in ``window``;
    an earlier offset, or a rewind to the start, reads the directory afresh.
    """

    __slots__ = ("it", "base", "window")

    def __init__(self) -> None:
        self.it: Iterator[os.DirEntry] | None = None
        self.base = 0  # index of window[0]
        self.window: list[tuple[int, int, bytes]] = []

    def close(self) -> None:
        if self.it is not None:
            self.it.close()  # type: ignore[attr-defined]
            self.it = None

    def _restart(self, fd: int) -> None:
        self.close()
        os.lseek(fd, 0, os.SEEK_SET)  # scandir dups fd: the position is shared
        self.it = os.scandir(fd)
        self.base = 0
        self.window = []

    def _read(self) -> tuple[int, int, bytes] | None:
        assert self.it is not None
        entry = next(self.it, None)
        if entry is None:
            return None
        got = (entry.inode(), _dtype(entry), os.fsencode(entry.name))
        self.window.append(got)
        return got

    def entries(self, fd: int, start: int, rewind: bool) -> Iterator[tuple[int, int, int, bytes]]:
        """(index, ino, d_type, name) from entry ``start`` on; ``rewind`` reads afresh."""
        if rewind or self.it is None or start < self.base:
            self._restart(fd)
        kept = min(start - self.base, len(self.window))
        del self.window[:kept]
        self.base += kept
        while self.base < start:  # a seek past what was read: read and drop
            if self._read() is None:
                return
            self.window.clear()
            self.base += 1
        index = start
        while True:
            at = index - self.base
            got = self.window[at] if at < len(self.window) else self._read()
            if got is None:
                return
            yield (index, *got)
            index += 1


class _Handle:
    """An open file or directory (fd -1: stale after a restore)."""

    __slots__ = ("fd", "node", "flags", "scan")

    def __init__(self, fd: int, node: int, flags: int, scan: _DirScan | None) -> None:
        self.fd = fd
        self.node = node
        self.flags = flags  # as reopened after a restore (no O_TRUNC)
        self.scan = scan  # None for a file

    def close(self) -> None:
        if self.scan is not None:
            self.scan.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostDir:
    """The shared directory ``root`` as FUSE sees it (see the module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        readonly: bool = False,
        max_nodes: int = MAX_NODES,
        max_handles: int = MAX_HANDLES,
    ) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise RuntimeError("HostDir reopens nodes through /proc/self/fd: mount /proc")
        self.readonly = readonly
        self.max_nodes = max_nodes
        self.max_handles = max_handles
        # the operator names the tree: a symlink in that path is theirs to follow
        fd = os.open(root, _DIR_PATH)
        st = os.fstat(fd)
        root_node = _Node(fd, _key(st), stat.S_IFDIR)
        root_node.nlookup = 1
        self._nodes: dict[int, _Node] = {ROOT: root_node}
        self._inodes: dict[Key, int] = {root_node.key: ROOT}
        self._handles: dict[int, _Handle] = {}
        self._next_node = ROOT + 1
        self._next_fh = 1

    def close(self) -> None:
        """Close every fd held; every later call fails (ESTALE / EBADF)."""
        for h in self._handles.values():
            h.close()
        for n in self._nodes.values():
            if n.fd >= 0:
                os.close(n.fd)
        self._handles.clear()
        self._nodes.clear()
        self._inodes.clear()

    # -- tables -------------------------------------------------------------------------

    def _node(self, node: int) -> _Node:
        n = self._nodes.get(node)
        if n is None or n.fd < 0:
            raise _error(errno.ESTALE)
        return n

    def _dir(self, node: int) -> _Node:
        n = self._node(node)
        if n.kind != stat.S_IFDIR:
            raise _error(errno.ENOTDIR)
        return n

    def _handle(self, fh: int, *, directory: bool) -> _Handle:
        h = self._handles.get(fh)
        if h is None or (h.scan is not None) != directory:
            raise _error(errno.EBADF)
        if h.fd < 0:
            raise _error(errno.ESTALE)
        return h

    def _writable(self) -> None:
        if self.readonly:
            raise _error(errno.EROFS)

    def _add(self, fd: int, st: os.stat_result | None = None) -> tuple[int, os.stat_result]:
        """The node of the inode ``fd`` holds (taking ``fd``), one lookup more; ``st``:
        that inode's fstat, when the caller has it already."""
        try:
            if st is None:
                st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)  # _key(st), inline: every lookup comes here
            node = self._inodes.get(key)
            if node is None:
                self._node_count()
                _kept(fd)
                node = self._next_node
                self._next_node += 1
                self._nodes[node] = _Node(fd, key, stat.S_IFMT(st.st_mode))
                self._inodes[key] = node
                fd = -1  # the node owns it now
            self._nodes[node].nlookup += 1
            return node, st
        finally:
            if fd >= 0:
                os.close(fd)

    def _drop_if_unused(self, node: int) -> None:
        n = self._nodes[node]
        if node == ROOT or n.nlookup > 0 or n.nopen > 0:
            return
        del self._nodes[node]
        if self._inodes.get(n.key) == node:
            del self._inodes[n.key]
        if n.fd >= 0:
            os.close(n.fd)

    def _new_handle(self, fd: int, node: int, flags: int, scan: _DirScan | None) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, node, flags, scan)
        self._nodes[node].nopen += 1
        return fh

    def _handle_of(self, node: int, fh: int) -> _Handle:
        """A handle of either kind that must belong to ``node``."""
        h = self._handles.get(fh)
        if h is None or h.node != node:
            raise _error(errno.EBADF)
        if h.fd < 0:
            raise _error(errno.ESTALE)
        return h

    def _node_count(self) -> None:
        if len(self._nodes) >= self.max_nodes:
            raise _error(errno.ENFILE)

    def _handle_count(self) -> None:
        if len(self._handles) >= self.max_handles:
            raise _error(errno.ENFILE)

    def _node_room(self) -> None:
        """Room for a node whose entry is about to be made: checked before it is."""
        self._node_count()
        self._fd_room(1)

    def _fd_room(self, fds: int) -> None:
        """ENFILE unless ``fds`` more fds fit below ``_fd_ceiling``: new fds take the
        lowest free numbers, so the top of the range stays free for the rest of the
        process (other devices, the vhost-user fds, a state file), whatever else it has
        open and however many HostDirs it runs. A probe (two syscalls): only before a
        call that makes something on the host; an fd merely opened is checked after
        (``_kept``)."""
        probe = os.dup(self._nodes[ROOT].fd)  # the lowest free fd number
        os.close(probe)
        if probe + fds > _fd_ceiling():
            raise _error(errno.ENFILE)

    def _inside(self, fd: int) -> bool:
        """Whether ROOT is the directory ``fd`` or one of its ancestors on the host."""
        root = self._nodes[ROOT].key
        cur = os.open(b".", _DIR_PATH, dir_fd=fd)  # an fd of its own for the walk
        try:
            key = _key(os.fstat(cur))
            for _ in range(_MAX_DEPTH):
                if key == root:
                    return True
                up = os.open(b"..", _DIR_PATH, dir_fd=cur)
                os.close(cur)
                cur = up
                up_key = _key(os.fstat(cur))
                if up_key == key:  # the host's "/": nowhere further up
                    return False
                key = up_key
            return False
        finally:
            os.close(cur)

    @staticmethod
    def _proc(n: _Node) -> str:
        """The node's own inode as a path (a magic link: never resolves a name)."""
        return f"/proc/self/fd/{n.fd}"

    def _fix_mode(self, node: int, st: os.stat_result, mode: int) -> os.stat_result:
        """Put back permission bits the host umask took from a new entry."""
        missing = mode & 0o777 & ~st.st_mode
        if not missing:
            return st
        n = self._nodes[node]
        os.chmod(self._proc(n), (st.st_mode & 0o7777) | missing)
        return os.fstat(n.fd)

    # -- nodes --------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """The entry ``name`` of directory ``parent`` (a symlink is the link itself)."""
        p = self._node(parent)
        if name in _DOTS:
            if p.kind != stat.S_IFDIR:
                raise _error(errno.ENOTDIR)
            if name == b"." or parent == ROOT:
                p.nlookup += 1
                return parent, os.fstat(p.fd)
            fd = os.open(b"..", _DIR_PATH, dir_fd=p.fd)
            try:
                inside = self._inside(fd)
            except OSError:
                os.close(fd)
                raise
            if not inside:
                os.close(fd)
                raise _error(errno.EACCES)
            return self._add(fd)
        _check_name(name)
        return self._add(os.open(name, _PATH, dir_fd=p.fd))

    def readdirplus_entry(self, parent: int, name: bytes) -> tuple[int, os.stat_result] | None:
        """A lookup for READDIRPLUS: None for ``.``/``..`` and for an entry gone meanwhile.
        (``lookup``'s steps for a name, inline: this runs for every entry listed.)"""
        p = self._node(parent)
        if name in _DOTS:
            return None
        _check_name(name)
        try:
            fd = os.open(name, _PATH, dir_fd=p.fd)
        except FileNotFoundError:
            return None
        return self._add(fd)

    def forget(self, node: int, nlookup: int) -> None:
        """Drop ``nlookup`` lookups; harmless for ROOT, unknown nodes and too large counts."""
        n = self._nodes.get(node)
        if n is None or node == ROOT or nlookup <= 0:
            return
        n.nlookup = max(0, n.nlookup - nlookup)
        self._drop_if_unused(node)

    def getattr(self, node: int) -> os.stat_result:
        return os.fstat(self._node(node).fd)

    def statfs(self, node: int) -> os.statvfs_result:
        return os.fstatvfs(self._node(node).fd)

    def mkdir(self, parent: int, name: bytes, mode: int) -> tuple[int, os.stat_result]:
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        self._node_room()
        os.mkdir(name, mode & 0o7777, dir_fd=p.fd)
        node, st = self._add(os.open(name, _PATH, dir_fd=p.fd))
        return node, self._fix_mode(node, st, mode)

    def unlink(self, parent: int, name: bytes) -> None:
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        os.unlink(name, dir_fd=p.fd)

    def rmdir(self, parent: int, name: bytes) -> None:
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        os.rmdir(name, dir_fd=p.fd)

    def setattr(
        self,
        node: int,
        fh: int | None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
    ) -> os.stat_result:
        """chmod, chown, truncate, utimens, in that order; on ``fh``'s fd when given.

        ``fh`` must be a handle of this node (EBADF otherwise): the guest's ftruncate
        of a file it may no longer reach by name. Without one, the node's own inode is
        reached through /proc/self/fd (for a symlink: the link itself).
        """
        n = self._node(node)
        fd = None if fh is None else self._handle_of(node, fh).fd
        times = atime_ns is not None or mtime_ns is not None or atime_now or mtime_now
        if mode is None and uid is None and gid is None and size is None and not times:
            return os.fstat(n.fd)
        self._writable()
        if mode is not None:  # bits the inode has already are the host's doing
            _check_mode(n.kind, mode & ~os.fstat(n.fd).st_mode)
        path = self._proc(n)
        if mode is not None:
            if n.kind == stat.S_IFLNK:  # what Linux answers for a symlink's mode
                raise _error(errno.EOPNOTSUPP)
            os.chmod(path if fd is None else fd, mode & 0o7777)
        if uid is not None or gid is not None:
            ids = [-1 if v is None else v for v in (uid, gid)]
            if not all(-1 <= v <= 0xFFFFFFFF for v in ids):
                raise _error(errno.EINVAL)
            os.chown(path if fd is None else fd, *ids)
        if size is not None:
            _check_off(size)
            if fd is not None:
                os.ftruncate(fd, size)
            elif n.kind == stat.S_IFREG:  # through an fd: truncate(2) waits out a lease
                tfd = os.open(path, os.O_WRONLY | _IO)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
            else:
                raise _error(errno.EISDIR if n.kind == stat.S_IFDIR else errno.EINVAL)
        if times:
            ts = (_Timespec * 2)(
                _Timespec(*_timespec(atime_ns, atime_now)),
                _Timespec(*_timespec(mtime_ns, mtime_now)),
            )
            if fd is None:
                _libc_check(_utimensat(_AT_FDCWD, os.fsencode(path), ts, 0))
            else:
                _libc_check(_futimens(fd, ts))
        return os.fstat(n.fd)

    def readlink(self, node: int) -> bytes:
        n = self._node(node)
        if n.kind != stat.S_IFLNK:
            raise _error(errno.EINVAL)
        return os.readlink(b"", dir_fd=n.fd)  # the O_PATH link itself: never followed

    def symlink(self, parent: int, name: bytes, target: bytes) -> tuple[int, os.stat_result]:
        """A symlink holding ``target`` as given: only the guest ever resolves it."""
        p = self._dir(parent)
        _check_entry(name)
        if not isinstance(target, bytes):
            raise TypeError(f"a symlink target is bytes, not {type(target).__name__}")
        if _NUL in target:
            raise _error(errno.EINVAL)
        self._writable()
        self._node_room()
        os.symlink(target, name, dir_fd=p.fd)
        return self._add(os.open(name, _PATH, dir_fd=p.fd))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int) -> tuple[int, os.stat_result]:
        """A regular file, FIFO or socket; device nodes are EPERM (see the module doc)."""
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise _error(errno.EPERM)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _error(errno.EINVAL)
        _check_mode(kind, mode)
        self._node_room()
        os.mknod(name, kind | (mode & 0o7777), dir_fd=p.fd)
        node, st = self._add(os.open(name, _PATH, dir_fd=p.fd))
        return node, self._fix_mode(node, st, mode)

    def rename(
        self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int = 0
    ) -> None:
        """renameat2 between two directory nodes: NOREPLACE or EXCHANGE, nothing else."""
        p, q = self._dir(parent), self._dir(newparent)
        _check_entry(name)
        _check_entry(newname)
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise _error(errno.EINVAL)  # RENAME_WHITEOUT would make a host device node
        if flags:
            _libc_check(_renameat2(p.fd, name, q.fd, newname, flags))
        else:
            os.rename(name, newname, src_dir_fd=p.fd, dst_dir_fd=q.fd)

    def link(self, node: int, newparent: int, newname: bytes) -> tuple[int, os.stat_result]:
        """A new name for ``node``'s inode (a symlink node links the link itself)."""
        n = self._node(node)
        q = self._dir(newparent)
        _check_entry(newname)
        self._writable()
        if n.kind == stat.S_IFDIR:
            raise _error(errno.EPERM)
        # the magic link followed is the node's inode, never a path of the guest's
        os.link(self._proc(n), newname, dst_dir_fd=q.fd, follow_symlinks=True)
        return self._add(os.open(newname, _PATH, dir_fd=q.fd))

    def access(self, node: int, mask: int) -> None:
        """faccessat(AT_EACCESS) as this process: EACCES if refused, EROFS for W_OK when
        read-only.

        The device runs as one host user (root here, for whom only X_OK can fail: on a
        file without any x bit). A Linux virtio-fs guest mounts with default_permissions
        and checks mode bits itself, so it does not send ACCESS.
        """
        n = self._node(node)
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _error(errno.EINVAL)
        if mask & os.W_OK and (self.readonly or os.fstatvfs(n.fd).f_flag & os.ST_RDONLY):
            raise _error(errno.EROFS)
        if not os.access(self._proc(n), mask, effective_ids=True):
            raise _error(errno.EACCES)

    # -- files --------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        """The guest's open flags as passed to the host; EROFS for a write when readonly."""
        access = flags & os.O_ACCMODE
        if access == os.O_ACCMODE:
            raise _error(errno.EINVAL)
        if self.readonly and (access != os.O_RDONLY or flags & os.O_TRUNC):
            raise _error(errno.EROFS)
        return flags & _OPEN_FLAGS

    def open(self, node: int, flags: int) -> int:
        """A handle for I/O on a regular file node."""
        n = self._node(node)
        if n.kind != stat.S_IFREG:
            raise _error(
                {stat.S_IFDIR: errno.EISDIR, stat.S_IFLNK: errno.ELOOP}.get(n.kind, errno.ENXIO)
            )
        flags = self._open_flags(flags)
        self._handle_count()
        if flags & os.O_TRUNC:  # the open changes the file: room first
            self._fd_room(1)
        fd = os.open(self._proc(n), flags | _IO)
        try:
            _kept(fd)
        except OSError:
            os.close(fd)
            raise
        return self._new_handle(fd, node, flags & ~os.O_TRUNC, None)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int
    ) -> tuple[int, os.stat_result, int]:
        """Create (or, without O_EXCL, open) the regular file ``name``: node, attrs, handle."""
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        _check_mode(stat.S_IFREG, mode)
        exclusive = flags & os.O_EXCL
        flags = self._open_flags(flags)
        self._handle_count()
        self._node_count()
        self._fd_room(2)  # the handle's fd and the node's
        try:
            fd = os.open(
                name,
                flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode & 0o7777,
                dir_fd=p.fd,
            )
        except FileExistsError:
            if exclusive:
                raise
            node, _ = self.lookup(parent, name)  # a symlink: ELOOP below, as O_NOFOLLOW
            try:
                fh = self.open(node, flags)
            except BaseException:
                self.forget(node, 1)
                raise
            return node, self.getattr(node), fh
        try:
            st = os.fstat(fd)
            if mode & 0o777 & ~st.st_mode:
                os.fchmod(fd, (st.st_mode & 0o7777) | (mode & 0o777))
            node, st = self._add(*self._path_fd_of(p, name, fd, _key(st)))
        except BaseException:
            os.close(fd)
            raise
        return node, st, self._new_handle(fd, node, flags & ~os.O_TRUNC, None)

    def _path_fd_of(
        self, p: _Node, name: bytes, fd: int, key: Key
    ) -> tuple[int, os.stat_result | None]:
        """An O_PATH fd of the inode ``fd`` holds, just created as ``name`` (and its
        fstat when taken).

        Reopening the name (as a lookup does) costs half of reopening the fd through
        /proc, and is the same inode unless the host replaced the entry meanwhile: the
        identity check sees that, and then the magic link of the fd (followed on
        purpose: it is the created inode itself, never a path) is taken instead."""
        try:
            path_fd = os.open(name, _PATH, dir_fd=p.fd)
        except OSError:
            pass
        else:
            try:
                st = os.fstat(path_fd)
            except BaseException:
                os.close(path_fd)
                raise
            if _key(st) == key:
                return path_fd, st
            os.close(path_fd)
        return os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC), None

    def fd(self, fh: int) -> int:
        """The host fd of an open file, for the device's preadv / pwritev."""
        return self._handle(fh, directory=False).fd

    def _close_handle(self, fh: int, *, directory: bool) -> None:
        h = self._handles.get(fh)
        if h is None or (h.scan is not None) != directory:
            raise _error(errno.EBADF)
        del self._handles[fh]
        h.close()
        n = self._nodes.get(h.node)
        if n is not None:
            n.nopen -= 1
            self._drop_if_unused(h.node)

    def release(self, fh: int) -> None:
        self._close_handle(fh, directory=False)

    def flush(self, fh: int) -> None:
        """Close a duplicate of the fd: drops this process's POSIX locks on the file and
        reports a deferred write error, as a close in the guest expects (as virtiofsd)."""
        os.close(os.dup(self._handle(fh, directory=False).fd))

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._handle(fh, directory=False).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with the guest's mode (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, ...)."""
        fd = self._handle(fh, directory=False).fd
        self._writable()
        if mode & ~_FALLOC_MODES:
            raise _error(errno.EOPNOTSUPP)
        _check_off(offset)
        if not 0 < length <= _OFF_MAX - offset:
            raise _error(errno.EINVAL)
        if not mode & _FALLOC_NO_ALLOC:  # see the module doc: never fill the host's disk
            v = os.fstatvfs(fd)
            if length > v.f_bavail * v.f_frsize:
                raise _error(errno.ENOSPC)
        _libc_check(_fallocate(fd, mode, offset, length))

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (and SET / CUR / END) on the host file."""
        fd = self._handle(fh, directory=False).fd
        _check_off(offset, -_OFF_MAX - 1)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _error(errno.EINVAL)
        return os.lseek(fd, offset, whence)

    def copy_file_range(
        self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int
    ) -> int:
        """Copy on the host (no bytes through Python); at most MAX_RW_COUNT per call."""
        src = self._handle(fh_in, directory=False).fd
        dst = self._handle(fh_out, directory=False).fd
        self._writable()
        _check_off(off_in)
        _check_off(off_out)
        _check_off(length)
        if flags:
            raise _error(errno.EINVAL)
        return os.copy_file_range(src, dst, min(length, _RW_MAX), off_in, off_out)

    # -- directories --------------------------------------------------------------------

    def opendir(self, node: int) -> int:
        n = self._dir(node)
        self._handle_count()
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=n.fd)
        try:
            _kept(fd, 2)  # its own and, while listed, scandir's duplicate
        except OSError:
            os.close(fd)
            raise
        return self._new_handle(fd, node, os.O_RDONLY, _DirScan())

    def readdir(self, fh: int, offset: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(ino, next_offset, d_type, name) after ``offset``, read lazily.

        Offsets 1 and 2 are ``.`` and ``..``; then entry i of the host listing has next
        offset i + 3. Stable while the directory is unchanged, including across a
        restore (the listing is read again in the same host order).
        """
        h = self._handle(fh, directory=True)
        if offset < 0:
            raise _error(errno.EINVAL)
        return self._entries(h, offset)

    def _entries(self, h: _Handle, offset: int) -> Iterator[tuple[int, int, int, bytes]]:
        n = self._node(h.node)
        dt_dir = stat.S_IFDIR >> 12
        if offset < 1:
            yield os.fstat(n.fd).st_ino, 1, dt_dir, b"."
        if offset < 2:
            if h.node == ROOT:  # ROOT's parent is ROOT for the guest
                ino = os.fstat(n.fd).st_ino
            else:
                ino = os.stat(b"..", dir_fd=n.fd, follow_symlinks=False).st_ino
            yield ino, 2, dt_dir, b".."
        assert h.scan is not None
        for index, ino, dtype, name in h.scan.entries(h.fd, max(offset - 2, 0), offset == 0):
            yield ino, index + 3, dtype, name

    def releasedir(self, fh: int) -> None:
        self._close_handle(fh, directory=True)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = self._handle(fh, directory=True).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    # -- xattrs (on the node's own inode, through /proc/self/fd) ------------------------

    def getxattr(self, node: int, name: bytes) -> bytes:
        n = self._node(node)
        _check_xattr_name(name)
        return os.getxattr(self._proc(n), name)

    def setxattr(self, node: int, name: bytes, value: bytes, flags: int) -> None:
        n = self._node(node)
        _check_xattr_name(name)
        self._writable()
        if not name.startswith(_XATTR_WRITABLE):
            raise _error(errno.EPERM)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise _error(errno.EINVAL)
        os.setxattr(self._proc(n), name, value, flags)

    def listxattr(self, node: int) -> list[bytes]:
        return [os.fsencode(x) for x in os.listxattr(self._proc(self._node(node)))]

    def removexattr(self, node: int, name: bytes) -> None:
        n = self._node(node)
        _check_xattr_name(name)
        self._writable()
        if not name.startswith(_XATTR_WRITABLE):
            raise _error(errno.EPERM)
        os.removexattr(self._proc(n), name)

    # -- the whole instance -------------------------------------------------------------

    def forget_all(self) -> None:
        """FUSE DESTROY or a device reset: every handle and every node but ROOT goes."""
        if ROOT not in self._nodes:  # closed
            return
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        root = self._nodes[ROOT]
        for node, n in list(self._nodes.items()):
            if node != ROOT and n.fd >= 0:
                os.close(n.fd)
        self._nodes = {ROOT: root}
        self._inodes = {root.key: ROOT}
        root.nlookup, root.nopen = 1, 0

    # -- state: the nodes and handles a guest holds, to carry across a snapshot ---------

    def save(self) -> dict:
        """Nodes and handles as JSON-able data, for ``load`` in another process.

        A node is its path relative to ROOT now (read from /proc/self/fd), its identity
        to check on load ((st_dev, st_ino) and, where the file system gives one, its
        name_to_handle_at handle, which also tells a reused inode number; where it gives
        none, the inode's birth time if it keeps one), and its lookup count. A node with
        no path in the tree (an open but unlinked file, a directory moved out of the
        tree on the host, a node already stale, one deeper than PATH_MAX, which FUSE's
        one name at a time lets a guest build) is saved with path None: nothing can
        reopen it by path, so ``load`` refuses it (or, not strict, marks it stale). So
        are the nodes whose paths no longer fit ``_PATHS_BUDGET`` (nodes with open
        handles come first), so the state always fits in a state file whatever names
        the guest chose. A handle is its node, its open flags (O_TRUNC dropped:
        reopening must not truncate again) and whether it is a directory; a directory
        handle needs no position, since every READDIR carries its offset and the
        listing is read again in the same order.
        """
        root = os.readlink(os.fsencode(self._proc(self._node(ROOT))))
        prefix = root if root.endswith(b"/") else root + b"/"
        paths: dict[int, str | None] = {ROOT: ""}
        budget = _PATHS_BUDGET
        for node, n in sorted(self._nodes.items(), key=lambda e: (e[1].nopen == 0, e[0])):
            if node != ROOT:
                path = self._saved_path(n, prefix)
                cost = 0 if path is None else len(json.dumps(path))
                if cost > budget:
                    path = None
                else:
                    budget -= cost
                paths[node] = path
        nodes = []
        for node, n in sorted(self._nodes.items()):
            handle = None if n.fd < 0 else _file_handle(n.fd)
            entry = {
                "id": node,
                "path": paths[node],
                "dev": n.key[0],
                "ino": n.key[1],
                "file_handle": handle,
                "nlookup": n.nlookup,
            }
            if handle is None and n.fd >= 0 and (birth := _birth_ns(n.fd)) is not None:
                entry["birth_ns"] = birth
            nodes.append(entry)
        handles = [
            {"fh": fh, "node": h.node, "flags": h.flags, "dir": h.scan is not None}
            for fh, h in sorted(self._handles.items())
        ]
        return {
            "version": STATE_VERSION,
            "next_node": self._next_node,
            "next_fh": self._next_fh,
            "nodes": nodes,
            "handles": handles,
        }

    def _saved_path(self, n: _Node, prefix: bytes) -> str | None:
        if n.fd < 0 or os.fstat(n.fd).st_nlink == 0:
            return None
        try:
            path = os.readlink(os.fsencode(self._proc(n)))
        except OSError:  # ENAMETOOLONG: deeper than a path can say
            return None
        if not path.startswith(prefix):
            return None
        rel = os.fsdecode(path[len(prefix) :])
        if len(rel) > _PATH_MAX:  # more than ``load`` takes
            return None
        if path.endswith(b" (deleted)"):  # the name it was opened by is gone; or is it?
            try:
                fd = self._walk(rel, "")
            except (OSError, HostDirStateError):
                return None
            same = _key(os.fstat(fd)) == n.key
            os.close(fd)
            return rel if same else None
        return rel

    def _walk(self, path: str, what: str) -> int:
        """An O_PATH fd for ``path`` below ROOT, opened one checked component at a time."""
        try:
            parts = os.fsencode(path).split(b"/")
        except UnicodeError:
            parts = [b""]
        if len(path) > _PATH_MAX or any(
            not p or p in _DOTS or _NUL in p or len(p) > NAME_MAX for p in parts
        ):
            raise HostDirStateError(f"{what}: {path!r} is not a plain path below the root")
        fd = os.open(b".", _DIR_PATH, dir_fd=self._nodes[ROOT].fd)
        try:
            for part in parts:
                up, fd = fd, -1
                try:
                    fd = os.open(part, _PATH, dir_fd=up)
                finally:
                    os.close(up)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd

    def load(self, state: dict, *, strict: bool = True) -> None:
        """Reopen the nodes and handles ``save`` gave, into this fresh instance.

        Each node is reopened by its path, one component at a time from ROOT (never
        following a symlink), and must be the inode saved (st_dev, st_ino, and the file
        handle when one was saved). A node that cannot be (path gone or None, another
        inode there now) and the handles on it are refused with a HostDirStateError
        naming it; with ``strict=False`` they are kept as stale instead: every call on
        them answers ESTALE, FORGET and RELEASE drop them, and the guest never gets
        another file's data. A state that is malformed, bigger than this instance's
        limits, or not from this directory (the root's identity, when strict) is always
        refused. Nothing is applied unless all of it loads.
        """
        if set(self._nodes) != {ROOT} or self._handles:
            raise HostDirStateError("load needs a fresh HostDir (no nodes or handles yet)")
        parsed = _parse_state(state, self.max_nodes, self.max_handles)
        root = self._nodes[ROOT]
        nodes: dict[int, _Node] = {}
        handles: dict[int, _Handle] = {}
        try:
            for node, path, key, ident, nlookup in parsed.nodes:
                if node == ROOT:
                    if not _is(root.fd, key, ident) and strict:
                        raise HostDirStateError(
                            f"the shared directory is not the one saved (dev/ino {key}, "
                            f"here {root.key})"
                        )
                    continue
                n = self._reopen_node(node, path, key, ident, strict)
                n.nlookup = nlookup
                nodes[node] = n
            for fh, node, flags, directory in parsed.handles:
                n = root if node == ROOT else nodes[node]
                handles[fh] = self._reopen_handle(fh, node, n, flags, directory, strict)
                n.nopen += 1
        except BaseException:
            for n in nodes.values():
                if n.fd >= 0:
                    os.close(n.fd)
            for h in handles.values():
                h.close()
            root.nopen = 0
            raise
        root.nlookup = next(e[4] for e in parsed.nodes if e[0] == ROOT)
        self._nodes.update(nodes)
        self._inodes.update((n.key, node) for node, n in nodes.items() if n.fd >= 0)
        self._handles = handles
        self._next_node = parsed.next_node
        self._next_fh = parsed.next_fh

    def _reopen_node(
        self, node: int, path: str | None, key: Key, ident: Ident, strict: bool
    ) -> _Node:
        what = f"node {node} ({path!r})"
        problem = "had no path in the shared directory at save time (unlinked, or moved out)"
        fd = -1
        if path is not None:
            try:
                fd = self._walk(path, what)
            except OSError as e:
                problem = f"cannot be reopened: {e.strerror}"
            else:
                if _is(fd, key, ident):
                    return _Node(fd, key, stat.S_IFMT(os.fstat(fd).st_mode))
                os.close(fd)
                fd = -1
                problem = "is another inode now (replaced on the host?)"
        if strict:
            raise HostDirStateError(f"{what} {problem}")
        return _Node(-1, key, 0)

    def _reopen_handle(
        self, fh: int, node: int, n: _Node, flags: int, directory: bool, strict: bool
    ) -> _Handle:
        scan = _DirScan() if directory else None
        if n.fd < 0:
            return _Handle(-1, node, flags, scan)
        want = stat.S_IFDIR if directory else stat.S_IFREG
        if n.kind != want:
            raise HostDirStateError(
                f"handle {fh}: node {node} is not a {'directory' if directory else 'regular file'}"
            )
        try:
            if directory:
                fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=n.fd)
            else:
                fd = os.open(self._proc(n), self._open_flags(flags) | _IO)
        except OSError as e:
            if strict:
                raise HostDirStateError(f"handle {fh} on node {node}: {e.strerror}") from e
            return _Handle(-1, node, flags, scan)
        return _Handle(fd, node, flags, scan)


#: what tells an inode from a later one with its number: (file handle, birth time ns)
Ident = tuple[str | None, int | None]


def _is(fd: int, key: Key, ident: Ident) -> bool:
    """Whether ``fd`` holds the inode saved as ``key`` and ``ident`` (each part of
    ``ident`` checked when it was saved)."""
    handle, birth = ident
    return (
        _key(os.fstat(fd)) == key
        and handle in (None, _file_handle(fd))
        and birth in (None, _birth_ns(fd))
    )


class _Parsed(NamedTuple):
    nodes: list[tuple[int, str | None, Key, Ident, int]]  # id, path, key, identity, count
    handles: list[tuple[int, int, int, bool]]  # fh, node, flags, directory
    next_node: int
    next_fh: int


def _int(entry: Any, name: str, what: str, low: int = 0, high: int = _U64) -> int:
    if not isinstance(entry, dict) or name not in entry:
        raise HostDirStateError(f"{what} has no {name!r}")
    value = entry[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HostDirStateError(f"{what}: {name} {str(value)[:40]!r} is not in {low}..{high}")
    return value


def _parse_state(state: Any, max_nodes: int, max_handles: int) -> _Parsed:
    """Check the whole of a saved state before any of it is used (it is input too)."""
    _int(state, "version", "the HostDir state", STATE_VERSION, STATE_VERSION)
    entries, opened = state.get("nodes"), state.get("handles")
    if not isinstance(entries, list) or not isinstance(opened, list):
        raise HostDirStateError("the HostDir state needs lists 'nodes' and 'handles'")
    if len(entries) > max_nodes or len(opened) > max_handles:
        raise HostDirStateError(
            f"the state holds {len(entries)} nodes and {len(opened)} handles; this HostDir "
            f"takes at most {max_nodes} and {max_handles}"
        )
    nodes: list[tuple[int, str | None, Key, Ident, int]] = []
    ids: set[int] = set()
    keys: set[Key] = set()
    for i, e in enumerate(entries):
        what = f"node entry {i}"
        node = _int(e, "id", what, ROOT, _ID_MAX)
        key = (_int(e, "dev", what), _int(e, "ino", what))
        nlookup = _int(e, "nlookup", what)
        path = e.get("path")
        if path is not None and not isinstance(path, str) or (node == ROOT) != (path == ""):
            raise HostDirStateError(f"{what}: path {str(path)[:40]!r} (only ROOT has '')")
        handle = e.get("file_handle")
        if handle is not None and not (
            isinstance(handle, str) and len(handle) <= 2 * (4 + _MAX_HANDLE_SZ)
        ):
            raise HostDirStateError(f"{what}: file_handle {str(handle)[:40]!r} is not hex text")
        birth = None if e.get("birth_ns") is None else _int(e, "birth_ns", what, -_ID_MAX, _ID_MAX)
        if node in ids or (path is not None and key in keys):
            raise HostDirStateError(f"{what}: node {node} or its inode {key} comes twice")
        ids.add(node)
        if path is not None:
            keys.add(key)
        nodes.append((node, path, key, (handle, birth), nlookup))
    if ROOT not in ids:
        raise HostDirStateError("the HostDir state has no ROOT node")
    handles: list[tuple[int, int, int, bool]] = []
    fhs: set[int] = set()
    for i, e in enumerate(opened):
        what = f"handle entry {i}"
        fh = _int(e, "fh", what, 1, _ID_MAX)
        node = _int(e, "node", what, ROOT, _ID_MAX)
        flags = _int(e, "flags", what, 0, 0xFFFFFFFF)
        directory = e.get("dir")
        if not isinstance(directory, bool):
            raise HostDirStateError(f"{what}: 'dir' is not true or false")
        if fh in fhs or node not in ids:
            raise HostDirStateError(
                f"{what}: handle {fh} comes twice or its node {node} is unknown"
            )
        if (
            flags & ~(_OPEN_FLAGS & ~os.O_TRUNC)
            or flags & os.O_ACCMODE == os.O_ACCMODE
            or (directory and flags != os.O_RDONLY)
        ):
            raise HostDirStateError(f"{what}: open flags {flags:#o} are not ones HostDir uses")
        fhs.add(fh)
        handles.append((fh, node, flags, directory))
    next_node = max(_int(state, "next_node", "the HostDir state", ROOT + 1, _ID_MAX), max(ids) + 1)
    next_fh = max(_int(state, "next_fh", "the HostDir state", 1, _ID_MAX), max(fhs, default=0) + 1)
    return _Parsed(nodes, handles, next_node, next_fh)
