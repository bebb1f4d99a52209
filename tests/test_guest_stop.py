"""A real guest (QEMU 7.2 microvm, TCG) keeps its disk data through stops, migrations and
backend crashes, with emu's blk served over vhost-user by ``emu serve``.

The guest runs two streams at once, each writing random 256 KiB to one of its 16 slots of
/dev/vda (O_DIRECT, fsync), reading it back and comparing, until the host writes
``EMU-STOP`` into the disk's last sector. Then it prints the sha256 of the 32 slots, which
must be the host file's. The backend holds each completion back a little (``emu serve
--latency``), so stops and crashes find requests in flight. Every iteration of the first
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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emu.guest import GuestImage, build_image, microvm
from emu.guest.devices import Device
from emu.guest.packages import PackageError
from emu.guest.proc import start, stop
from emu.guest.run import kernel_args

DISK_MIB = 64
SLOTS = 32  # of 256 KiB (two streams of 16): the first 8 MiB of the disk
STOP_SECTOR = (DISK_MIB << 11) - 1
STOP_FLAG = b"EMU-STOP"
MEM_MIB = 256
#: emu serve --latency: completions held back, so that stops find requests in flight
LATENCY = "0.02"
KILLS = 5
WAIT = 120.0  # for the guest to get anywhere under TCG; a hang fails, never a slow run

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


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    try:
        return build_image("microvm")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_MIB << 20)
    return img


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.01)


# -- the backend --


class Backend:
    """``emu serve`` for one blk device, in a process of its own (killed by PID)."""

    def __init__(self, sock: Path, disk: Path, log: Path, *options: str) -> None:
        self.sock = sock
        cmd = [sys.executable, "-m", "emu.cli", "-v", "serve", "--socket", str(sock)]
        cmd += ["--latency", LATENCY, *options]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([*cmd, f"blk:{disk}"], stdout=self.log, stderr=self.log)
        wait_until(lambda: self._listening() or self.proc.poll() is not None, "emu serve")
        if self.proc.poll() is not None:
            raise RuntimeError(f"emu serve exited {self.proc.returncode}: see {log}")

    def _listening(self) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.sock))
        except OSError:
            return False
        finally:
            s.close()
        return True  # (the probe was accepted and dropped: the server serves the next)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)
        self.log.close()


# -- QEMU and QMP --


class Qmp:
    """The few QMP commands the scenarios need, over QEMU's unix socket."""

    def __init__(self, path: Path) -> None:
        wait_until(path.exists, "QMP socket")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            answer = self._read()
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")
            # an event: skip

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Guest:
    """One QEMU process: console collected line by line, QMP connected."""

    def __init__(self, cmd: list[str], qmp: Path, transcript: list[str]) -> None:
        self.lines = transcript  # shared across the QEMUs of one guest (migrations)
        self.proc = start(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        try:
            self.qmp = Qmp(qmp)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))

    def iterations(self) -> int:
        done = [ln for ln in self.lines if ln.startswith("EMU-ITER a ")]
        return int(done[-1].split()[2]) if done else 0

    def progress(self, at_least: int = 1) -> None:
        """Wait until the workload has done ``at_least`` more iterations."""
        goal = self.iterations() + at_least
        try:
            wait_until(lambda: self.iterations() >= goal or self.proc.poll() is not None, "I/O")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.console()}") from None
        assert self.iterations() >= goal, self.console()

    def finish(self) -> dict[str, str]:
        """Wait for /init to end; its EMU-RESULTs."""
        wait_until(lambda: self.proc.poll() is not None, "guest end")
        self._pump.join(10)
        results = {}
        for ln in self.lines:
            if "EMU-RESULT " in ln:
                key, _, value = ln.split("EMU-RESULT ", 1)[1].partition(" ")
                results[key] = value
        assert any("EMU-DONE rc=0" in ln for ln in self.lines), self.console()
        return results

    def console(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        self.qmp_close()
        stop(self.proc)
        self._pump.join(10)

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])  # type: ignore[index]

    def wait_status(self, status: str) -> None:
        wait_until(lambda: self.status() == status, f"VM {status}")

    def migrate_and_quit(self, path: Path) -> None:
        """As the trace's source QEMU: stop, migrate to a file, quit."""
        self.qmp.execute("stop")
        self.qmp.execute("migrate", uri=f"exec:cat > {path}")

        def completed() -> bool:
            status = self.qmp.execute("query-migrate")["status"]  # type: ignore[index]
            if status == "failed":
                raise RuntimeError(f"migration failed:\n{self.console()}")
            return status == "completed"

        wait_until(completed, "migration")
        self.qmp.execute("quit")
        wait_until(lambda: self.proc.poll() is not None, "QEMU quit")
        self.stop()

    def qmp_close(self) -> None:
        if hasattr(self, "qmp"):
            self.qmp.close()


