"""Progress of the long steps on stderr, as click's progress bar, when stderr is a
terminal (a CI log or a pipe gets nothing: its readers want the report, not the bar)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import click

T = TypeVar("T")


def steps(items: Sequence[T], label: str, show: Callable[[T], str] | None = None) -> Iterator[T]:
    """Each of ``items`` in turn; a bar labelled ``label`` while they run (``show`` names
    the one under way)."""
    if not sys.stderr.isatty():
        yield from items
        return
    with click.progressbar(
        items,
        label=label,
        file=sys.stderr,
        item_show_func=(lambda x: None if x is None else show(x)) if show else None,
    ) as bar:
        yield from bar
