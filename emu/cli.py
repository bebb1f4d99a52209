"""The ``emu`` command. Each subcommand lives in its own module under ``emu.commands``."""

from __future__ import annotations

import importlib
import logging
import os

import click

from emu import progress as emu_progress

#: subcommand name -> module in emu.commands exposing a click command called ``command``
COMMANDS = {
    "demo": "demo",
    "serve": "serve",
    "guest": "guest",
    "state": "state",
    "balloon": "balloon",
    "bench": "bench",
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `emu --help` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self._load(n) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            mod = importlib.import_module(f"emu.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as e:
            if e.name == f"emu.commands.{COMMANDS[name]}":
                return None
            raise
        return mod.command


@click.group(cls=_LazyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress of long work (image builds, downloads) on stderr; default: when stderr "
    "is a terminal (emu/progress.py).",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, progress: bool | None) -> None:
    """emu: software virtio devices with stop, in-flight reporting and snapshots."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if progress is not None:  # for this command and the processes it starts, then as it was
        before = os.environ.get(emu_progress.ENV)
        emu_progress.ask(progress)
        ctx.call_on_close(lambda: _restore(emu_progress.ENV, before))


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


if __name__ == "__main__":
    main()
