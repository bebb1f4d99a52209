"""The guest's initramfs: busybox, its applet links, virtio modules and /init, gzipped.

Optional programs come as further archives (`layer`) appended to that one: the kernel
unpacks concatenated archives in order, so the base image stays small and is shared.
Everything is assembled in memory with emu's own cpio writer, so building needs neither
root (for /dev/console) nor a host cpio, and the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from collections.abc import Callable
from pathlib import Path

from emu.guest.cpio import CpioWriter
from emu.guest.modules import Module

BUSYBOX = "bin/busybox"


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of every applet (bin/sh, sbin/ip, ...), asked of busybox itself.

    The static busybox runs on the host as it is, so the list always matches the binary.
    """
    out = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return sorted({line.strip("/") for line in out.split()} - {BUSYBOX})


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _nothing(name: str) -> None:
    pass


def build(
    busybox: Path, modules: list[Module], init: str, on_file: Callable[[str], None] = _nothing
) -> bytes:
    """A gzipped newc archive; `modules` must already be in load order. `on_file` is
    called with each file's name once it is in (3 + len(modules) files: progress)."""
    applets = busybox_applets(busybox)
    files = [BUSYBOX, *applets, "etc/emu/modules", *(f"lib/modules/{m.path.name}" for m in modules)]
    dirs = sorted({d for f in files for d in _parents(f)} | {"dev", "proc", "sys", "tmp", "root"})

    raw = io.BytesIO()
    w = CpioWriter(raw)
    for d in dirs:
        w.dir(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("init", init.encode(), 0o755)
    on_file("init")
    w.file(BUSYBOX, busybox.read_bytes(), 0o755)
    on_file(BUSYBOX)
    for applet in applets:
        w.symlink(applet, "/" + BUSYBOX)
    w.file("etc/emu/modules", "".join(f"{m.path.name}\n" for m in modules).encode())
    on_file("etc/emu/modules")
    for m in modules:
        w.file(f"lib/modules/{m.path.name}", m.path.read_bytes())
        on_file(m.path.name)
    w.close()
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def layer(files: dict[str, Path], on_file: Callable[[str], None] = _nothing) -> bytes:
    """An uncompressed newc archive of host `files` at the given guest paths, to append to
    `build`'s (after padding that to 4 bytes).

    Uncompressed because the guest unpacks it on every boot: gunzipping fio's 84 MB took a
    microvm guest (TCG) 2 s, copying it 0.6 s.
    """
    by_name = {name.strip("/"): path for name, path in files.items()}
    dirs = sorted({d for f in by_name for d in _parents(f)})
    raw = io.BytesIO()
    w = CpioWriter(raw)
    for d in dirs:
        w.dir(d, 0o755)
    for name in sorted(by_name):
        w.file(name, by_name[name].read_bytes(), 0o755)
        on_file(name)
    w.close()
    return raw.getvalue()
