"""qemu-storage-daemon as a reference vhost-user-blk backend.

A second, independent backend to boot guests against: it lets the guest layer be tested
without emu's own backend, and gives emu's backend a peer to compare behaviour and speed
with.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emu.guest.proc import start, stop

QSD = "qemu-storage-daemon"
_SO_ACCEPTCON = 0x10000


def available() -> bool:
    return shutil.which(QSD) is not None


def listening(sock: Path) -> bool:
    """True once a unix socket at `sock` is in listen state (no test connection needed,
    which the daemon would treat as a frontend coming and going)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(sock) and int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def blk_export(image: Path, sock: Path, timeout: float = 10.0):
    """Serves `image` (raw, writable) as vhost-user-blk on `sock` while the block runs."""
    return export(f"driver=file,node-name=f0,filename={image}", sock, timeout)


def nbd_export(nbd_sock: Path, sock: Path, timeout: float = 10.0):
    """Serves the NBD server on unix socket `nbd_sock` as vhost-user-blk on `sock`."""
    return export(f"driver=nbd,node-name=f0,server.type=unix,server.path={nbd_sock}", sock, timeout)


@contextmanager
def export(blockdev: str, sock: Path, timeout: float = 10.0) -> Iterator[subprocess.Popen]:
    """Serves the `--blockdev` spec `blockdev` (node-name f0) as writable vhost-user-blk."""
    sock = Path(sock).absolute()
    sock.unlink(missing_ok=True)
    proc = start(
        [
            QSD,
            *("--blockdev", blockdev),
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while not listening(sock):
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")
                raise RuntimeError(f"{QSD} exited ({proc.returncode}): {out.strip()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{QSD} did not listen on {sock} within {timeout} s")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)
        proc.stdout.close()
        sock.unlink(missing_ok=True)
