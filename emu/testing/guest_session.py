"""A real guest booted on emu's devices, driven by shell commands: ``emu_guest``'s object.

``GuestParam`` says which guest: ``kind`` (uml or microvm), what serves its disk
(``blk``: emu, qsd for qemu-storage-daemon, qemu for QEMU's built-in virtio-blk under
microvm, none), more devices served by ``emu serve`` (``extra`` specs such as ``rng``),
its RAM and emu's quiesce policy. It parses from a short string: ``"microvm-qsd"``.

``EmuGuest`` boots it with the disk (a sparse file of ``disk_mib`` at ``guest.disk``,
/dev/vda in the guest), the backends, and /init running emu.testing.guest_shell's loop.
``run(cmd)`` gives (rc, output); ``stop()`` powers the guest off; ``snapshot(dir)`` and
``restore(dir)`` (microvm only: UML has no snapshot) save and bring back the whole guest:
QEMU's migration stream, emu's device states (``emu serve --state-dir``) and a copy of the
disk, so that a restore also works in another test or process. ``close()`` ends whatever
still runs; every process is started under emu.guest's reaper, so none outlives the test
run either.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import emu
from emu.devices import registry
from emu.guest import microvm, qsd, uml, vm
from emu.guest.backends import guest_devices
from emu.guest.devices import Device
from emu.guest.images import KINDS, GuestImage, build_image
from emu.guest.proc import start, stop
from emu.guest.run import kernel_args
from emu.testing.guest_shell import SHELL, Console, GuestError

BLK_BACKENDS = ("emu", "qsd", "qemu", "none")
#: a guest must get this far in this long even on 2 busy cores under TCG; else it hangs
BOOT_TIMEOUT = 120.0
RUN_TIMEOUT = 60.0
_READY = re.compile(r"EMU-SHELL-READY")
SNAPSHOT_FILE = "guest.json"


@dataclass(frozen=True)
class GuestParam:
    """Which guest ``emu_guest`` boots (see the module docstring)."""

    kind: str = "uml"
    blk: str = "emu"
    extra: tuple[str, ...] = ()
    disk_mib: int = 16
    mem_mib: int = 256
    policy: str = "drain"

    def __post_init__(self) -> None:
        if isinstance(self.extra, str):  # tuple("rng") would be the specs r, n and g
            raise ValueError(f"extra is a list of device specs, e.g. [{self.extra!r}]")
        object.__setattr__(self, "extra", tuple(self.extra))
        for name in ("disk_mib", "mem_mib"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r} (a whole number of MiB, at least 1)")
        if self.kind not in KINDS:
            raise ValueError(f"guest kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.blk not in BLK_BACKENDS:
            raise ValueError(f"blk backend {self.blk!r} (one of {', '.join(BLK_BACKENDS)})")
        if self.blk == "qemu" and self.kind != "microvm":
            raise ValueError("QEMU's own virtio-blk (blk=qemu) needs kind=microvm")
        if self.policy not in ("drain", "report"):
            raise ValueError(f"policy {self.policy!r} (drain or report)")
        for spec in self.extra:
            registry.get(registry.parse_spec(spec).kind)  # a SpecError names what is wrong

    @classmethod
    def parse(cls, spec: str | GuestParam | dict | None) -> GuestParam:
        """``"uml"``, ``"microvm-qsd"`` (KIND[-BLK]), a dict of the fields, a GuestParam or
        None (the defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, GuestParam):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if not isinstance(spec, str):
            raise TypeError(
                f"guest param {spec!r}: a string such as 'microvm-qsd', a dict or a GuestParam"
            )
        kind, _, blk = spec.partition("-")
        return cls(kind, blk or "emu")

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.blk}"

    def tools(self) -> list[str]:
        """Host programs this guest needs."""
        need = [microvm.QEMU] if self.kind == "microvm" else []
        return need + ([qsd.QSD] if self.blk == "qsd" else [])


def unavailable(param: GuestParam) -> str | None:
    """Why this machine cannot run the guest (None: it can, as far as a cheap look
    tells; the image is built, or found in the cache, when the guest boots)."""
    if not sys.platform.startswith("linux"):
        return f"guests need Linux, not {sys.platform}"
    for tool in param.tools():
        if shutil.which(tool) is None:
            return f"{tool} is not installed (emu's scripts/install-guest-deps.sh installs it)"
    if param.kind == "uml":
        shm = os.environ.get("TMPDIR") or "/dev/shm"
        if not os.access(shm, os.W_OK | os.X_OK):
            return f"UML keeps guest RAM in {shm}, which is not writable here"
        try:
            scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
        except (OSError, ValueError):
            scope = 0
        if scope >= 3:
            return "UML needs ptrace, which kernel.yama.ptrace_scope=3 forbids"
    return None


