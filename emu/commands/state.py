"""``emu state``: inspect snapshot files, and compare two."""

from __future__ import annotations

import json

import click

from emu.devices import registry
from emu.state import diff as statediff
from emu.state.breakdown import breakdown
from emu.state.file import load
from emu.state.format import StateError
from emu.state.parts import to_json
from emu.state.summary import summary
from emu.state.text import printable
from emu.state.view import view


class _Trouble(click.ClickException):
    """A file ``emu state diff`` cannot compare: exit 2, as diff(1) does (1 means
    "they differ")."""

    exit_code = 2


@click.group("state")
def command() -> None:
    """Inspect device state (snapshot) files."""


def _names() -> dict[int, str]:
    return {t.device_id: t.name for t in registry.types()}


@command.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Every part decoded, as JSON.")
@click.option(
    "--breakdown",
    "as_breakdown",
    is_flag=True,
    help="Part by part: virtio 1.4 or emu extension, bytes, and a device part's fields "
    "(lists of objects, e.g. the fs device's nodes and handles, as tables).",
)
def show(path: str, as_json: bool, as_breakdown: bool) -> None:
    """Summarise a state file: device, features and status in words, each queue (size,
    format, indexes, heads in flight), the device's own state, the parts and their bytes.
    Refuses corrupt or incompatible files."""
    if as_json and as_breakdown:
        raise click.UsageError("--json and --breakdown are two different outputs: pick one")
    try:
        state = load(path)
        if as_breakdown:
            click.echo(printable("\n".join(breakdown(state, registry.schemas()))))
        elif as_json:  # JSON escapes every control character itself
            click.echo(json.dumps(to_json(state, registry.schemas()), indent=2))
        else:
            click.echo(printable("\n".join(summary(view(state, registry.schemas()), _names()))))
    except StateError as e:
        raise click.ClickException(printable(str(e))) from None


@command.command("diff")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The changes as JSON.")
def diff(a: str, b: str, as_json: bool) -> None:
    """What changed from state file A to B, field by field: features, status, each queue,
    the transport, the device's own state, the parts. Prints nothing and exits 0 when
    they hold the same state, 1 when they differ, 2 when a file cannot be read or the
    two do not compare (corrupt, incompatible, different device types)."""
    try:
        schemas = registry.schemas()
        changes = statediff.diff(view(load(a), schemas), view(load(b), schemas), _names())
    except StateError as e:
        raise _Trouble(printable(str(e))) from None
    if as_json:
        click.echo(json.dumps(statediff.to_json(a, b, changes), indent=2))
    elif changes:
        # a file's strings and keys are its writer's: nothing in them may drive the terminal
        click.echo(printable(f"--- {a}\n+++ {b}"))
        click.echo(printable("\n".join(c.text() for c in changes)))
    if changes:
        click.get_current_context().exit(1)
