"""A real guest (QEMU 7.2 microvm, TCG) keeps its disk data through stops, migrations and
backend crashes, with emu's blk served over vhost-user by ``emu serve``.

The guest runs two streams at once, each writing random 256 KiB to one of its 16 slots of
/dev/vda (O_DIRECT, fsync), reading it back and comparing, until the host writes
``EMU-STOP`` into the disk's last sector. Then it prints the sha256 of the 32 slots, which
must be the host file's. The disk is network storage with latency: nbdkit serves the image
file with its delay filter and ``emu serve`` reaches it as ``blk:nbd+unix://...``, so
stops and crashes find requests really outstanding at the storage. Every iteration of the first
stream prints ``EMU-ITER a n``: the host waits for progress between its actions, so each
one hits a running workload (no timing is asserted).

* QMP ``stop``/``cont`` (SET_VRING_ENABLE 0 + GET_VRING_BASE, then the restart sequence),
  under both quiesce policies, 50 times in one run.
* Migration to a file and back, as shared/traces/vhost-user/qemu-migrate.log: ``stop``,
  ``migrate "exec:cat > FILE"``, ``quit``; a fresh ``emu serve --restore-dir`` and a fresh
  QEMU ``-incoming "exec:cat FILE"``, ``cont``. 20 times in one run.
* SIGKILL of the backend mid-workload and a new one on the same socket: QEMU
  (``reconnect=1``) hands it the INFLIGHT_SHMFD region and the requests are resubmitted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from emu.guest import GuestImage, vm
from emu.guest.devices import Device
from emu.guest.run import kernel_args
from emu.guest.vm import Vm as Guest

DISK_MIB = 64
SLOTS = 32  # of 256 KiB (two streams of 16): the first 8 MiB of the disk
STOP_SECTOR = (DISK_MIB << 11) - 1
STOP_FLAG = b"EMU-STOP"
MEM_MIB = 256
#: nbdkit's delay per request: stops find requests outstanding at the storage
DELAY = "20ms"
KILLS = 5

WORKLOAD = r"""
dev=/dev/vda
wait_for $dev || return 1
stop=$(arg emu.stop.sector 0)
loop() {  # loop FIRST-SLOT NAME: 256 KiB slots written, read back and compared, until EMU-STOP
  i=0; bad=0
  while :; do
    flag=$(dd if=$dev bs=512 skip=$stop count=1 iflag=direct 2>/dev/null | head -c 8)
    [ "$flag" = EMU-STOP ] && break
    s=$((($1 + i % 16) * 4))
    dd if=/dev/urandom of=/tmp/w$2 bs=64k count=4 2>/dev/null
    dd if=/tmp/w$2 of=$dev bs=64k seek=$s count=4 oflag=direct conv=fsync 2>/dev/null ||
      { bad=$((bad + 1)); warn "$2: write $i failed"; }
    dd if=$dev of=/tmp/r$2 bs=64k skip=$s count=4 iflag=direct 2>/dev/null ||
      { bad=$((bad + 1)); warn "$2: read $i failed"; }
    cmp -s /tmp/w$2 /tmp/r$2 || { bad=$((bad + 1)); warn "$2: slot $s differs, iteration $i"; }
    i=$((i + 1))
    echo "EMU-ITER $2 $i"
  done
  echo "$i $bad" > /tmp/done$2
}
loop 16 b &  # a second stream: requests are nearly always in flight
loop 0 a
wait
read ia bada < /tmp/donea
read ib badb < /tmp/doneb
result stop.iterations $((ia + ib))
result stop.bad $((bada + badb))
sum=$(dd if=$dev bs=64k count=128 iflag=direct 2>/dev/null | sha256sum)
result stop.sha256 "${sum%% *}"
[ $((bada + badb)) -eq 0 ]
"""


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_MIB << 20)
    return img


def qemu_command(
    microvm_image: GuestImage,
    sock: Path,
    qmp: Path,
    *,
    reconnect: bool = False,
    incoming: Path | None = None,
) -> list[str]:
    script = base64.b64encode(WORKLOAD.encode()).decode()
    append = kernel_args(["script"], {"script": script, "stop.sector": STOP_SECTOR}, True)
    return vm.qemu_command(
        microvm_image,
        [Device("blk", str(sock))],
        qmp,
        append,
        MEM_MIB,
        reconnect=reconnect,
        incoming=None if incoming is None else f"exec:cat {incoming}",
    )


def raise_stop_flag(disk: Path) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, STOP_FLAG.ljust(512, b"\0"), STOP_SECTOR * 512)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_data(results: dict[str, str], disk: Path) -> None:
    assert results["stop.bad"] == "0", results
    with open(disk, "rb") as f:
        assert results["stop.sha256"] == hashlib.sha256(f.read(SLOTS << 18)).hexdigest()


@pytest.fixture
def storage(disk: Path, nbd_server) -> str:
    """The disk image behind nbdkit with a delay per request: its NBD URI."""
    delays = [f"rdelay={DELAY}", f"wdelay={DELAY}"]
    return nbd_server(["file", f"file={disk}"], filters=["delay"], params=delays).uri


def serve(sock: Path, storage: str, log: Path, *options: str) -> vm.Serve:
    """``emu serve`` with the disk on network storage (requests sit outstanding there)."""
    return vm.Serve(sock, storage, log, *options)


# -- the scenarios --


def stop_cont(
    microvm_image: GuestImage, disk: Path, storage: str, tmp: Path, policy: str, cycles: int
) -> None:
    sock, qmp = tmp / "blk.sock", tmp / "qmp.sock"
    with ExitStack() as undo:  # undo actions, last in first out
        backend = serve(sock, storage, tmp / "serve.log", "--policy", policy)
        undo.callback(backend.kill)
        guest = Guest(qemu_command(microvm_image, sock, qmp), qmp, [])
        undo.callback(guest.stop)
        guest.progress()
        for _ in range(cycles):
            guest.qmp.execute("stop")
            time.sleep(0.02)  # stopped for a moment: requests sit in flight
            guest.qmp.execute("cont")
            guest.progress()
        raise_stop_flag(disk)
        results = guest.finish()
        assert int(results["stop.iterations"]) > cycles
        check_data(results, disk)


@pytest.mark.parametrize("policy", ["drain", "report"])
def test_stop_and_cont_during_io(
    microvm_image: GuestImage, disk: Path, storage: str, tmp_path: Path, policy: str
) -> None:
    stop_cont(microvm_image, disk, storage, tmp_path, policy, cycles=5)


def test_stop_and_cont_50_times(
    microvm_image: GuestImage, disk: Path, storage: str, tmp_path: Path
) -> None:
    stop_cont(microvm_image, disk, storage, tmp_path, "report", cycles=50)


def migrate(
    microvm_image: GuestImage, disk: Path, storage: str, tmp: Path, policy: str, cycles: int
) -> None:
    sock, qmp, state = tmp / "blk.sock", tmp / "qmp.sock", tmp / "state"
    state.mkdir()
    transcript: list[str] = []
    log = tmp / "serve.log"
    opts = ["--policy", policy, "--state-dir", str(state)]
    with ExitStack() as undo:  # undo actions, last in first out
        backend = serve(sock, storage, log, *opts)
        undo.callback(backend.kill)
        guest = Guest(qemu_command(microvm_image, sock, qmp), qmp, transcript)
        undo.callback(guest.stop)
        guest.progress()
        for n in range(cycles):
            snapshot = tmp / f"vm-{n}.mig"
            guest.migrate_and_quit(snapshot)  # the backend saved its state at the stop
            backend.kill()
            assert (state / "blk.sock.state").exists()
            qmp.unlink(missing_ok=True)
            backend = serve(sock, storage, log, "--restore-dir", str(state), *opts)
            undo.callback(backend.kill)
            guest = Guest(
                qemu_command(microvm_image, sock, qmp, incoming=snapshot), qmp, transcript
            )
            undo.callback(guest.stop)
            guest.wait_status("paused")  # the incoming migration is complete
            guest.qmp.execute("cont")
            guest.progress()
            snapshot.unlink()
        raise_stop_flag(disk)
        results = guest.finish()
        check_data(results, disk)


@pytest.mark.parametrize("policy", ["drain", "report"])
def test_migrate_to_a_file_and_restore(
    microvm_image: GuestImage, disk: Path, storage: str, tmp_path: Path, policy: str
) -> None:
    migrate(microvm_image, disk, storage, tmp_path, policy, cycles=2)


def test_migrate_and_restore_20_times(
    microvm_image: GuestImage, disk: Path, storage: str, tmp_path: Path
) -> None:
    migrate(microvm_image, disk, storage, tmp_path, "report", cycles=20)


def test_backend_killed_and_restarted(
    microvm_image: GuestImage, disk: Path, storage: str, tmp_path: Path
) -> None:
    sock, qmp = tmp_path / "blk.sock", tmp_path / "qmp.sock"
    log = tmp_path / "serve.log"
    with ExitStack() as undo:  # undo actions, last in first out
        backend = serve(sock, storage, log, "--policy", "report")
        undo.callback(lambda: backend.kill())
        guest = Guest(qemu_command(microvm_image, sock, qmp, reconnect=True), qmp, [])
        undo.callback(guest.stop)
        guest.progress()
        for _ in range(KILLS):
            backend.kill(signal.SIGKILL)
            backend = serve(sock, storage, log, "--policy", "report")
            guest.progress(2)
        raise_stop_flag(disk)
        results = guest.finish()
        check_data(results, disk)
