"""``emu demo``: emu's devices driven end to end, with what happened printed.

By default a real Linux guest (user-mode-linux, or QEMU microvm with ``--kind microvm``)
boots on emu's vhost-user backends: it lists the virtio devices it found, writes random
data to virtio-blk and reads it back, writes to the virtio console (and reads virtio-rng
under QEMU); the host then checks the backing file and the console output itself. With
nbdkit installed the disk is NBD network storage: nbdkit's file plugin serves the image
and emu's blk is its NBD client.

``--in-process`` instead puts each device behind emu's virtio-mmio transport with the
reference driver playing the guest: the path a VMM embedding emu would take. It runs the
``demo`` of each registered device type's driver helper (``emu.devices.registry``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import click

from emu.backends.chardev import BufferChar
from emu.devices import registry
from emu.devices.base import VirtioDevice
from emu.devices.blk import T_OUT, BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.rng import RngDevice
from emu.guest.run import run_guest
from emu.memory import GuestMemory
from emu.state import file as statefile
from emu.testing.blk import BlkDriver
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.nbdkit import Nbdkit, nbdkit_missing
from emu.testing.rng import RngDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer

GUEST_RAM = 16 << 20


def demo_stop(say: Callable[[str], None], depth: int = 32) -> bool:
    """Stop blk with requests in flight, snapshot it, restore into a fresh device."""
    with tempfile.TemporaryDirectory(prefix="emu-demo-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(8 << 20)
        mem = GuestMemory.create(GUEST_RAM)
        dev = BlkDevice(disk)
        for q in dev.queues:
            hold_completions(q, 3600.0)  # completions held back: the requests stay in flight
        tr = MmioTransport(dev, mem)
        drv = VirtioMmioDriver(tr, mem)
        blk = BlkDriver.open(drv, packed=True)
        data = [bytes([i]) * 4096 for i in range(depth)]
        tokens = [blk.submit(T_OUT, 8 * i, d) for i, d in enumerate(data)]
        while len(dev.queues[0].inflight()) < depth:  # wait until the device fetched all
            time.sleep(0.001)
        t0 = time.perf_counter()
        tr.vmm_stop("report")
        stop_us = (time.perf_counter() - t0) * 1e6
        inflight = len(dev.queues[0].inflight())
        path = os.path.join(tmp, "blk.state")
        statefile.save(path, tr.save())
        say(
            f"stop: VMM stop (policy report) took {stop_us:.0f} us with {inflight} requests "
            f"in flight; state saved to {os.path.getsize(path)} bytes"
        )
        saved = drv.save()
        dev.close()
        fresh = BlkDevice(disk)
        tr2 = MmioTransport(fresh, mem)
        drv2 = VirtioMmioDriver.load(tr2, mem, saved)
        tr2.restore(statefile.load(path))
        done = drv2.wait(0, depth)
        once = sorted(c.token for c in done) == sorted(tokens)
        with open(disk, "rb") as f:
            on_disk = [f.read(4096) for _ in range(depth)]
        ok = once and on_disk == data and all(c.data[-1] == 0 for c in done)
        say(
            f"stop: a fresh device restored from it re-submitted them: {len(done)} completed "
            f"{'exactly once' if once else 'NOT exactly once'}, disk "
            f"{'matches' if on_disk == data else 'DIFFERS'}"
        )
        fresh.close()
        mem.close()
        return ok


def demo_stop_bit(bit: int, say: Callable[[str], None]) -> None:
    """In-process: the guest's own STOP (experimental, offered only when asked for)."""
    mem = GuestMemory.create(GUEST_RAM)
    dev = RngDevice()
    try:
        drv = VirtioMmioDriver(
            MmioTransport(dev, mem, stop_feature_bit=bit), mem, stop_feature_bit=bit
        )
        rng = RngDriver.open(drv)
        rng.read(64)
        drv.stop()
        rs = drv.ring_state(0)
        say(
            f"stop-bit: STOP offered as feature bit {bit}; the guest stopped rng: next avail "
            f"{rs.next_avail}, next used {rs.next_used}, {drv.inflight(0)} in flight"
        )
        drv.resume()
        say(f"stop-bit: resumed, {len(rng.read(64))} more bytes")
    finally:
        dev.close()
        mem.close()


VIRTIO_NAMES = {"0x0001": "net", "0x0002": "blk", "0x0003": "console", "0x0004": "rng"}
HVC_MARKER = "hello-from-the-guest-over-emu-virtio-console"


