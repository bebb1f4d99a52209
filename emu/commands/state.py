"""``emu state``: inspect snapshot files."""

from __future__ import annotations

import json

import click

from emu.state.file import load
from emu.state.format import StateError
from emu.state.parts import device_part, to_json


def _schemas(device_type: int) -> dict:
    """The device part's schema, when emu knows the device type (else shown as JSON)."""
    from emu.devices.blk import BlkDevice
    from emu.devices.console import ConsoleDevice
    from emu.devices.net import NetDevice
    from emu.devices.rng import RngDevice

    for cls in (BlkDevice, ConsoleDevice, NetDevice, RngDevice):
        if cls.device_id == device_type:
            return {device_part(device_type): cls.state_schema}
    return {}


@click.group("state")
def command() -> None:
    """Inspect device state (snapshot) files."""


@command.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
def show(path: str) -> None:
    """Print a state file as JSON (refuses corrupt or incompatible files)."""
    try:
        state = load(path)
        click.echo(json.dumps(to_json(state, _schemas(state.device_type)), indent=2))
    except StateError as e:
        raise click.ClickException(str(e)) from None
