"""emu's frontend against qemu-storage-daemon's vhost-user-blk export (libvhost-user, in C):
protocol compatibility with an implementation that is not emu's own."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emu.testing.blk import BlkDriver
from emu.testing.vhost_user import VhostUserDriver

QSD = shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(
    QSD is None,
    reason="qemu-storage-daemon not installed (apt-get install qemu-system-common)",
)


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    img, sock = tmp_path / "disk.img", tmp_path / "qsd.sock"
    img.write_bytes(bytes(4 << 20))
    proc = subprocess.Popen(
        [
            str(QSD),
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
            f"addr.path={sock},writable=on",
        ],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qemu-storage-daemon did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.05)
    try:
        yield img, sock
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("add_mem_reg", [True, False], ids=["add-mem-reg", "mem-table"])
def test_blk_round_trip_through_qemu_storage_daemon(
    qsd: tuple[Path, Path], add_mem_reg: bool
) -> None:
    img, sock = qsd
    pattern = hashlib.sha256(b"emu frontend, qsd backend").digest() * 256  # 8 KiB
    fe = VhostUserDriver(sock, add_mem_reg=add_mem_reg)
    try:
        blk = BlkDriver.open(fe)
        assert fe.config_read(0, 8) == 4 << 20 >> 9  # capacity in sectors
        assert blk.write(32, pattern) == 0
        assert blk.flush() == 0
        assert blk.read(32, 16) == pattern
        base = fe.stop_ring(0)
        assert base == 3  # write, flush, read: next avail index
        fe.restart_ring(0, base)
        assert blk.read(32, 16) == pattern
    finally:
        fe.close()
    assert img.read_bytes()[32 * 512 : 32 * 512 + len(pattern)] == pattern
