"""emu's own devices for a guest: `emu serve` started for `emu guest run --emu SPEC`.

All specs go to one `emu serve` process, not one per device, because `net:cable` ends
pair up inside a process. Its stdout is left to the caller's, so a `console` device's
hvc0 output shows there. Under QEMU the spec's ring options also become the device's
own properties: QEMU offers packed rings only with packed=on, and its vhost-user-rng
offers its guest whatever its properties say without asking the backend; its virtio-net
keeps its own MAC, which is set to the one `emu serve` gives the device. An fs device's
tag (`fs:DIR,tag=NAME`, default emu) goes to QEMU's vhost-user-fs-device, which puts it in
the config space itself, and under both kinds tells the guest's fs workload what to mount.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from emu.devices import registry
from emu.guest.devices import Device
from emu.guest.microvm import DEFAULT_FS_TAG
from emu.guest.proc import start, stop

#: QEMU's -device property for each ring option of a spec
_QEMU_PROPERTY = {"packed": "packed", "event_idx": "event_idx", "indirect": "indirect_desc"}


class BackendError(Exception):
    """`emu serve` refused the specs or did not come up."""


def guest_devices(kind: str, specs: Sequence[str], sockets: Sequence[Path]) -> list[Device]:
    """What run_guest attaches for `specs` served on `sockets` (registry.SpecError for a
    bad spec, as `emu serve` would say)."""
    devices = []
    for i, (text, sock) in enumerate(zip(specs, sockets, strict=True)):
        spec = registry.parse_spec(text, i)
        options: list[str] = []
        if kind == "microvm":
            for name, bit in registry.RING_OPTIONS.items():
                on = "off" if spec.withheld >> bit & 1 else "on"
                options.append(f"{_QEMU_PROPERTY[name]}={on}")
            frontend = registry.get(spec.kind).frontend
            if frontend is not None:
                options += [f"{k}={v}" for k, v in frontend(spec).items()]
        if spec.kind == "fs" and not any(o.startswith("tag=") for o in options):
            options.append(f"tag={spec.options.get('tag') or DEFAULT_FS_TAG}")
        devices.append(Device.parse((spec.kind, ",".join([str(sock), *options]))))
    return devices


@contextmanager
def emu_backends(
    kind: str, specs: Sequence[str], workdir: Path, timeout: float = 10.0
) -> Iterator[list[Device]]:
    """Serves `specs` (emu serve's DEVICE syntax) on sockets in `workdir` until the block
    ends; yields the devices to hand to run_guest."""
    kinds = [registry.parse_spec(spec).kind for spec in specs]
    sockets = [workdir / f"emu{i}-{k}.sock" for i, k in enumerate(kinds)]
    devices = guest_devices(kind, specs, sockets)
    cmd = [sys.executable, "-m", "emu.cli", "serve"]
    for sock in sockets:
        cmd += ["--socket", str(sock)]
    for sock in sockets:  # a socket file left by an earlier serve would pass for ready
        sock.unlink(missing_ok=True)
    # a guest that overruns gets its queues' state printed first (run_guest)
    proc = start([*cmd, *specs], stdin=subprocess.DEVNULL, report=signal.SIGUSR1)
    try:
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in sockets):
            if proc.poll() is not None:
                raise BackendError(f"emu serve exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise BackendError(f"emu serve did not listen within {timeout:.0f} s")
            time.sleep(0.05)
        yield devices
    finally:
        stop(proc)
