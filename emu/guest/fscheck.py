"""The `fs` workload's check pass from the host's side: its listing, and the host's own.

The guest prints each entry of its check directory as `EMU-RESULT fs.ls.<path>
<type>:<mode>:<uid>:<gid>:<size>:<nlink>:<content>` (init_fs.py); `host_listing` reads the
same directory on the host into the same form, so a test can hold the guest's view, the
host's view and another backend's run side by side. `host_data` is the file the host puts
in the share for the pass; `expected_sha256` is what the pass writes from it.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Mapping
from pathlib import Path

#: the check pass's defaults (init_fs.py): its directory, the host file, the sizes written
CHECK_DIR = "emu-check"
HOST_FILE = "host.bin"
SIZES = (0, 1, 4095, 4096, 4097, 65536, 131073, 1048576, 3000000)
#: file n of SIZES holds the host file's bytes from n * STRIDE
STRIDE = 4099
#: entries the guest counts but does not list (300 empty files)
UNLISTED = "many/"
#: `touch -t 202001020304.05` in the guest (UTC)
TOUCHED_MTIME = 1577934245

_TYPES = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
}


def host_data(size: int = 4 << 20, seed: int = 10) -> bytes:
    """The same pseudo-random bytes on every run, so two backends' checksums can agree."""
    return random.Random(seed).randbytes(size)


def expected_sha256(data: bytes, size: int) -> str:
    """sha256 of file `f<size>` as the pass writes it (before any later change to it)."""
    n = SIZES.index(size)
    return hashlib.sha256(data[n * STRIDE : n * STRIDE + size]).hexdigest()


def guest_listing(results: Mapping[str, str]) -> dict[str, str]:
    """path -> listing value, from a guest's EMU-RESULTs."""
    return {k.removeprefix("fs.ls."): v for k, v in results.items() if k.startswith("fs.ls.")}


def _entry(path: Path, st: os.stat_result) -> str:
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "?")
    size, nlink = ("-", "-") if kind == "d" else (str(st.st_size), str(st.st_nlink))
    if kind == "f":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        content = h.hexdigest()
    elif kind == "l":
        content = os.readlink(path)
    else:
        content = "-"
    mode = format(stat.S_IMODE(st.st_mode), "o")
    return f"{kind}:{mode}:{st.st_uid}:{st.st_gid}:{size}:{nlink}:{content}"


def host_listing(root: Path) -> dict[str, str]:
    """The listing of `root` on the host, in the guest's form (without UNLISTED)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(UNLISTED):
                out[rel] = _entry(path, path.lstat())
    return out
