"""`python reaper.py PARENT_PID CMD...`: run CMD and make sure nothing it started outlives it.

UML calls setsid() and forks helpers, so neither a process group nor PDEATHSIG on the
guest catches everything. The reaper is a child subreaper instead: every orphaned
descendant is re-parented to it, so it can find them all under /proc and kill them. It
does so when CMD exits, on SIGTERM (how emu ends a guest) and when PARENT_PID, the
process that started it, dies. Standard library only: it runs under `python -S`.
"""

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _kill_descendants() -> None:
    me = os.getpid()
    while kids := _children(me):
        stack = list(kids)
        while stack:
            pid = stack.pop()
            stack += _children(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in kids:  # reap, so /proc stops listing them as our children
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break


def _die(*_: object) -> None:
    _kill_descendants()
    os._exit(137)


def main() -> int:
    parent, cmd = int(sys.argv[1]), sys.argv[2:]
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, _die)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before PDEATHSIG was set
        _die()
    rc = subprocess.call(cmd)
    _kill_descendants()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
