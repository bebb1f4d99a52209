"""Progress on long work: guest image builds, package downloads, benchmark rounds, migrations.

Shown on stderr, and only where someone is watching: when stderr is a terminal, or when
asked (``emu --progress``, a bench's ``--progress``, or ``EMU_PROGRESS=1`` in the
environment, which the processes emu starts inherit). ``EMU_PROGRESS=0``
(``emu --no-progress``) hides it on a terminal too. Never on stdout: benches print
``name value unit`` lines there, ``emu state show --json`` prints JSON.

On a terminal it is click's progress bar, redrawn in place. Asked for where stderr is
not a terminal (a CI log), it is a plain line now and then (at most every
``LOG_EVERY`` seconds, and at the end), which a log keeps readable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, TextIO, TypeVar

import click

ENV = "EMU_PROGRESS"
#: seconds between two lines when progress goes to a log, not a terminal
LOG_EVERY = 5.0
_ON = ("1", "on", "yes", "true")
_OFF = ("0", "off", "no", "false")


def wanted(stream: TextIO | None = None) -> bool:
    """Whether progress is shown: asked for or refused in the environment, else whether
    ``stream`` (stderr) is a terminal."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _ON:
        return True
    if setting in _OFF:
        return False
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def ask(on: bool | None) -> None:
    """``--progress`` (True) or ``--no-progress`` (False) for this process and the ones it
    starts; None (neither given) leaves the environment's choice."""
    if on is not None:
        os.environ[ENV] = "1" if on else "0"


class Progress(Protocol):
    def update(self, n: int = 1, item: str | None = None) -> None:
        """``n`` more steps done; ``item``: what is being worked on now."""

    def clear(self) -> None:
        """Take the bar off the terminal line before printing to stdout (which may be
        the same terminal); the next update draws it again."""

    def __enter__(self) -> Progress: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _Quiet:
    """Progress nobody watches: costs nothing."""

    def update(self, n: int = 1, item: str | None = None) -> None:
        pass

    def clear(self) -> None:
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Bar:
    """click's progress bar on a terminal; ``item`` shows after it."""

    def __init__(self, label: str, length: int, stream: TextIO) -> None:
        self.stream = stream
        self._bar = click.progressbar(
            length=max(length, 1),
            label=label,
            file=stream,
            show_pos=True,
            item_show_func=lambda item: item,
        )

    def update(self, n: int = 1, item: str | None = None) -> None:
        self._bar.update(n, item)

    def clear(self) -> None:
        self.stream.write("\r\033[K")  # back to the line's start, erase to its end
        self.stream.flush()

    def __enter__(self) -> _Bar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)


class _Lines:
    """For a log: ``label: pos/length (pct) item`` every LOG_EVERY seconds and at the end."""

    def __init__(self, label: str, length: int, stream: TextIO) -> None:
        self.label, self.length, self.stream = label, max(length, 1), stream
        self.pos = 0
        self.start = self.last = time.monotonic()

    def _line(self, tail: str) -> None:
        pct = 100 * min(self.pos, self.length) // self.length
        self.stream.write(f"{self.label}: {self.pos}/{self.length} ({pct}%){tail}\n")
        self.stream.flush()

    def update(self, n: int = 1, item: str | None = None) -> None:
        self.pos += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY:
            self.last = now
            self._line(f" {item}" if item else "")

    def clear(self) -> None:
        pass  # lines in a log: nothing to take back

    def __enter__(self) -> _Lines:
        self._line(" started")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        how = "failed" if exc_type is not None else "done"
        self._line(f" {how} in {time.monotonic() - self.start:.1f} s")


def progress(label: str, length: int, stream: TextIO | None = None) -> Progress:
    """A progress display of ``length`` steps, for a ``with`` block; nothing unless
    ``wanted()``."""
    stream = stream or sys.stderr
    if not wanted(stream):
        return _Quiet()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return _Bar(label, length, stream) if tty else _Lines(label, length, stream)


T = TypeVar("T")


def steps(items: Sequence[T], label: str, show: Callable[[T], str] | None = None) -> Iterator[T]:
    """Each of ``items`` in turn; progress labelled ``label`` while they run (``show``
    names the one under way)."""
    with progress(label, len(items)) as bar:
        for item in items:
            bar.update(0, show(item) if show else None)
            yield item
            bar.update(1)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` for a bench script (then ``ask(args.progress)``)."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: when stderr is a terminal); stdout is unchanged",
    )