class EmuGuest:
    """One guest and its backends in ``workdir`` (see the module docstring)."""

    def __init__(
        self, param: GuestParam, workdir: str | os.PathLike, image: GuestImage | None = None
    ) -> None:
        self.param = param
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image = image or build_image(param.kind)
        self.disk = self.dir / "disk.img"
        with open(self.disk, "wb") as f:
            f.truncate(param.disk_mib << 20)
        self.state_dir = self.dir / "state"
        self.state_dir.mkdir(exist_ok=True)
        self._qmp_path = self.dir / "qmp.sock"
        self._stack = ExitStack()  # the running guest's processes, ended last in first out
        self._proc: subprocess.Popen | None = None
        self._console: Console | None = None
        self._qmp: vm.Qmp | None = None
        self.transcript: list[str] = []  # console lines of the guests ended so far
        self._sockets: list[Path] = []
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    # -- what a test does --

    @property
    def pid(self) -> int | None:
        """The guest's process (its reaper: ending it ends everything the guest started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run(self, cmd: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
        """(exit status, stdout and stderr) of ``cmd``, run by ``sh`` in the guest's /root
        with stdin from /dev/null. Each command has a shell of its own (no ``cd`` or
        variable carries over). GuestError if the guest is not running or does not
        answer within ``timeout`` seconds."""
        if not self.running or self._console is None:
            raise GuestError(f"the {self.param.kind} guest is not running")
        return self._console.run(cmd, timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Power the guest off (its shell loop ends, /init syncs and powers off) and end
        its backends; the guest process's exit status (None: it had to be killed)."""
        if self._proc is None:
            return None
        proc, status = self._proc, None
        if self.running and self._console is not None:
            try:
                self._console.send("EMU-EXIT\n")
                status = proc.wait(timeout)
            except (GuestError, subprocess.TimeoutExpired):
                status = None
        self._end()
        return status

    def snapshot(self, path: str | os.PathLike) -> Path:
        """Save the whole guest into directory ``path`` and let it run on: the VM (QEMU's
        migration stream), emu's device states and a copy of the disk. microvm only."""
        self._need_snapshots()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        qmp = self._need_qmp()
        for old in self.state_dir.glob("*.state"):
            old.unlink()
        qmp.execute("stop")
        qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(out / 'vm.mig'))}")
        info = self._wait_migration(qmp)
        if info.get("status") != "completed":
            qmp.execute("cont")  # the guest runs on as it was
            raise GuestError(f"snapshot failed: {info}\n{self._tail()}")
        for sock in self._sockets:  # written by emu serve at the stop
            saved = self.state_dir / f"{sock.name}.state"
            vm.wait_until(saved.exists, f"emu serve's state file {saved}", 30.0)
            shutil.copyfile(saved, out / saved.name)
        _copy_sparse(self.disk, out / "disk.img")
        (out / SNAPSHOT_FILE).write_text(json.dumps(asdict(self.param), indent=1) + "\n")
        qmp.execute("cont")
        return out

    def restore(self, path: str | os.PathLike) -> None:
        """End the running guest and go on from the snapshot in ``path`` (made by this
        guest or another with the same param): its disk copy becomes the disk."""
        self._need_snapshots()
        src = Path(path)
        saved = GuestParam(**json.loads((src / SNAPSHOT_FILE).read_text()))
        if saved != self.param:
            raise ValueError(f"snapshot {src} is of a {saved}, this guest is a {self.param}")
        self._end()
        _copy_sparse(src / "disk.img", self.disk)
        self._boot(restore=src)

    def close(self) -> None:
        """End the guest and its backends, whatever state they are in."""
        self._end()

    def __enter__(self) -> EmuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- how --

    def _need_snapshots(self) -> None:
        if self.param.kind != "microvm":
            raise NotImplementedError(
                "UML has no snapshot (no way to save a running UML guest); use kind=microvm"
            )

    def _need_qmp(self) -> vm.Qmp:
        if not self.running or self._qmp is None:
            raise GuestError(f"the {self.param.kind} guest is not running")
        return self._qmp

    def _wait_migration(self, qmp: vm.Qmp) -> dict:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            info: dict = qmp.execute("query-migrate")  # type: ignore[assignment]
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                return info
            time.sleep(0.02)

    def _devices(self, restore: Path | None) -> list[Device]:
        """Start the backends (kept in ``_stack``); the devices to attach."""
        p = self.param
        specs = ([f"blk:{self.disk}"] if p.blk == "emu" else []) + list(p.extra)
        devices: list[Device] = []
        if p.blk == "qsd":
            sock = self.dir / "qsd-blk.sock"
            self._stack.enter_context(qsd.blk_export(self.disk, sock))
            devices.append(Device("blk", str(sock)))
        elif p.blk == "qemu":
            devices.append(Device("qemu-blk", str(self.disk)))
        self._sockets = []
        if specs:
            kinds = [registry.parse_spec(s).kind for s in specs]
            self._sockets = [self.dir / f"emu{i}-{k}.sock" for i, k in enumerate(kinds)]
            self._serve(specs, restore)
            devices += guest_devices(p.kind, specs, self._sockets)
        return devices

    def _serve(self, specs: list[str], restore: Path | None) -> None:
        """``emu serve`` from this very emu package (not whatever ``-m`` finds in the
        working directory), saving device states at every stop for ``snapshot``."""
        cmd = [sys.executable, "-P", "-m", "emu.cli", "serve", "--policy", self.param.policy]
        cmd += ["--state-dir", str(self.state_dir)]
        if restore is not None:
            cmd += ["--restore-dir", str(restore)]
        for sock in self._sockets:
            sock.unlink(missing_ok=True)  # a stale file would pass for a listening backend
            cmd += ["--socket", str(sock)]
        env = dict(os.environ)
        here = str(Path(emu.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        log = open(self.dir / "serve.log", "ab")
        self._stack.callback(log.close)
        proc = start([*cmd, *specs], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self._stack.callback(stop, proc)
        try:
            vm.wait_until(
                lambda: all(s.exists() for s in self._sockets) or proc.poll() is not None,
                "emu serve",
                30.0,
            )
        except TimeoutError as e:
            raise GuestError(f"{e}: see {self.dir / 'serve.log'}") from None
        if proc.poll() is not None:
            text = (self.dir / "serve.log").read_text(errors="replace")[-2000:]
            raise GuestError(f"emu serve exited with status {proc.returncode}:\n{text}")

    def _boot(self, restore: Path | None = None) -> None:
        """Backends, then the guest; up to its shell's READY, or (``restore``) running on
        from the snapshot."""
        proc = start(
            self._command(self._devices(restore), restore),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._proc = proc
        self._stack.callback(self._reap, proc)
        assert proc.stdin is not None and proc.stdout is not None
        self._console = Console(proc.stdin, proc.stdout)
        if self.param.kind == "microvm":
            self._qmp = self._connect_qmp(proc)
        if restore is None:
            self._console.wait_for(_READY, 0, BOOT_TIMEOUT)
            return
        qmp = self._need_qmp()
        vm.wait_until(
            lambda: qmp.execute("query-status")["status"] == "paused",  # type: ignore[index]
            "the incoming snapshot",
            BOOT_TIMEOUT,
        )
        qmp.execute("cont")

    def _command(self, devices: list[Device], restore: Path | None) -> list[str]:
        p = self.param
        script = base64.b64encode(SHELL.encode()).decode()
        append = kernel_args(["script"], {"script": script}, True)
        if p.kind == "uml":
            return uml.command(self.image, devices, append, p.mem_mib)
        self._qmp_path.unlink(missing_ok=True)
        incoming = None if restore is None else f"exec:cat {shlex.quote(str(restore / 'vm.mig'))}"
        return vm.qemu_command(
            self.image, devices, self._qmp_path, append, p.mem_mib, incoming=incoming
        )

    def _connect_qmp(self, proc: subprocess.Popen) -> vm.Qmp:
        """QMP, or a GuestError at once with QEMU's complaint if QEMU ends (a refused
        argument ends it right after it opened the QMP socket)."""
        vm.wait_until(
            lambda: self._qmp_path.exists() or proc.poll() is not None, "QMP", BOOT_TIMEOUT
        )
        try:
            if proc.poll() is not None:
                raise ConnectionError("no QMP socket")
            return vm.Qmp(self._qmp_path)
        except OSError as e:  # ConnectionError included
            assert self._console is not None
            self._console.close()  # every line QEMU printed is in
            status = proc.wait(10)
            raise GuestError(f"QEMU failed ({e}), status {status}:\n{self._tail()}") from None

    def _reap(self, proc: subprocess.Popen) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        stop(proc)
        if self._console is not None:
            self._console.close()
            self.transcript += self._console.lines
            self._console = None
        if proc.stdout is not None:
            proc.stdout.close()

    def _end(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._proc = None

    def _tail(self) -> str:
        return self._console.tail() if self._console is not None else ""


def _copy_sparse(src: Path, dst: Path, block: int = 1 << 20) -> None:
    """Copy a disk image leaving its unwritten blocks holes (a 16 MiB disk the guest
    wrote a few KiB of stays a few KiB on the host)."""
    zero = bytes(block)
    with open(src, "rb") as i, open(dst, "wb") as o:
        while chunk := i.read(block):
            if chunk == zero[: len(chunk)]:
                o.seek(len(chunk), os.SEEK_CUR)
            else:
                o.write(chunk)
        o.truncate(i.tell())


__all__ = ["EmuGuest", "GuestError", "GuestParam", "unavailable"]
