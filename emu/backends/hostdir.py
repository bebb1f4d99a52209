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
  could block (FIFO) or reach a host device.
- Unknown node ids, and node ids whose inode could not be reopened after a restore:
  ESTALE. Unknown file handles, or a handle of the wrong kind (a directory handle for a
  file call and back): EBADF.
- At most ``max_nodes`` nodes and ``max_handles`` handles at once (ENFILE beyond), so a
  guest cannot exhaust the host's fds: a node holds one fd, a file handle one, a
  directory handle two while it is being listed. Keep ``max_nodes + 2 * max_handles``
  under RLIMIT_NOFILE.
- ``readonly``: every call that would change the tree or a file raises EROFS.
- O_DIRECT is dropped from open flags (the guest's page cache is not the host's, and
  tmpfs refuses it), as the C virtiofsd does by default.

What a held node still does: a node keeps its inode, so a directory a host user moves
out of the tree stays reachable through a node the guest already holds (as with the C
virtiofsd). The guest itself cannot move anything out: every target is a node of this
tree.

Credentials: the device runs as one host user and does not switch to the guest's
uid/gid (no setfsuid); files it creates belong to that user. Modes are the guest's: the
guest kernel applied its umask before sending, so bits the host umask removed are put
back.

Not thread-safe: one device thread calls it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

ROOT = 1
NAME_MAX = 255
#: default bounds on what one guest can hold open at once (ENFILE beyond)
MAX_NODES = 16384
MAX_HANDLES = 2048

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: open flags a guest may pass through (access mode and flags with a file meaning only)
_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_NONBLOCK
)
#: how far ``..`` may walk up looking for ROOT before giving up
_MAX_DEPTH = 4096
_DOTS = (b".", b"..")

Key = tuple[int, int]


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def _check_name(name: bytes) -> None:
    """One path component the host may resolve: no separator, no NUL, not too long."""
    if not isinstance(name, bytes):
        raise TypeError(f"names are bytes, not {type(name).__name__}")
    if not name or b"/" in name or b"\0" in name:
        raise _error(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise _error(errno.ENAMETOOLONG)


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

    def _add(self, fd: int) -> tuple[int, os.stat_result]:
        """The node of the inode ``fd`` holds (taking ``fd``), one lookup more."""
        try:
            st = os.fstat(fd)
            key = _key(st)
            node = self._inodes.get(key)
            if node is None:
                if len(self._nodes) >= self.max_nodes:
                    raise _error(errno.ENFILE)
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

    def _handle_room(self) -> None:
        if len(self._handles) >= self.max_handles:
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

    def _fix_mode(self, n: _Node, mode: int) -> None:
        """Put back permission bits the host umask took from a new entry."""
        st = os.fstat(n.fd)
        missing = mode & 0o777 & ~st.st_mode
        if missing:
            os.chmod(self._proc(n), (st.st_mode & 0o7777) | missing)

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
        """A lookup for READDIRPLUS: None for ``.``/``..`` and for an entry gone meanwhile."""
        self._node(parent)
        if name in _DOTS:
            return None
        try:
            return self.lookup(parent, name)
        except FileNotFoundError:
            return None

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
        if len(self._nodes) >= self.max_nodes:
            raise _error(errno.ENFILE)
        os.mkdir(name, mode & 0o7777, dir_fd=p.fd)
        node, _ = self._add(os.open(name, _PATH, dir_fd=p.fd))
        self._fix_mode(self._nodes[node], mode)
        return node, os.fstat(self._nodes[node].fd)

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
        self._handle_room()
        fd = os.open(self._proc(n), flags | os.O_CLOEXEC)
        return self._new_handle(fd, node, flags & ~os.O_TRUNC, None)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int
    ) -> tuple[int, os.stat_result, int]:
        """Create (or, without O_EXCL, open) the regular file ``name``: node, attrs, handle."""
        p = self._dir(parent)
        _check_entry(name)
        self._writable()
        exclusive = flags & os.O_EXCL
        flags = self._open_flags(flags)
        self._handle_room()
        if len(self._nodes) >= self.max_nodes:
            raise _error(errno.ENFILE)
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
            # the magic link followed (no O_NOFOLLOW) is the inode just created, race-free
            node, _ = self._add(os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise
        fh = self._new_handle(fd, node, flags & ~os.O_TRUNC, None)
        return node, os.fstat(fd), fh

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

    # -- directories --------------------------------------------------------------------

    def opendir(self, node: int) -> int:
        n = self._dir(node)
        self._handle_room()
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=n.fd)
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
