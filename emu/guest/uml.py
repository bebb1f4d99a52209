"""user-mode-linux command lines.

UML is a host program whose built-in virtio_uml driver is a vhost-user frontend: each
`virtio_uml.device=SOCKET:ID` connects to a backend at boot. The console is the process's
stdin/stdout (con0=fd:0,fd:1); every other console and serial line is switched off so
UML opens no ptys or xterms.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from emu.guest.devices import Device, virtio_ids
from emu.guest.images import GuestImage


def command(
    image: GuestImage, devices: list[Device], append: list[str], mem_mib: int, cpus: int = 1
) -> list[str]:
    if cpus != 1:
        raise ValueError("a UML guest has one CPU (this kernel is built without SMP)")
    args = [
        str(image.kernel),
        f"mem={mem_mib}M",
        f"initrd={image.initrd}",
        "rdinit=/init",
        "con=null",
        "ssl=null",
        "con0=fd:0,fd:1",
    ]
    ids = virtio_ids()
    for dev in devices:
        if not dev.vhost_user:
            raise ValueError(f"UML attaches vhost-user devices only, not {dev.type}")
        others = [o for o in dev.options if dev.type != "fs" or not o.startswith("tag=")]
        if others:  # an fs tag is the backend's (its config); the fs workload mounts it
            raise ValueError(f"UML takes no device options ({','.join(others)})")
        args.append(f"virtio_uml.device={dev.path}:{ids[dev.type]}")
    return args + append


def ram_file(attached: str | os.PathLike, timeout: float = 10.0) -> Path:
    """The guest RAM file of the running UML guest whose command line attaches the
    vhost-user socket `attached`, as a /proc/PID/fd/N path (stat() follows it).

    UML keeps its physical memory in an unlinked file in $TMPDIR or /dev/shm (O_TMPFILE:
    `/dev/shm/#INODE (deleted)`) and hands that file's fd to vhost-user backends in
    SET_MEM_TABLE; its allocated blocks are the host memory the guest uses, and what a
    balloon releases (fallocate PUNCH_HOLE on that fd) shows there. The largest unlinked
    regular file among the guest's fds is taken.
    """
    want = f"virtio_uml.device={os.fspath(attached)}:".encode()
    deadline = time.monotonic() + timeout
    while True:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if want not in (proc / "cmdline").read_bytes():
                    continue
                best: tuple[int, Path] | None = None
                for fd in (proc / "fd").iterdir():
                    if not os.readlink(fd).endswith(" (deleted)"):
                        continue
                    st = os.stat(fd)
                    if stat.S_ISREG(st.st_mode) and (best is None or st.st_size > best[0]):
                        best = (st.st_size, fd)
                if best is not None:
                    return best[1]
            except OSError:  # a process that ended meanwhile
                continue
        if time.monotonic() > deadline:
            raise LookupError(f"no UML guest attached to {os.fspath(attached)} with a RAM file")
        time.sleep(0.1)


def allocated(path: str | os.PathLike) -> int:
    """Bytes the file really holds (its allocated blocks, not its size)."""
    return os.stat(path).st_blocks * 512
