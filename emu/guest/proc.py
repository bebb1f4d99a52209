"""Child processes (guests, reference backends) that never outlive the test or command.

A guest left behind by a killed pytest keeps its backend's socket and CPU busy, and UML
forks helpers (after a setsid()) that survive the guest itself. So each child runs under
reaper.py, which kills everything the child started when the child exits, when asked to
stop, and when the thread that started it goes away, however that happens.

The reaper itself can be killed with SIGKILL (a test "crashing" its guest through
``emu_guest.pid``), which it cannot catch: UML and its helpers then live on, re-parented
away from anything that knows them. So every child also carries a tag of its own in its
environment, which its descendants inherit, and ``stop`` ends whatever still carries it.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

_REAPER = Path(__file__).with_name("reaper.py")
#: the environment variable that tags a child started here and all it starts
TAG = "EMU_REAPER_TAG"
_serial = itertools.count()
#: running children that print their state on a signal (``start(report=...)``), and the
#: signal: a guest that overran asks them before it is killed (``ask_reports``)
_REPORTING: dict[subprocess.Popen, int] = {}


def start(cmd: list[str], report: int | None = None, **popen_args) -> subprocess.Popen:
    """Popen(cmd) under the reaper, in a session of its own, tagged for ``stop``.
    ``report``: the signal on which ``cmd`` prints its state (emu serve: SIGUSR1)."""
    wrapped = [sys.executable, "-S", str(_REAPER), str(os.getpid()), *cmd]
    tag = f"{os.getpid()}.{next(_serial)}.{os.urandom(4).hex()}"
    env = dict(popen_args.pop("env", None) or os.environ)
    env[TAG] = tag
    proc = subprocess.Popen(wrapped, start_new_session=True, env=env, **popen_args)
    proc.emu_tag = tag  # type: ignore[attr-defined]
    if report is not None:
        _REPORTING[proc] = report
    return proc


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (for a child of ``start``: its command)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def ask_reports() -> int:
    """Every running child started with ``report`` gets its signal (its command does,
    not the reaper); how many were asked. They print to their own stderr."""
    asked = 0
    for proc, sig in list(_REPORTING.items()):
        for pid in children(proc.pid) if proc.poll() is None else []:
            try:
                os.kill(pid, sig)
                asked += 1
            except ProcessLookupError:
                pass
    return asked


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Ends a child started by `start` and everything it spawned."""
    _REPORTING.pop(proc, None)
    if proc.poll() is None:
        proc.terminate()  # the reaper kills its descendants, then itself
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    tag = getattr(proc, "emu_tag", None)
    if tag is not None:
        kill_tagged(tag)


def kill_tagged(tag: str) -> int:
    """SIGKILL every process whose environment carries ``TAG=tag`` (what a reaper that
    was itself killed left behind); how many there were."""
    needle = f"\0{TAG}={tag}\0".encode()
    killed = 0
    for _ in range(2):  # a second look: one may have forked while the first went by
        found = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    env = b"\0" + f.read()
                if needle in env:
                    os.kill(int(entry.name), signal.SIGKILL)
                    found += 1
            except (OSError, ProcessLookupError):  # gone, or not ours to read
                continue
        killed += found
        if not found:
            break
    return killed
