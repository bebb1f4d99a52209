"""A bootable guest per kind: the kernel from its Debian package plus a matching initramfs.

`uml` is user-mode-linux (the kernel is a host program with virtio_uml built in, which
speaks vhost-user itself). `microvm` is Debian's cloud kernel for QEMU's microvm machine,
whose virtio-mmio devices are described by ACPI. Initramfs images are cached under
`<cache>/images/`, keyed by the package versions and by the builder's own source, so a
change to /init or to the builder gives a new image without a manual version bump.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emu.guest import cpio, initramfs, modules
from emu.guest.init_script import INIT
from emu.guest.packages import PackageError, cache_dir, first_dependency, unpacked

KINDS = ("uml", "microvm")

#: modules each guest loads; their dependencies are added and ordered by modules.resolve
WANTED = {
    "uml": ["virtio_blk", "virtio_net", "virtio_console", "vmw_vsock_virtio_transport", "virtiofs"],
    "microvm": [
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "virtio-rng",
        "vmw_vsock_virtio_transport",
        "virtiofs",
    ],
}


@dataclass(frozen=True)
class GuestImage:
    kind: str
    kernel: Path
    initrd: Path
    kernel_release: str  # the guest's `uname -r`
    packages: dict[str, str]  # Debian package -> version it was built from


def _only(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise PackageError(f"expected one {what}, found {[str(p) for p in paths]}")
    return paths[0]


def _kernel(kind: str) -> tuple[Path, Path, dict[str, str]]:
    """(kernel, its modules directory, {package: version}) for a guest kind."""
    if kind == "uml":
        root, version = unpacked("user-mode-linux")
        moddir = _only(sorted((root / "usr/lib/uml/modules").iterdir()), "UML module tree")
        return root / "usr/bin/linux.uml", moddir, {"user-mode-linux": version}
    if kind == "microvm":
        package = first_dependency("linux-image-cloud-amd64")
        root, version = unpacked(package)
        moddir = _only(sorted((root / "lib/modules").iterdir()), "kernel module tree")
        kernel = _only(sorted((root / "boot").glob("vmlinuz-*")), "bzImage")
        return kernel, moddir, {package: version}
    raise ValueError(f"unknown guest kind {kind!r} (want one of {', '.join(KINDS)})")


def _builder_digest() -> str:
    h = hashlib.sha256(INIT.encode())
    for mod in (cpio, initramfs, modules):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def build_image(kind: str) -> GuestImage:
    """The cached image for `kind`, downloading and building whatever is missing."""
    kernel, moddir, packages = _kernel(kind)
    bb_root, bb_version = unpacked("busybox-static")
    packages["busybox-static"] = bb_version
    key = json.dumps([kind, packages, WANTED[kind], _builder_digest()], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    initrd = cache_dir() / "images" / f"{kind}-{digest}.cpio.gz"
    if not initrd.exists():
        mods = modules.resolve(moddir, WANTED[kind], modules.builtin_names(moddir))
        data = initramfs.build(bb_root / "bin/busybox", mods, INIT)
        initrd.parent.mkdir(parents=True, exist_ok=True)
        tmp = initrd.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(initrd)
    return GuestImage(kind, kernel, initrd, moddir.name, packages)


def export_image(image: GuestImage, out: Path) -> GuestImage:
    """Copies kernel and initramfs to `out` (for use outside emu) and describes the copy."""
    out.mkdir(parents=True, exist_ok=True)
    kernel = out / ("linux.uml" if image.kind == "uml" else "vmlinuz")
    initrd = out / "initramfs.cpio.gz"
    shutil.copy2(image.kernel, kernel)
    shutil.copy2(image.initrd, initrd)
    manifest = {
        "kind": image.kind,
        "kernel_release": image.kernel_release,
        "packages": image.packages,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return GuestImage(image.kind, kernel, initrd, image.kernel_release, image.packages)
