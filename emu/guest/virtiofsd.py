"""Debian's C virtiofsd (QEMU 7.2's, package qemu-system-common) as a reference backend.

The peer emu's virtio-fs device is checked and measured against. Facts found here:

- It serves one frontend: when that frontend disconnects (the guest powered off), it
  exits. So one `serve` per guest boot.
- It must not be probed by connecting to its socket (that connection would be its
  frontend); readiness is read from /proc/net/unix instead (qsd.listening).
- `-o sandbox=chroot` works as root without namespaces; the default `namespace` mode
  also works on these machines as root, but needs CAP_SYS_ADMIN and fails only once a
  frontend connects, so chroot is the default here.
- Only QEMU can use it: UML's virtio_uml reads the device config (the tag) through
  VHOST_USER_GET_CONFIG, which this virtiofsd does not implement, so UML's virtiofs probe
  fails with -22. Under QEMU the tag is a property of QEMU's vhost-user-fs-device.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from emu.guest.proc import start, stop
from emu.guest.qsd import listening

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
SANDBOXES = ("chroot", "namespace")


def available() -> bool:
    return VIRTIOFSD.exists()


def command(
    source: Path, sock: Path, *, sandbox: str = "chroot", options: Sequence[str] = ()
) -> list[str]:
    """virtiofsd serving `source` on `sock`; `options` are more `-o` options (cache=...)."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"virtiofsd sandbox {sandbox!r} (one of {', '.join(SANDBOXES)})")
    args = [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={source}"]
    args += ["-o", f"sandbox={sandbox}"]
    for opt in options:
        args += ["-o", opt]
    return args


@contextmanager
def serve(
    source: Path,
    sock: Path,
    *,
    sandbox: str = "chroot",
    options: Sequence[str] = (),
    timeout: float = 10.0,
) -> Iterator[subprocess.Popen]:
    """Runs virtiofsd for `source` on `sock` until the block ends (or its frontend goes)."""
    if not available():
        raise FileNotFoundError(f"{VIRTIOFSD} missing (scripts/install-guest-deps.sh)")
    source, sock = Path(source).absolute(), Path(sock).absolute()
    if not source.is_dir():
        raise NotADirectoryError(f"virtiofsd source {source} is not a directory")
    sock.unlink(missing_ok=True)
    log = tempfile.TemporaryFile()
    cmd = command(source, sock, sandbox=sandbox, options=options)
    proc = start(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not listening(sock):
            if proc.poll() is not None:
                log.seek(0)
                out = log.read().decode(errors="replace").strip()
                raise RuntimeError(f"virtiofsd exited ({proc.returncode}): {out}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"virtiofsd did not listen on {sock} within {timeout} s")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)
        log.close()
        sock.unlink(missing_ok=True)
