"""What QEMU 7.2 refuses for a vhost-user device on this machine: migrating it, and
starting it on a reconnecting chardev. Shared by the fs and vsock guest tests, which show
why their restores into a fresh backend process cannot be QEMU migrations."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from emu.guest import GuestImage, vm
from emu.guest.devices import Device
from emu.guest.run import kernel_args


def assert_no_migration_or_reconnect(
    image: GuestImage, devices: list[Device], qemu_device: str, workdir: Path
) -> None:
    """A paused microvm with ``devices`` (served already) refuses QMP ``migrate``, naming
    the non-migratable ``qemu_device``; with ``reconnect=True`` QEMU does not start."""
    qmp = workdir / "qmp.sock"
    append = kernel_args(["none"], {}, True)
    cmd = vm.qemu_command(image, devices, qmp, append, 256)
    cmd.insert(1, "-S")  # paused before the first instruction: QMP only
    guest = vm.Vm(cmd, qmp, [])
    try:
        with pytest.raises(RuntimeError, match=f"non-migratable device.*{qemu_device}"):
            guest.qmp.execute("migrate", uri=f"exec:cat > {workdir / 'vm.mig'}")
    finally:
        guest.stop()
    cmd = vm.qemu_command(image, devices, qmp, append, 256, reconnect=True)
    cmd.insert(1, "-S")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"{qemu_device}-device" in out.stderr and "Failed to set msg fds" in out.stderr
