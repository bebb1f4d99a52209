"""Child processes (guests, reference backends) that never outlive the test or command.

A guest left behind by a killed pytest keeps its backend's socket and CPU busy, and UML
forks helpers (after a setsid()) that survive the guest itself. So each child runs under
reaper.py, which kills everything the child started when the child exits, when asked to
stop, and when the thread that started it goes away, however that happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

_REAPER = Path(__file__).with_name("reaper.py")


def start(cmd: list[str], **popen_args) -> subprocess.Popen:
    """Popen(cmd) under the reaper, in a session of its own."""
    wrapped = [sys.executable, "-S", str(_REAPER), str(os.getpid()), *cmd]
    return subprocess.Popen(wrapped, start_new_session=True, **popen_args)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Ends a child started by `start` and everything it spawned."""
    if proc.poll() is None:
        proc.terminate()  # the reaper kills its descendants, then itself
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