def qemu_command(
    image: GuestImage,
    sock: Path,
    qmp: Path,
    *,
    reconnect: bool = False,
    incoming: Path | None = None,
) -> list[str]:
    script = base64.b64encode(WORKLOAD.encode()).decode()
    append = kernel_args(["script"], {"script": script, "stop.sector": STOP_SECTOR}, True)
    cmd = microvm.command(image, [Device("blk", str(sock))], append, MEM_MIB)
    if reconnect:
        i = cmd.index("-chardev") + 1
        cmd[i] += ",reconnect=1"
    extra = ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming is not None:
        extra += ["-incoming", f"exec:cat {incoming}"]
    at = cmd.index("-append")
    return cmd[:at] + extra + cmd[at:]


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


@contextmanager
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Undo actions, run last-in first-out whatever happens."""
    undo: list[Callable[[], None]] = []
    try:
        yield undo
    finally:
        for fn in reversed(undo):
            fn()


# -- the scenarios --


def stop_cont(image: GuestImage, disk: Path, tmp: Path, policy: str, cycles: int) -> None:
    sock, qmp = tmp / "blk.sock", tmp / "qmp.sock"
    with cleanup() as undo:
        backend = Backend(sock, disk, tmp / "serve.log", "--policy", policy)
        undo.append(backend.kill)
        guest = Guest(qemu_command(image, sock, qmp), qmp, [])
        undo.append(guest.stop)
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
    image: GuestImage, disk: Path, tmp_path: Path, policy: str
) -> None:
    stop_cont(image, disk, tmp_path, policy, cycles=5)


def test_stop_and_cont_50_times(image: GuestImage, disk: Path, tmp_path: Path) -> None:
    stop_cont(image, disk, tmp_path, "report", cycles=50)


def migrate(image: GuestImage, disk: Path, tmp: Path, policy: str, cycles: int) -> None:
    sock, qmp, state = tmp / "blk.sock", tmp / "qmp.sock", tmp / "state"
    state.mkdir()
    transcript: list[str] = []
    log = tmp / "serve.log"
    opts = ["--policy", policy, "--state-dir", str(state)]
    with cleanup() as undo:
        backend = Backend(sock, disk, log, *opts)
        undo.append(backend.kill)
        guest = Guest(qemu_command(image, sock, qmp), qmp, transcript)
        undo.append(guest.stop)
        guest.progress()
        for n in range(cycles):
            snapshot = tmp / f"vm-{n}.mig"
            guest.migrate_and_quit(snapshot)  # the backend saved its state at the stop
            backend.kill()
            assert (state / "blk.sock.state").exists()
            qmp.unlink(missing_ok=True)
            backend = Backend(sock, disk, log, "--restore-dir", str(state), *opts)
            undo.append(backend.kill)
            guest = Guest(qemu_command(image, sock, qmp, incoming=snapshot), qmp, transcript)
            undo.append(guest.stop)
            guest.wait_status("paused")  # the incoming migration is complete
            guest.qmp.execute("cont")
            guest.progress()
            snapshot.unlink()
        raise_stop_flag(disk)
        results = guest.finish()
        check_data(results, disk)


@pytest.mark.parametrize("policy", ["drain", "report"])
def test_migrate_to_a_file_and_restore(
    image: GuestImage, disk: Path, tmp_path: Path, policy: str
) -> None:
    migrate(image, disk, tmp_path, policy, cycles=2)


def test_migrate_and_restore_20_times(image: GuestImage, disk: Path, tmp_path: Path) -> None:
    migrate(image, disk, tmp_path, "report", cycles=20)


def test_backend_killed_and_restarted(image: GuestImage, disk: Path, tmp_path: Path) -> None:
    sock, qmp = tmp_path / "blk.sock", tmp_path / "qmp.sock"
    log = tmp_path / "serve.log"
    with cleanup() as undo:
        backend = Backend(sock, disk, log, "--policy", "report")
        undo.append(lambda: backend.kill())
        guest = Guest(qemu_command(image, sock, qmp, reconnect=True), qmp, [])
        undo.append(guest.stop)
        guest.progress()
        for _ in range(KILLS):
            backend.kill(signal.SIGKILL)
            backend = Backend(sock, disk, log, "--policy", "report")
            guest.progress(2)
        raise_stop_flag(disk)
        results = guest.finish()
        check_data(results, disk)
