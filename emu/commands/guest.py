"""``emu guest``: build and boot real Linux guests that drive vhost-user devices."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import click

from emu.guest import virtiofsd
from emu.guest.backends import BackendError, emu_backends
from emu.guest.devices import Device
from emu.guest.images import KINDS, GuestImage, build_image, export_image
from emu.guest.packages import PackageError
from emu.guest.run import image_layers, run_guest

_kind = click.option(
    "--kind", type=click.Choice(KINDS), required=True, help="user-mode-linux or QEMU microvm."
)


@click.group("guest")
def command() -> None:
    """Real Linux guests (UML, QEMU microvm) on vhost-user devices."""


@command.command("build")
@_kind
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Copy here too.")
@click.option("--fio", is_flag=True, help="With fio and its libraries (the fio workload).")
@click.option("--socat", is_flag=True, help="With socat and its libraries (the vsock workload).")
def build(kind: str, out: Path | None, fio: bool, socat: bool) -> None:
    """Fetch the kernel and busybox packages and build the initramfs (cached)."""
    try:
        image = build_image(kind, fio=fio, socat=socat)
    except PackageError as e:
        raise click.ClickException(str(e)) from None
    if out is not None:
        image = export_image(image, out)
    click.echo(f"kernel  {image.kernel}\ninitrd  {image.initrd}\nrelease {image.kernel_release}")
    for name, version in image.packages.items():
        click.echo(f"package {name} {version}")


def _param(ctx: click.Context, opt: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE")
        params[key] = value
    return params


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@command.command("run")
@_kind
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--run",
    "workloads",
    default="devices",
    show_default=True,
    help="Comma-separated /init workloads: devices blk blkbench fio fs vsock balloon hvc rng "
    "net script sh none.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="TYPE:PATH",
    help="blk|net|console|rng|vsock|fs:SOCKET (a listening vhost-user backend); "
    "microvm also qemu-blk:IMG, qemu-net:user, qemu-rng:FILE, qemu-console:OUTFILE.",
)
@click.option(
    "--emu",
    "emu_specs",
    multiple=True,
    metavar="SPEC",
    help="One of emu's own devices, served by an `emu serve` this command starts: "
    "blk:FILE or blk:nbd://HOST:PORT/ or blk:nbd+unix:///?socket=PATH (then :ro, "
    ":queues=N), net:cable (pairs), net:tap:NAME, console (hvc0 to stdout), rng, "
    "fs:DIR[,tag=NAME][,ro], vsock:CID=N,uds=PATH (host side: Unix sockets PATH and "
    "PATH_PORT), balloon[,control=PATH] (UML only: QEMU 7.2 has no vhost-user balloon); "
    "ring options as in emu serve, e.g. blk:FILE,packed=off.",
)
@click.option(
    "--virtiofsd",
    "virtiofsd_dirs",
    multiple=True,
    metavar="DIR[,tag=NAME]",
    help="Share DIR through Debian's C virtiofsd, started for this guest (microvm only: "
    "UML needs the fs config from its backend, which virtiofsd does not serve).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    callback=_param,
    metavar="KEY=VALUE",
    help="Workload knob on the kernel command line, e.g. blk.mib=16 (becomes emu.blk.mib=16).",
)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds before the kill.")
@click.option("--mem", "mem_mib", type=int, help="Guest RAM in MiB (uml 256, microvm 512).")
@click.option(
    "--cpus",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="vCPUs (microvm; UML has one). blk:...:queues=N needs N to use N queues.",
)
@click.option("--verbose-kernel", is_flag=True, help="Drop `quiet` from the kernel arguments.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the parsed results here.",
)
def run(
    kind: str,
    kernel: Path | None,
    initrd: Path | None,
    workloads: str,
    devices: tuple[str, ...],
    emu_specs: tuple[str, ...],
    params: dict[str, str],
    timeout: float,
    mem_mib: int | None,
    cpus: int,
    verbose_kernel: bool,
    json_out: Path | None,
    virtiofsd_dirs: tuple[str, ...],
) -> None:
    """Boot a guest, stream its console, exit with its /init status."""
    run_list = [w for w in workloads.split(",") if w]
    if virtiofsd_dirs and kind != "microvm":
        raise click.ClickException("virtiofsd serves QEMU only (no fs config for UML)")
    try:
        devs = [Device.parse(d) for d in devices]
        if kernel and initrd:  # a guest built elsewhere: no packages needed
            image = GuestImage(kind, kernel, initrd, "", {})
        else:
            built = build_image(kind, **image_layers(run_list, params))
            image = replace(built, kernel=kernel or built.kernel, initrd=initrd or built.initrd)
    except (ValueError, PackageError) as e:
        raise click.ClickException(str(e)) from None
    with ExitStack() as stack:
        if emu_specs:
            workdir = Path(stack.enter_context(TemporaryDirectory(prefix="emu-guest-")))
            try:
                devs += stack.enter_context(emu_backends(kind, emu_specs, workdir))
            except (BackendError, ValueError) as e:  # ValueError: a spec emu serve refuses
                raise click.ClickException(str(e)) from None
        if virtiofsd_dirs:
            workdir = Path(stack.enter_context(TemporaryDirectory(prefix="emu-vfsd-")))
            for i, text in enumerate(virtiofsd_dirs):
                source, *options = text.split(",")
                sock = workdir / f"virtiofsd{i}.sock"
                try:
                    stack.enter_context(virtiofsd.serve(Path(source), sock))
                except (OSError, RuntimeError) as e:
                    raise click.ClickException(str(e)) from None
                devs.append(Device("fs", str(sock), tuple(options)))
        try:
            res = run_guest(
                kind,
                devs,
                run_list,
                timeout=timeout,
                params=params,
                image=image,
                mem_mib=mem_mib,
                cpus=cpus,
                quiet=not verbose_kernel,
                interactive="sh" in run_list,
                on_output=_echo,
            )
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
    if json_out is not None:
        json_out.write_text(json.dumps(res.summary(), indent=2) + "\n")
    boot = f"{res.boot_s:.2f} s" if res.boot_s is not None else "never"
    click.echo(
        f"emu guest: {kind} /init after {boot}, done after {res.wall_s:.2f} s, "
        f"rc={res.rc} exit={res.exit_status}" + (" TIMED OUT" if res.timed_out else ""),
        err=True,
    )
    sys.exit(0 if res.ok else 1)
