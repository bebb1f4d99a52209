"""A QEMU microvm guest under the host's hand while it runs: QMP, its console, migration.

For tests and benchmarks that act on a running guest (QMP stop/cont, migration to a file
or live over TCP, backend restarts): ``Vm`` is one QEMU process with its console collected
line by line and QMP connected; ``Serve`` is one ``emu serve`` blk backend in a process of
its own; ``qemu_command`` builds the microvm command line with a QMP socket and, for a
migration destination, ``-incoming``. The guest's /init prints ``EMU-ITER <stream> <n>``
as a workload makes progress (init_script.py), which ``Vm.progress`` waits for, so each
host action hits a running workload without any timing being assumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from emu.guest import microvm
from emu.guest.devices import Device
from emu.guest.images import GuestImage
from emu.guest.proc import start, stop

#: for the guest to get anywhere under TCG; a hang fails, never a slow run
WAIT = 120.0


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.01)


def listening(sock: Path) -> bool:
    """Whether a server accepts on the unix socket (the probe is accepted and dropped:
    emu serve serves the next connection)."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
    except OSError:
        return False
    finally:
        s.close()
    return True


class Serve:
    """``emu serve`` for one blk device on ``disk`` (a path or an NBD URI), in a process of
    its own (killed by PID).

    ``python`` runs the CLI through ``-c``: a test may patch emu before it starts."""

    def __init__(
        self, sock: Path, disk: Path | str, log: Path, *options: str, python: str | None = None
    ) -> None:
        self.sock = sock
        entry = ["-c", python] if python else ["-m", "emu.cli"]
        cmd = [sys.executable, *entry, "-v", "serve", "--socket", str(sock), *options]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([*cmd, f"blk:{disk}"], stdout=self.log, stderr=self.log)
        wait_until(lambda: listening(sock) or self.proc.poll() is not None, "emu serve")
        if self.proc.poll() is not None:
            raise RuntimeError(f"emu serve exited {self.proc.returncode}: see {log}")

    def kill(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)
        self.log.close()


class Qmp:
    """QMP over QEMU's unix socket: commands and their answers; events are kept."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)

        def connected() -> bool:  # the socket file appears before QEMU listens on it
            try:
                self.sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            return True

        wait_until(connected, "QMP socket")
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
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
            self.events.append(answer)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Vm:
    """One QEMU process: console collected line by line, QMP connected."""

    def __init__(self, cmd: list[str], qmp: Path, transcript: list[str]) -> None:
        self.lines = transcript  # shared by the QEMUs of one guest (migrations)
        #: called with each query-migrate answer (livemig's progress display)
        self.on_migration: Callable[[dict], None] | None = None
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

    def iterations(self, stream: str = "a") -> int:
        done = [ln for ln in self.lines if ln.startswith(f"EMU-ITER {stream} ")]
        return int(done[-1].split()[2]) if done else 0

    def progress(self, at_least: int = 1, stream: str = "a", timeout: float = WAIT) -> None:
        """Wait until the workload has done ``at_least`` more iterations."""
        goal = self.iterations(stream) + at_least
        try:
            wait_until(
                lambda: self.iterations(stream) >= goal or self.proc.poll() is not None,
                "I/O",
                timeout,
            )
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.console()}") from None
        assert self.iterations(stream) >= goal, self.console()

    def saw(self, text: str) -> bool:
        return any(text in ln for ln in self.lines)

    def finish(self, ok: bool = True) -> dict[str, str]:
        """Wait for /init to end; its EMU-RESULTs (``ok``: it must have ended with rc=0)."""
        wait_until(lambda: self.proc.poll() is not None, "guest end")
        self._pump.join(10)
        results = {}
        for ln in self.lines:
            if "EMU-RESULT " in ln:
                key, _, value = ln.split("EMU-RESULT ", 1)[1].partition(" ")
                results[key] = value
        if ok:
            assert any("EMU-DONE rc=0" in ln for ln in self.lines), self.console()
        return results

    def console(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        self.qmp_close()
        stop(self.proc)
        self._pump.join(10)

    def kill(self) -> None:
        """SIGKILL to QEMU (and its reaper: one process group), as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.stop()

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])  # type: ignore[index]

    def wait_status(self, status: str) -> None:
        wait_until(lambda: self.status() == status, f"VM {status}")

    def migration(self) -> dict:
        answer: dict = self.qmp.execute("query-migrate")  # type: ignore[assignment]
        if self.on_migration is not None:
            self.on_migration(answer)
        return answer

    def wait_migration(self, *done: str, timeout: float = WAIT) -> dict:
        """Poll query-migrate until its status is one of ``done``; the last answer."""
        last: dict = {}

        def finished() -> bool:
            nonlocal last
            last = self.migration()
            return last.get("status") in done

        try:
            wait_until(finished, f"migration {'/'.join(done)}", timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}: {last}\n{self.console()}") from None
        return last

    def migrate_and_quit(self, path: Path) -> None:
        """As the trace's source QEMU: stop, migrate to a file, quit."""
        self.qmp.execute("stop")
        self.qmp.execute("migrate", uri=f"exec:cat > {path}")
        info = self.wait_migration("completed", "failed")
        if info["status"] == "failed":
            raise RuntimeError(f"migration failed:\n{self.console()}")
        self.quit()

    def quit(self) -> None:
        self.qmp.execute("quit")
        wait_until(lambda: self.proc.poll() is not None, "QEMU quit")
        self.stop()

    def qmp_close(self) -> None:
        if hasattr(self, "qmp"):
            self.qmp.close()


def qemu_command(
    image: GuestImage,
    devices: Sequence[Device],
    qmp: Path,
    append: list[str],
    mem_mib: int,
    *,
    reconnect: bool = False,
    incoming: str | None = None,
    trace: tuple[str, Path] | None = None,
) -> list[str]:
    """The microvm command with QMP on ``qmp``; ``incoming``: a migration destination's
    ``-incoming`` URI; ``trace``: (event pattern, file) for QEMU's own trace events."""
    cmd = microvm.command(image, list(devices), append, mem_mib)
    if reconnect:
        i = cmd.index("-chardev") + 1
        cmd[i] += ",reconnect=1"
    extra = ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming is not None:
        extra += ["-incoming", incoming]
    if trace is not None:  # each event with its time: pid@seconds.micros:event ...
        extra += ["-trace", trace[0], "-D", str(trace[1]), "-msg", "timestamp=on"]
    at = cmd.index("-append")
    return cmd[:at] + extra + cmd[at:]
