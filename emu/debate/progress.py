"""Progress of the long steps on stderr, as emu's other long work shows it
(``emu.progress``): click's bar on a terminal, lines in a log when asked for with
``emu --progress``, nothing with ``--no-progress`` (EMU_PROGRESS) or in a log by default."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from emu.progress import progress

T = TypeVar("T")


def steps(items: Sequence[T], label: str, show: Callable[[T], str] | None = None) -> Iterator[T]:
    """Each of ``items`` in turn; progress labelled ``label`` while they run (``show``
    names the one under way)."""
    with progress(label, len(items)) as bar:
        for item in items:
            bar.update(0, show(item) if show else None)
            yield item
            bar.update(1)
