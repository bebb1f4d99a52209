"""A bootable guest per kind: the kernel from its Debian package plus a matching initramfs.

`uml` is user-mode-linux (the kernel is a host program with virtio_uml built in, which
speaks vhost-user itself). `microvm` is Debian's cloud kernel for QEMU's microvm machine,
whose virtio-mmio devices are described by ACPI. Initramfs images are cached under
`<cache>/images/`, keyed by the package versions and by the builder's own source, so a
change to /init or to the builder gives a new image without a manual version bump.

`build_image(kind, fio=True)` appends a layer with Debian's fio, its shared libraries and
the loader (84 MB, uncompressed: Debian's fio links every engine's library, Ceph's and
GlusterFS's included); it is built once for both kinds and only the guests that run fio
pay for it. `socat=True` appends Debian's socat the same way (it speaks VSOCK-LISTEN /
VSOCK-CONNECT, for the vsock workload).
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
from emu.progress import progress

KINDS = ("uml", "microvm")

#: where the fio layer puts fio's libraries; /init runs fio with LD_LIBRARY_PATH set to it
FIO_LIBDIR = "/usr/lib/emu-fio"
FIO_BIN = "/usr/bin/fio"
SOCAT_LIBDIR = "/usr/lib/emu-socat"
SOCAT_BIN = "/usr/bin/socat"


@dataclass(frozen=True)
class Layer:
    """A Debian program appended to the image with its libraries (in a directory of its
    own, which /init puts in LD_LIBRARY_PATH when it runs the program) and the loader."""

    package: str
    program: str  # absolute path inside the package and in the guest
    libdir: str


LAYERS = {
    "fio": Layer("fio", FIO_BIN, FIO_LIBDIR),
    "socat": Layer("socat", SOCAT_BIN, SOCAT_LIBDIR),
}

#: modules each guest loads; their dependencies are added and ordered by modules.resolve
WANTED = {
    "uml": [
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "vmw_vsock_virtio_transport",
        "virtiofs",
        "virtio_balloon",
    ],
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


def layer_files(layer: Layer) -> tuple[dict[str, Path], dict[str, str]]:
    """({guest path: file} for the program, its libraries and loader, {package: version})."""
    prog = libs.resolve(layer.package, layer.program)
    loader = Path(prog.interpreter).name
    files = {layer.program: prog.path, prog.interpreter: prog.libraries[loader]}
    for soname, path in prog.libraries.items():
        if soname != loader:
            files[f"{layer.libdir}/{soname}"] = path
    return files, prog.packages


def fio_files() -> tuple[dict[str, Path], dict[str, str]]:
    """layer_files of the fio layer."""
    return layer_files(LAYERS["fio"])


def _layer(name: str) -> tuple[Path, dict[str, str]]:
    """The cached layer `name` and the packages it holds, keyed by the program's version.

    Its libraries are those current when it was first built; a new program version (or a
    change to the builder) builds it again.
    """
    layer = LAYERS[name]
    key = json.dumps([candidate_version(layer.package), _builder_digest(initramfs, libs)])
    if name != "fio":  # the fio layer's key predates the others: cached layers stay valid
        key = json.dumps([key, layer.program, layer.libdir])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "images" / f"{name}-{digest}.cpio"
    manifest = path.with_suffix(".json")
    if path.exists() and manifest.exists():
        return path, json.loads(manifest.read_text())
    files, packages = layer_files(layer)
    with progress(f"building the {name} layer (files)", len(files)) as bar:
        _write(path, initramfs.layer(files, lambda f: bar.update(1, f)))
    _write(manifest, json.dumps(packages, sort_keys=True).encode())
    return path, packages


def build_image(kind: str, fio: bool = False, socat: bool = False) -> GuestImage:
    """The cached image for `kind`, downloading and building whatever is missing.

    fio: with the fio layer appended (for the `fio` workload); socat: with the socat
    layer (for the `vsock` workload).
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
        with progress(f"building the {kind} initramfs (files)", 3 + len(mods)) as bar:
            busybox = bb_root / "bin/busybox"
            _write(initrd, initramfs.build(busybox, mods, INIT, lambda f: bar.update(1, f)))
    layers = [name for name, wanted in (("fio", fio), ("socat", socat)) if wanted]
    if layers:
        parts = []
        for name in layers:
            path, layer_packages = _layer(name)
            packages.update(layer_packages)
            parts.append(path)
        stems = "-".join(p.stem for p in parts)
        combined = initrd.with_name(f"{kind}-{digest}-{stems}.initrd")
        if not combined.exists():
            data = initrd.read_bytes()
            for part in parts:  # an uncompressed archive must start 4-byte aligned
                data += b"\0" * (-len(data) % 4) + part.read_bytes()
            _write(combined, data)
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
