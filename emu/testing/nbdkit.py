"""nbdkit as a real NBD server for tests and benches, on a Unix socket they own.

    with Nbdkit(tmp_path / "nbd.sock", ["memory", "64M"], filters=["delay"],
                params=["rdelay=10ms"]) as srv:
        engine = NbdEngine(srv.uri)

Readiness is nbdkit's own signal: it writes its pid file once it accepts connections.
``--exit-with-parent`` takes the server down with the test process if that dies first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType


def nbdkit_missing() -> str | None:
    """Why nbdkit cannot run here (a skip reason), or None."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (Debian package nbdkit; scripts/install-guest-deps.sh)"
    return None


class Nbdkit:
    """One nbdkit process: ``plugin`` is the plugin and its arguments (``["memory",
    "64M"]``, ``["file", "file=PATH"]``), ``params`` the filters' ones (``rdelay=1ms``).
    It listens on the Unix ``socket``, or on TCP ``address``:``port`` when a port is given
    (``socket`` then only names the pid file)."""

    def __init__(
        self,
        socket: str | os.PathLike[str],
        plugin: list[str],
        *,
        filters: tuple[str, ...] | list[str] = (),
        params: tuple[str, ...] | list[str] = (),
        readonly: bool = False,
        threads: int = 64,
        port: int | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.socket = Path(socket)
        self.pidfile = self.socket.with_suffix(".pid")
        self.port, self.address = port, address
        listen = ["-U", str(self.socket)] if port is None else ["-i", address, "-p", str(port)]
        self.argv = [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            *listen,
            "-P",
            str(self.pidfile),
            "-t",
            str(threads),
            *(["-r"] if readonly else []),
            *(f"--filter={f}" for f in filters),
            *plugin,
            *params,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.port is not None:
            return f"nbd://{self.address}:{self.port}/"
        return f"nbd+unix:///?socket={self.socket}"

    def start(self, timeout: float = 10.0) -> Nbdkit:
        """Starts the server (again, on the same socket) and waits until it accepts."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("nbdkit is already running")
        for stale in (self.socket, self.pidfile):
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nbdkit exited ({self.proc.returncode}): {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nbdkit did not come up within {timeout} s: {self.argv}")
            time.sleep(0.005)
        return self

    def kill(self) -> None:
        """Takes the server away at once (SIGKILL), as a crash or a lost network would."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP: a server that stops answering (a hang, a partition without a reset).

        Returns once every thread of it is stopped: kill() returns before that, and a
        worker still running could answer a request sent just after."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + timeout
        while not all(_state(t) == "T" for t in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nbdkit {self.proc.pid} did not stop")
            time.sleep(0.001)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Nbdkit:
        return self.start() if self.proc is None else self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _state(task: Path) -> str:
    """A thread's scheduler state from /proc (after the ")" that ends its name)."""
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"  # an exited thread answers nothing either
