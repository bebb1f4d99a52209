"""A guest booted in the background, its console followed line by line while it runs.

For tests and benches where the host acts during the guest's workload (vsock streams,
a balloon target): `BackgroundGuest(...)` runs `run_guest` on a thread of its own (the
guest's reaper ties the guest to that thread) and keeps every console line, so the host
can wait for a marker (`wait_for`) and read progress (`last`) before the result. As a
context manager it ends a guest still running when the block ends (a failed test).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from emu.guest.proc import stop
from emu.guest.run import DeviceSpec, GuestResult, run_guest


class GuestEnded(RuntimeError):
    """The guest ended (or failed to start) before the awaited line came."""


class BackgroundGuest:
    """`run_guest(kind, devices, run, **kwargs)` on a thread; `result()` waits for it."""

    def __init__(
        self, kind: str, devices: Iterable[DeviceSpec], run: Iterable[str], **kwargs
    ) -> None:
        self.lines: list[str] = []
        self._partial = ""
        self._changed = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"guest-{kind}")
        self.future: Future[GuestResult] = self._pool.submit(
            run_guest,
            kind,
            list(devices),
            list(run),
            on_output=self._feed,
            on_start=self._started,
            **kwargs,
        )
        self.future.add_done_callback(lambda _: self._notify())

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        if self._stopping:  # stop() came while the image was being built
            stop(proc)

    def _feed(self, text: str) -> None:
        *complete, self._partial = (self._partial + text).split("\n")
        with self._changed:
            self.lines += complete
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def matching(self, text: str) -> list[str]:
        """Console lines containing `text`, from the marker on (kernel noise may precede it)."""
        with self._changed:
            return [ln[ln.index(text) :] for ln in self.lines if text in ln]

    def last(self, text: str) -> str | None:
        found = self.matching(text)
        return found[-1] if found else None

    def wait_for(self, text: str, timeout: float = 60.0, count: int = 1) -> str:
        """The `count`-th line containing `text` (from the marker on), waiting up to
        `timeout`; GuestEnded if the guest ends first, TimeoutError after."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [ln for ln in self.lines if text in ln]
                if len(found) >= count:
                    line = found[count - 1]
                    return line[line.index(text) :]
                if self.future.done():
                    raise GuestEnded(f"the guest ended before {text!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {text!r} after {timeout:g} s:\n{self.tail()}")
                self._changed.wait(min(left, 0.5))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def result(self, timeout: float | None = None) -> GuestResult:
        try:
            return self.future.result(timeout)
        finally:
            if self.future.done():
                self._pool.shutdown(wait=False)

    def stop(self) -> None:
        """Ends the guest if it still runs, and waits for run_guest to return."""
        self._stopping = True
        if self._proc is not None:
            stop(self._proc)
        try:
            self.future.exception(30)
        finally:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> BackgroundGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
