"""``emu serve``: emu devices as vhost-user backends, one unix socket per device.

    emu serve --socket /tmp/blk.sock blk:disk.img
    emu serve --socket /tmp/a.sock net:cable --socket /tmp/b.sock net:cable --socket /tmp/r.sock rng

Each ``--socket`` pairs with the device spec in the same position:

* ``blk:FILE`` (``blk:FILE:ro`` read-only): virtio-blk on a raw image.
* ``rng``: virtio-rng from the host's getrandom().
* ``console`` (stdio), ``console:pty`` (prints the pty path), ``console:socket:PATH``.
* ``net:tap:NAME``: virtio-net on a host TAP interface.
* Net devices get MAC 52:54:00:12:34:NN, NN = the spec's position (from 01).
* ``net:cable``: virtio-net on one end of an in-process cable; cable specs pair up in
  order (the 1st with the 2nd, the 3rd with the 4th), joining two guests' NICs.

Ring features can be withheld per device with options after a comma, e.g.
``blk:disk.img,packed=off,event_idx=off,indirect=off`` (each ``on`` or ``off``; all are
offered by default): a frontend then cannot negotiate them, so one backend binary covers
split and packed rings with and without event suppression and indirect tables.

Every device accepts rings of up to 1024 entries (QEMU on virtio-mmio uses 1024). A
socket serves one frontend at a time and accepts the next one after a disconnect (the
device is reset in between: a reconnecting QEMU sets it up again).
"""

from __future__ import annotations

import signal
import threading

import click

from emu.devices.base import VirtioDevice
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.testing.delay import hold_completions

#: ring size limit for served devices: what frontends ask for (QEMU microvm: 1024)
QUEUE_MAX = 1024
#: spec options that withhold a ring feature: name -> feature bit
RING_OPTIONS = {"packed": F_RING_PACKED, "event_idx": F_EVENT_IDX, "indirect": F_INDIRECT_DESC}


def split_options(spec: str) -> tuple[str, int]:
    """``"blk:d.img,packed=off"`` -> ``("blk:d.img", ring feature bits to withhold)``."""
    base, *options = spec.split(",")
    withheld = 0
    for opt in options:
        name, _, value = opt.partition("=")
        if name not in RING_OPTIONS or value not in ("on", "off"):
            raise click.BadParameter(
                f"{spec}: option {opt!r} (known: {', '.join(f'{n}=on|off' for n in RING_OPTIONS)})",
                param_hint="DEVICE",
            )
        bit = 1 << RING_OPTIONS[name]
        withheld = withheld | bit if value == "off" else withheld & ~bit
    return base, withheld


def net_mac(position: int) -> str:
    """The MAC of the net device at ``position`` among the specs (QEMU's virtio-net keeps
    its own MAC, so whoever starts QEMU must pass it the same one)."""
    return f"52:54:00:12:34:{position + 1:02x}"


def make_devices(specs: list[str]) -> list[VirtioDevice]:
    """Devices for ``specs``; click.BadParameter names the spec that is wrong."""
    from emu.backends.cable import Cable
    from emu.devices.net import NetDevice

    devices: list[VirtioDevice] = []
    cable_end = None
    for i, spec in enumerate(specs):
        base, withheld = split_options(spec)
        kind, _, arg = base.partition(":")
        if base == "net:cable":
            if cable_end is None:
                end, cable_end = Cable.pair()
            else:
                end, cable_end = cable_end, None
            dev: VirtioDevice = NetDevice(end, mac=net_mac(i), queue_max_size=QUEUE_MAX)
        elif kind == "net" and arg.startswith("tap:"):
            from emu.backends.tap import Tap

            dev = NetDevice(Tap(arg.removeprefix("tap:")), mac=net_mac(i), queue_max_size=QUEUE_MAX)
        else:
            dev = _make(kind, arg, spec)
        dev.features &= ~withheld
        devices.append(dev)
    if cable_end is not None:
        raise click.BadParameter("net:cable devices come in pairs", param_hint="DEVICE")
    return devices


