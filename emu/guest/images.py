"""A bootable guest per kind: the kernel from its Debian package plus a matching initramfs.

`uml` is user-mode-linux (the kernel is a host program with virtio_uml built in, which
speaks vhost-user itself). `microvm` is Debian's cloud kernel for QEMU's microvm machine,
whose virtio-mmio devices are described by ACPI. Initramfs images are cached under
`<cache>/images/`, keyed by the package versions and by the builder's own source, so a
change to /init or to the builder gives a new image without a manual version bump.

`build_image(kind, fio=True)` appends a layer with Debian's fio, its shared libraries and
the loader (84 MB, uncompressed: Debian's fio links every engine's library, Ceph's and
GlusterFS's included); it is built once for both kinds and only the guests that run fio
pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emu.guest import cpio, initramfs, libs, modules
from emu.guest.init_script import INIT
from emu.guest.packages import (
    PackageError,
    cache_dir,
    candidate_version,
    first_dependency,
    unpacked,
)

KINDS = ("uml", "microvm")

#: where the fio layer puts fio's libraries; /init runs fio with LD_LIBRARY_PATH set to it
FIO_LIBDIR = "/usr/lib/emu-fio"
FIO_BIN = "/usr/bin/fio"

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


def _builder_digest(*mods) -> str:
    h = hashlib.sha256()
    for mod in mods:
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    """Writes beside and renames, so a concurrent builder never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def fio_files() -> tuple[dict[str, Path], dict[str, str]]:
    """({guest path: file} for fio, its libraries and loader, {package: version})."""
    prog = libs.resolve("fio", FIO_BIN)
    loader = Path(prog.interpreter).name
    files = {FIO_BIN: prog.path, prog.interpreter: prog.libraries[loader]}
    for soname, path in prog.libraries.items():
        if soname != loader:
            files[f"{FIO_LIBDIR}/{soname}"] = path
    return files, prog.packages


def _fio_layer() -> tuple[Path, dict[str, str]]:
    """The cached fio layer and the packages it holds, keyed by fio's version.

    Its libraries are those current when it was first built; a new fio version (or a
    change to the builder) builds it again.
    """
    key = json.dumps([candidate_version("fio"), _builder_digest(initramfs, libs)])
    layer = cache_dir() / "images" / f"fio-{hashlib.sha256(key.encode()).hexdigest()[:16]}.cpio"
    manifest = layer.with_suffix(".json")
    if layer.exists() and manifest.exists():
        return layer, json.loads(manifest.read_text())
    files, packages = fio_files()
    _write(layer, initramfs.layer(files))
    _write(manifest, json.dumps(packages, sort_keys=True).encode())
    return layer, packages


def build_image(kind: str, fio: bool = False) -> GuestImage:
    """The cached image for `kind`, downloading and building whatever is missing.

    fio: with the fio layer appended (for the `fio` workload).
    """
    kernel, moddir, packages = _kernel(kind)
    bb_root, bb_version = unpacked("busybox-static")
    packages["busybox-static"] = bb_version
    key = json.dumps(
        [kind, packages, WANTED[kind], INIT, _builder_digest(cpio, initramfs, modules)],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    initrd = cache_dir() / "images" / f"{kind}-{digest}.cpio.gz"
    if not initrd.exists():
        mods = modules.resolve(moddir, WANTED[kind], modules.builtin_names(moddir))
        _write(initrd, initramfs.build(bb_root / "bin/busybox", mods, INIT))
    if fio:
        layer, fio_packages = _fio_layer()
        packages.update(fio_packages)
        combined = initrd.with_name(f"{kind}-{digest}-{layer.stem}.initrd")
        if not combined.exists():
            base = initrd.read_bytes()  # an uncompressed archive must start 4-byte aligned
            _write(combined, base + b"\0" * (-len(base) % 4) + layer.read_bytes())
        initrd = combined
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
