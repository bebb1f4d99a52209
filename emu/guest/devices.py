"""The devices a guest is started with: `TYPE:PATH` pairs.

vhost-user types (PATH is the backend's listening unix socket): blk, net, console, rng,
vsock, fs, balloon (UML only). For microvm, QEMU's own (in-process) devices are also
available as a baseline: qemu-blk:IMAGE, qemu-net:user (slirp), qemu-rng:/dev/urandom,
qemu-console:OUTFILE. Under microvm, `,key=value` after PATH are passed to QEMU's
-device (e.g. `blk:S,packed=on` to have the guest use packed rings, `queue-size=256`).
An fs device's `tag=NAME` is the tag the guest mounts: QEMU puts it in the device's
config space; under UML the backend's config has it, so there it only tells the guest's
`fs` workload what to mount.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.devices import registry

#: virtio device ids (virtio spec 5) of vhost-user types emu does not implement itself
#: (another backend serves them); emu's own types come from its device registry
OTHER_VIRTIO_ID: dict[str, int] = {}
QEMU_BUILTIN = ("qemu-blk", "qemu-net", "qemu-rng", "qemu-console")


def virtio_ids() -> dict[str, int]:
    """vhost-user device type -> virtio device id, which is what virtio_uml.device= takes."""
    return {**{t.name: t.device_id for t in registry.types()}, **OTHER_VIRTIO_ID}


@dataclass(frozen=True)
class Device:
    type: str
    path: str
    options: tuple[str, ...] = ()  # QEMU -device properties (microvm only)

    @classmethod
    def parse(cls, spec: str | tuple[str, str] | Device) -> Device:
        """Accepts "blk:/run/blk.sock[,opt=v...]", ("blk", "/run/blk.sock") or a Device."""
        if isinstance(spec, Device):
            return spec
        if isinstance(spec, str):
            kind, sep, path = spec.partition(":")
            if not sep or not path:
                raise ValueError(f"device {spec!r}: expected TYPE:PATH")
            spec = (kind, path)
        kind, path = spec
        path, *options = str(path).split(",")
        ids = virtio_ids()
        if kind not in ids and kind not in QEMU_BUILTIN:
            known = ", ".join([*ids, *QEMU_BUILTIN])
            raise ValueError(f"device type {kind!r} unknown (known: {known})")
        return cls(kind, path, tuple(options))

    @property
    def vhost_user(self) -> bool:
        return self.type in virtio_ids()

    @property
    def tag(self) -> str | None:
        """An fs device's `tag=` option (None: not given)."""
        tags = [o.partition("=")[2] for o in self.options if o.startswith("tag=")]
        return tags[-1] if self.type == "fs" and tags else None
