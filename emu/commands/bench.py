"""``emu bench``: measurements that write a report."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click


@click.group("bench")
def command() -> None:
    """Measure emu and write the figures as a report."""


@command.command("debate")
@click.option(
    "--quick", is_flag=True, help="Fewer samples and cells (about 20 s on 2 cores; what CI runs)."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("debate-report"),
    show_default=True,
    help="Directory for report.md, report.html, the PNG plots, results.json and CSVs.",
)
def debate(quick: bool, out: Path) -> None:
    """The virtio-comment STOP thread answered with numbers: stop latency by interface,
    drain vs report against backend latency, what carries each device's state, and
    cross-implementation restores (needs nbdkit for the NBD backends)."""
    from emu.debate import report
    from emu.testing.nbdkit import nbdkit_missing

    if (why := nbdkit_missing()) is not None:
        raise click.ClickException(why)
    _writable(out)  # before the run, not after it: a bad --out must not cost its results
    results = report.collect(quick)
    try:
        files = report.write(results, out)
    except OSError as e:
        raise click.ClickException(f"cannot write the report into {out}: {e}") from None
    for role, path in files.items():
        click.echo(f"{role:<9} {path}")


def _writable(out: Path) -> None:
    """``out`` made, and a file written and removed in it; a ClickException if not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise click.ClickException(f"--out {out}: cannot write there: {e}") from None