def demo_guest(kind: str, mib: int, say: Callable[[str], None]) -> bool:
    """Boot a real guest on emu's backends; True when every check passed."""
    with tempfile.TemporaryDirectory(prefix="emu-demo-") as tmp, ExitStack() as stack:
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        target = str(disk)
        if nbdkit_missing() is None:  # the disk as network storage, as a remote one would be
            nbd = stack.enter_context(Nbdkit(Path(tmp) / "nbd.sock", ["file", f"file={disk}"]))
            target = nbd.uri
            say(f"blk: nbdkit serves {disk.name}; emu's blk is its NBD client ({target})")
        chardev = BufferChar()
        devices: list[tuple[str, VirtioDevice]] = [
            ("blk", BlkDevice(target, serial="emu-demo", queue_max_size=registry.QUEUE_MAX))
        ]
        run = ["devices", "blk"]
        if kind == "uml":  # QEMU 7.2 has no vhost-user console; UML has no virtio-rng driver
            devices.append(("console", ConsoleDevice(chardev, queue_max_size=registry.QUEUE_MAX)))
            run.append("hvc")
        else:
            devices.append(("rng", RngDevice(queue_max_size=registry.QUEUE_MAX)))
            run.append("rng")
        socks = []
        for name, dev in devices:
            stack.callback(dev.close)
            server = VhostUserServer(dev, Path(tmp) / f"{name}.sock").start()
            stack.callback(server.close)
            socks.append((name, server.path))
        say(f"guest: booting {kind} on emu's vhost-user {', '.join(n for n, _ in devices)}")
        res = run_guest(
            kind, socks, run, params={"blk.mib": mib, "hvc.marker": HVC_MARKER}, timeout=180
        )
        say(
            f"guest: /init reached in {res.boot_s or 0:.2f} s, powered off after "
            f"{res.wall_s:.2f} s, exit status {res.rc}"
        )
        for name, dev in sorted(res.log.devices.items()):
            kind_name = VIRTIO_NAMES.get(dev.get("device", ""), dev.get("device"))
            say(f"guest: sees {name}: virtio-{kind_name}, driver {dev.get('driver')}")
        r = res.results
        with open(disk, "rb") as f:
            host = hashlib.sha256(f.read(mib << 20)).hexdigest()
        blk_ok = r.get("blk.write_sha256") == r.get("blk.readback_sha256") == host
        say(f"blk: guest wrote {mib} MiB, sha256 {r.get('blk.write_sha256', '?')[:16]}")
        say(
            f"blk: guest read back sha256 {r.get('blk.readback_sha256', '?')[:16]}, "
            f"host backing file sha256 {host[:16]} -> {'match' if blk_ok else 'MISMATCH'}"
        )
        hvc_ok = rng_ok = True
        if kind == "uml":
            got = bytes(chardev.output).decode(errors="replace")
            hvc_ok = HVC_MARKER in got
            say(
                f"console: host received {got.strip()!r} over virtio-console"
                if hvc_ok
                else "console: the guest's line did NOT reach the host"
            )
        else:
            rng_ok = int(r.get("rng.bytes", 0)) > 0
            say(
                f"rng: guest read {r.get('rng.bytes')} bytes from /dev/hwrng "
                f"({r.get('rng.current')}), {r.get('rng.distinct')} distinct byte values"
            )
        return res.ok and blk_ok and hvc_ok and rng_ok


@click.command("demo")
@click.option("--in-process", is_flag=True, help="No VM: the reference driver plays the guest.")
@click.option(
    "--kind",
    type=click.Choice(["all", "uml", "microvm"]),
    default="all",
    help="Real guest: user-mode-linux, QEMU microvm (TCG), or one after the other.",
)
@click.option("--mib", default=4, show_default=True, help="Data the guest writes to blk.")
@click.option("--packed", is_flag=True, help="In-process: packed rings instead of split.")
@click.option("--no-event-idx", is_flag=True, help="In-process: flag-based suppression.")
@click.option("--no-indirect", is_flag=True, help="In-process: no indirect tables.")
@click.option(
    "--stop-bit",
    type=click.IntRange(44, 49),
    default=None,
    help="In-process: also offer the experimental STOP status bit as this feature bit "
    "(docs/stop.md; e.g. 47) and stop rng through it. Not offered by default.",
)
@click.option(
    "--ring",
    type=click.Choice(["cython", "python"]),
    default=None,
    help="Ring core implementation (default: cython when built).",
)
@click.argument("devices", nargs=-1, metavar="[DEVICE]...")
def command(
    in_process: bool,
    kind: str,
    mib: int,
    packed: bool,
    no_event_idx: bool,
    no_indirect: bool,
    stop_bit: int | None,
    ring: str | None,
    devices: tuple[str, ...],
) -> None:
    """Show emu's devices working: a real guest on them, or (--in-process) the driver.

    DEVICE (in-process only): the device types to drive, all by default."""
    if ring:
        os.environ["EMU_RING"] = ring
    if not in_process:
        kinds = ["uml", "microvm"] if kind == "all" else [kind]
        failed = [k for k in kinds if not demo_guest(k, mib, click.echo)]
        if not demo_stop(click.echo):
            failed.append("stop/restore")
        if failed:
            raise click.ClickException(f"the {', '.join(failed)} guest demo failed (see above)")
        click.echo(
            "demo: the guests used every device, the host checked the data, and a "
            "device stopped with requests in flight carried on after a restore"
        )
        return
    opts = dict(packed=packed, event_idx=not no_event_idx, indirect=not no_indirect)
    try:  # every registered device type, through its driver helper's demo
        chosen = [registry.get(name) for name in devices] or registry.types()
    except registry.SpecError as e:
        raise click.BadParameter(str(e), param_hint="DEVICE") from None
    for t in chosen:
        t.driver_module().demo(opts, click.echo)
    if stop_bit is not None:
        demo_stop_bit(stop_bit, click.echo)
    click.echo("demo: all devices answered")