def _make(kind: str, arg: str, spec: str) -> VirtioDevice:
    if kind == "blk" and arg:
        from emu.devices.blk import BlkDevice

        path, _, mode = arg.partition(":")
        if mode not in ("", "ro"):
            raise click.BadParameter(f"{spec}: mode {mode!r} (only 'ro')", param_hint="DEVICE")
        return BlkDevice(path, readonly=mode == "ro", queue_max_size=QUEUE_MAX)
    if kind == "rng" and not arg:
        from emu.devices.rng import RngDevice

        return RngDevice(queue_max_size=QUEUE_MAX)
    if kind == "console":
        from emu.backends import chardev
        from emu.devices.console import ConsoleDevice

        if not arg:
            backend: chardev.CharBackend = chardev.StdioChar()
        elif arg == "pty":
            backend = chardev.PtyChar()
            click.echo(f"console: {backend.path}")  # type: ignore[attr-defined]
        elif arg.startswith("socket:"):
            backend = chardev.SocketChar(arg.removeprefix("socket:"))
        else:
            raise click.BadParameter(f"{spec}: unknown console backend", param_hint="DEVICE")
        return ConsoleDevice(backend, queue_max_size=QUEUE_MAX)
    raise click.BadParameter(
        f"{spec!r}: expected blk:FILE[:ro], rng, console[:pty|:socket:PATH], "
        "net:tap:NAME or net:cable, then ,OPTION=on|off...",
        param_hint="DEVICE",
    )


@click.command("serve")
@click.option(
    "--socket",
    "sockets",
    multiple=True,
    required=True,
    metavar="PATH",
    help="Unix socket for the device in the same position (repeatable).",
)
@click.option(
    "--policy",
    type=click.Choice(["drain", "report"]),
    default="drain",
    help="Quiesce policy when a ring stops (GET_VRING_BASE).",
)
@click.option(
    "--latency",
    type=click.FloatRange(0, 10),
    default=0.0,
    help="Hold each completion back this many seconds (to test stops with requests in flight).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, writable=True),
    help="Write DIR/<socket name>.state whenever all of a device's rings stop.",
)
@click.option(
    "--restore-dir",
    type=click.Path(file_okay=False, exists=True),
    help="Restore DIR/<socket name>.state when the frontend starts the rings "
    "(a live migration's source writes it at its last stop: docs/stop.md).",
)
@click.option(
    "--restore-timeout",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a ring start waits for the --restore-dir file to appear.",
)
@click.argument("specs", nargs=-1, required=True, metavar="DEVICE...")
def command(
    sockets: tuple[str, ...],
    specs: tuple[str, ...],
    policy: str,
    latency: float,
    state_dir: str | None,
    restore_dir: str | None,
    restore_timeout: float,
) -> None:
    """Serve emu devices to vhost-user frontends (QEMU, UML) until interrupted."""
    from emu.state.format import StateError
    from emu.vhost_user.backend import VhostUserServer
    from emu.vhost_user.device_state import StateFiles

    if len(sockets) != len(specs):
        raise click.UsageError(f"{len(sockets)} --socket for {len(specs)} devices")
    devices = make_devices(list(specs))
    files = []
    for d, s in zip(devices, sockets, strict=True):
        d.policy = policy
        for q in d.queues:
            hold_completions(q, latency)
        try:  # docs/stop.md, "vhost-user: device state"
            files.append(StateFiles.open(d, s, state_dir, restore_dir, restore_timeout))
        except StateError as e:
            raise click.ClickException(f"{d.name} on {s}: {e}") from e
    servers = [
        VhostUserServer(d, s, f).start() for d, s, f in zip(devices, sockets, files, strict=True)
    ]
    for d, s in zip(devices, sockets, strict=True):
        click.echo(f"{d.name}: listening on {s}")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    for server in servers:
        server.close()
    for d in devices:
        d.close()
