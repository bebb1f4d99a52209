"""Real Linux guests (user-mode-linux, QEMU microvm) that drive vhost-user devices.

    from emu.guest import run_guest
    res = run_guest("uml", devices=[("blk", "/run/blk.sock")], run=["devices", "blk"])
    assert res.ok and res.log.devices["virtio0"]["driver"] == "virtio_blk"

Kernels and busybox come from Debian packages into emu's cache (packages.py); the guest's
/init runs the named workloads and prints EMU-* markers (init_script.py, console.py).
"""

from emu.guest.devices import Device
from emu.guest.images import KINDS, GuestImage, build_image
from emu.guest.run import GuestResult, run_guest

__all__ = ["KINDS", "Device", "GuestImage", "GuestResult", "build_image", "run_guest"]
