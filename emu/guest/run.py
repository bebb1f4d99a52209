"""Boot a guest, stream its console, and hand back what its /init reported.

The guest runs in its own session so that a timeout can end UML's helper processes
along with it, and that session dies with the calling thread (proc.py).
"""

from __future__ import annotations

import codecs
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from emu.guest import microvm, uml
from emu.guest.console import ConsoleLog
from emu.guest.devices import Device
from emu.guest.images import GuestImage, build_image
from emu.guest.proc import ask_reports, start, stop

DeviceSpec = str | tuple[str, str] | Device
_COMMAND = {"uml": uml.command, "microvm": microvm.command}
_DEFAULT_MEM_MIB = {"uml": 256, "microvm": 512}
#: seconds a guest that overran is left alive while emu serve reports (it waits up to 1 s
#: for a device thread)
REPORT_WAIT = 1.5


@dataclass
class GuestResult:
    kind: str
    command: list[str]
    exit_status: int | None  # of the guest process; None when it was killed at the timeout
    timed_out: bool
    console: str
    log: ConsoleLog  # everything the markers said
    boot_s: float | None  # process start -> /init's first line
    wall_s: float  # process start -> process end

    @property
    def rc(self) -> int | None:
        """/init's overall status (EMU-DONE rc=), None if it never got there."""
        return self.log.rc

    @property
    def results(self) -> dict[str, str]:
        return self.log.results

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.rc == 0

    def summary(self) -> dict:
        """A JSON-friendly digest (no console text)."""
        return {
            "kind": self.kind,
            "rc": self.rc,
            "exit_status": self.exit_status,
            "timed_out": self.timed_out,
            "boot_s": self.boot_s,
            "wall_s": self.wall_s,
            "steps": self.log.steps,
            "results": self.log.results,
            "devices": self.log.devices,
            "bench": {k: {"value": v, "unit": u} for k, (v, u) in self.log.bench.items()},
            "warnings": self.log.warnings,
        }


def kernel_args(run: Iterable[str], params: Mapping[str, object], quiet: bool) -> list[str]:
    """The guest's `emu.*` arguments; `params` keys may omit the `emu.` prefix."""
    args = ["quiet"] if quiet else []
    args.append("emu.run=" + ",".join(run))
    for key, value in params.items():
        name = key if key.startswith("emu.") else f"emu.{key}"
        if " " in str(value):
            raise ValueError(f"kernel argument {name}: spaces cannot be passed ({value!r})")
        args.append(f"{name}={value}")
    return args


def needs_fio(run: Iterable[str], params: Mapping[str, object]) -> bool:
    """Whether the image needs the fio layer: the fio workload, or fs's `rand` pass."""
    passes = str(params.get("fs.do", params.get("emu.fs.do", ""))).split(",")
    return "fio" in run or ("fs" in run and "rand" in passes)


def needs_socat(run: Iterable[str]) -> bool:
    """Whether the image needs the socat layer: the vsock workload speaks through it."""
    return "vsock" in run


def image_layers(run: Iterable[str], params: Mapping[str, object]) -> dict[str, bool]:
    """build_image's layer arguments for these workloads."""
    run = list(run)
    return {"fio": needs_fio(run, params), "socat": needs_socat(run)}


def with_fs_tag(devices: Iterable[Device], params: Mapping[str, object]) -> dict[str, object]:
    """`params` plus `fs.tag` from the first fs device's `tag=`, unless given: the guest
    mounts the tag its device was attached with."""
    out = dict(params)
    if "fs.tag" not in out and "emu.fs.tag" not in out:
        tags = [d.tag for d in devices if d.tag is not None]
        if tags:
            out["fs.tag"] = tags[0]
    return out


def _pump(stream: IO[bytes], log: ConsoleLog, lines: list[str], on_output, marks: dict) -> None:
    """Copies console output as it comes (prompts have no newline) and parses whole lines."""
    partial = ""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split chars
    while chunk := os.read(stream.fileno(), 65536):
        text = decoder.decode(chunk).replace("\r", "")
        if on_output is not None:
            on_output(text)
        *complete, partial = (partial + text).split("\n")
        for line in complete:
            lines.append(line + "\n")
            if log.feed(line) == "INIT-START":
                marks["init"] = time.monotonic()
    if partial:
        lines.append(partial)
        log.feed(partial)


def run_guest(
    kind: str,
    devices: Iterable[DeviceSpec] = (),
    run: Iterable[str] = ("devices",),
    *,
    timeout: float = 120.0,
    params: Mapping[str, object] | None = None,
    image: GuestImage | None = None,
    mem_mib: int | None = None,
    cpus: int = 1,
    quiet: bool = True,
    interactive: bool = False,
    on_output: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> GuestResult:
    """Boots a `kind` ("uml" or "microvm") guest and waits for it to power off.

    devices: "blk:/path/sock", ("net", sock) or Device; the backends must already listen.
    run: workloads for /init (init_script.py), in order. params: their knobs, e.g.
    {"blk.mib": 8}. image: a prebuilt image (default: build/cached by build_image, with
    the fio layer when `run` has fio or fs's rand pass, the socat layer for vsock).
    cpus: vCPUs (microvm only; a multi-queue disk uses as many queues as the guest has CPUs).
    interactive: give the guest this process's stdin (for the `sh` workload).
    on_output: called with console text as it arrives (e.g. to show it live).
    on_start: called with the guest's process once started (proc.stop ends it early).
    """
    if kind not in _COMMAND:
        raise ValueError(f"unknown guest kind {kind!r}")
    devs = [Device.parse(d) for d in devices]
    for dev in devs:
        if dev.vhost_user and not Path(dev.path).exists():
            raise FileNotFoundError(f"{dev.type} backend socket {dev.path} does not exist")
    run = list(run)
    params = with_fs_tag(devs, params or {})
    append = kernel_args(run, params, quiet)
    image = image or build_image(kind, **image_layers(run, params))
    cmd = _COMMAND[kind](image, devs, append, mem_mib or _DEFAULT_MEM_MIB[kind], cpus)

    log, lines, marks = ConsoleLog(), [], {}
    t0 = time.monotonic()
    proc = start(
        cmd,
        stdin=None if interactive else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if on_start is not None:
        on_start(proc)
    pump = threading.Thread(
        target=_pump, args=(proc.stdout, log, lines, on_output, marks), daemon=True
    )
    pump.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        if ask_reports():  # emu serve says what the guest waits for (stderr), then it goes
            time.sleep(REPORT_WAIT)
    finally:
        stop(proc)
        pump.join(10.0)  # the reaper leaves nothing behind that holds the pipe open
    proc.stdout.close()
    end = time.monotonic()
    return GuestResult(
        kind=kind,
        command=cmd,
        exit_status=None if timed_out else proc.returncode,
        timed_out=timed_out,
        console="".join(lines),
        log=log,
        boot_s=marks["init"] - t0 if "init" in marks else None,
        wall_s=end - t0,
    )
