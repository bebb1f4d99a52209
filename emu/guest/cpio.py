"""A cpio "newc" archive writer: the initramfs format the kernel unpacks.

Written here rather than shelling out to cpio(1) so that device nodes (/dev/console) can be
put in the archive without root and without a host cpio, and so that archives are
byte-for-byte reproducible (fixed inode numbers, mtime 0, sorted by the caller).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Appends entries to a binary stream; `close()` writes the trailer.

    Parent directories are not created implicitly: the kernel needs them to exist before
    their children, so the caller adds them first (`Initramfs` in initramfs.py does).
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 300000  # arbitrary but fixed, so output is reproducible
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        name = name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"cpio: empty or duplicate name {name!r}")
        self._names.add(name)
        self._ino += 1
        bname = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(bname),
            0,  # check
        )
        hdr = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(hdr + bname + _pad4(len(hdr) + len(bname)))
        self._out.write(data + _pad4(len(data)))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        """Writes the trailer entry; the stream stays open (it is the caller's)."""
        self._entry(TRAILER, 0)
