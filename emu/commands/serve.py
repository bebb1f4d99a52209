"""``emu serve``: emu devices as vhost-user backends, one unix socket per device.

    emu serve --socket /tmp/blk.sock blk:disk.img
    emu serve --socket /tmp/blk.sock blk:nbd+unix:///?socket=/tmp/nbd.sock:queues=2
    emu serve --socket /tmp/a.sock net:cable --socket /tmp/b.sock net:cable --socket /tmp/r.sock rng

Each ``--socket`` pairs with the device spec in the same position. A spec is
``NAME[:ARG]`` as the device type registered it (``emu.devices.registry``):

* ``blk:TARGET[:ro][:queues=N]``: virtio-blk on TARGET, a raw image file or block
  device, or NBD network storage: ``nbd://HOST[:PORT]/[EXPORT]`` or
  ``nbd+unix:///[EXPORT]?socket=PATH`` (e.g. an ``nbdkit -U PATH memory 1G``). ``:ro``
  makes it read-only, ``:queues=N`` gives it N request queues, served in parallel, each
  with its own io_uring or NBD connection. An NBD server that goes away fails the
  requests it held (IOERR, one log line) and the device reconnects when it is back.
* ``rng``: virtio-rng from the host's getrandom().
* ``console`` (stdio), ``console:pty`` (prints the pty path), ``console:socket:PATH``.
* ``net:tap:NAME``: virtio-net on a host TAP interface.
* Net devices get MAC 52:54:00:12:34:NN, NN = the spec's position (from 01).
* ``net:cable``: virtio-net on one end of an in-process cable; cable specs pair up in
  order (the 1st with the 2nd, the 3rd with the 4th), joining two guests' NICs.
* ``fs:DIR[,tag=NAME][,ro][,queues=N][,strict]``: virtio-fs sharing the host directory
  DIR, which the guest mounts with ``mount -t virtiofs NAME /mnt`` (tag ``emu`` by
  default); ``ro`` refuses every change (EROFS), ``queues=N`` gives it N request queues;
  ``strict`` refuses a restore whose open files cannot all be reopened (default: they
  come back stale, ESTALE).
* ``balloon[,control=PATH][,target=MIB][,stats=off][,reporting=off]``: virtio-balloon;
  pages the guest gives up are punched out of its RAM's memfd or file. ``control=PATH``
  listens on a Unix socket for the host's commands (``target MIB``, ``stats``, ``info``;
  ``emu balloon --control PATH ...``); ``target=MIB`` is the target from the start;
  ``stats=off``, ``reporting=off``, ``deflate_on_oom=off`` withhold those features.

Ring features can be withheld per device with options after a comma, e.g.
``blk:disk.img,packed=off,event_idx=off,indirect=off`` (each ``on`` or ``off``; all are
offered by default): a frontend then cannot negotiate them, so one backend binary covers
split and packed rings with and without event suppression and indirect tables.

Every device accepts rings of up to 1024 entries (QEMU on virtio-mmio uses 1024). A
socket serves one frontend at a time and accepts the next one after a disconnect (the
device is reset in between: a reconnecting QEMU sets it up again).

``kill -USR1`` makes it print, to stderr, each socket's frontend and each queue's state:
the device's next_avail / next_used beside the indexes and event fields the driver left
in guest memory, requests in flight and at the backend, a kick not taken, an interrupt
held: what a guest waiting for its disk is waiting for (docs/vhost-user.md, "When a
guest waits").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from emu.devices import registry
from emu.devices.base import VirtioDevice

if TYPE_CHECKING:
    from emu.vhost_user.backend import VhostUserServer

log = logging.getLogger(__name__)


def make_devices(specs: list[str]) -> list[VirtioDevice]:
    """Devices for ``specs``; click.BadParameter names the spec that is wrong."""
    try:
        return registry.make_devices(specs, registry.Build(say=click.echo))
    except registry.SpecError as e:
        raise click.BadParameter(str(e), param_hint="DEVICE") from e


def serve(
    devices: list[VirtioDevice],
    sockets: list[str],
    done: threading.Event,
    *,
    policy: str = "drain",
    state_dir: str | None = None,
    restore_dir: str | None = None,
    restore_timeout: float = 60.0,
    reports: Reports | None = None,
) -> None:
    """Serve ``devices`` on ``sockets`` until ``done`` is set; then close them all.
    ``reports``: SIGUSR1 prints their state.

    A state file that does not fit its device is a click.ClickException before anything
    listens.
    """
    from emu.state.format import StateError
    from emu.vhost_user.backend import VhostUserServer
    from emu.vhost_user.device_state import StateFiles

    servers = []
    try:
        files = []
        for d, s in zip(devices, sockets, strict=True):
            d.policy = policy
            try:  # docs/stop.md, "vhost-user: device state"
                files.append(StateFiles.open(d, s, state_dir, restore_dir, restore_timeout))
            except StateError as e:
                raise click.ClickException(f"{d.name} on {s}: {e}") from e
        for d, s, f in zip(devices, sockets, files, strict=True):
            servers.append(VhostUserServer(d, s, f).start())
            click.echo(f"{d.name}: listening on {s}")
        if reports is not None:
            reports.start(servers)
        done.wait()
    finally:
        for server in servers:
            server.close()
        for d in devices:
            d.close()


class Reports:
    """SIGUSR1 -> where every device and queue stand (VirtioDevice.describe), on stderr.

    The handler only writes a byte to a pipe; a thread of its own builds and prints the
    report. So a burst of signals cannot nest handlers into one another, and a stuck device
    or a stderr nobody reads costs the report, never a thread that serves. Made before
    the devices, so a signal during start-up waits for the first report instead of
    killing the process."""

    def __init__(self) -> None:
        self._asked, self._ask = os.pipe()
        os.set_blocking(self._ask, False)
        signal.signal(signal.SIGUSR1, self._signalled)

    def _signalled(self, *_: object) -> None:
        try:
            os.write(self._ask, b"!")
        except BlockingIOError:  # the pipe is full: a report is due already
            pass

    def start(self, servers: list[VhostUserServer]) -> None:
        threading.Thread(
            target=self._run, args=(servers,), name="emu-serve-reports", daemon=True
        ).start()

    def _run(self, servers: list[VhostUserServer]) -> None:
        while os.read(self._asked, 4096):  # every signal since the last report: one more
            try:
                lines = []
                for server in servers:
                    lines += [server.describe(), *server.device.describe()]
                sys.stderr.write("".join(f"emu serve: {line}\n" for line in lines))
                sys.stderr.flush()
            except Exception:  # a closed stderr, a device torn down meanwhile
                log.warning("the SIGUSR1 report failed", exc_info=True)


@click.command(
    "serve",
    epilog="DEVICE: NAME[:ARG][,packed|event_idx|indirect=on|off...], e.g. blk:disk.img, "
    "blk:disk.img:ro:queues=2, blk:nbd://HOST:PORT/, blk:nbd+unix:///?socket=PATH, rng, "
    "console, net:tap:NAME, net:cable, fs:DIR, balloon,control=PATH, vsock:CID=3,uds=PATH",
)
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
    state_dir: str | None,
    restore_dir: str | None,
    restore_timeout: float,
) -> None:
    """Serve emu devices to vhost-user frontends (QEMU, UML) until interrupted."""
    if len(sockets) != len(specs):
        raise click.UsageError(f"{len(sockets)} --socket for {len(specs)} devices")
    done = threading.Event()
    reports = Reports()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    serve(
        make_devices(list(specs)),
        list(sockets),
        done,
        policy=policy,
        state_dir=state_dir,
        restore_dir=restore_dir,
        restore_timeout=restore_timeout,
        reports=reports,
    )
