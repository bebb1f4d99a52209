"""user-mode-linux command lines.

UML is a host program whose built-in virtio_uml driver is a vhost-user frontend: each
`virtio_uml.device=SOCKET:ID` connects to a backend at boot. The console is the process's
stdin/stdout (con0=fd:0,fd:1); every other console and serial line is switched off so
UML opens no ptys or xterms.
"""

from __future__ import annotations

from emu.guest.devices import Device, virtio_ids
from emu.guest.images import GuestImage


def command(
    image: GuestImage, devices: list[Device], append: list[str], mem_mib: int, cpus: int = 1
) -> list[str]:
    if cpus != 1:
        raise ValueError("a UML guest has one CPU (this kernel is built without SMP)")
    args = [
        str(image.kernel),
        f"mem={mem_mib}M",
        f"initrd={image.initrd}",
        "rdinit=/init",
        "con=null",
        "ssl=null",
        "con0=fd:0,fd:1",
    ]
    ids = virtio_ids()
    for dev in devices:
        if not dev.vhost_user:
            raise ValueError(f"UML attaches vhost-user devices only, not {dev.type}")
        others = [o for o in dev.options if dev.type != "fs" or not o.startswith("tag=")]
        if others:  # an fs tag is the backend's (its config); the fs workload mounts it
            raise ValueError(f"UML takes no device options ({','.join(others)})")
        args.append(f"virtio_uml.device={dev.path}:{ids[dev.type]}")
    return args + append
