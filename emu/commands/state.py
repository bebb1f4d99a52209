"""``emu state``: inspect snapshot files."""

from __future__ import annotations

import json

import click

from emu.devices import registry
from emu.state.file import load
from emu.state.format import StateError
from emu.state.parts import to_json


@click.group("state")
def command() -> None:
    """Inspect device state (snapshot) files."""


@command.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
def show(path: str) -> None:
    """Print a state file as JSON (refuses corrupt or incompatible files)."""
    try:
        state = load(path)
        click.echo(json.dumps(to_json(state, registry.schemas()), indent=2))
    except StateError as e:
        raise click.ClickException(str(e)) from None
