"""``emu state``: inspect snapshot files."""

from __future__ import annotations

import json

import click

from emu.devices import registry
from emu.state.breakdown import breakdown
from emu.state.file import load
from emu.state.format import StateError
from emu.state.parts import to_json


@click.group("state")
def command() -> None:
    """Inspect device state (snapshot) files."""


@command.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--breakdown",
    "as_breakdown",
    is_flag=True,
    help="Part by part: virtio 1.4 or emu extension, bytes, and a device part's fields "
    "(lists of objects, e.g. the fs device's nodes and handles, as tables).",
)
def show(path: str, as_breakdown: bool) -> None:
    """Print a state file as JSON (refuses corrupt or incompatible files)."""
    try:
        state = load(path)
        if as_breakdown:
            click.echo("\n".join(breakdown(state, registry.schemas())))
        else:
            click.echo(json.dumps(to_json(state, registry.schemas()), indent=2))
    except StateError as e:
        raise click.ClickException(str(e)) from None
