"""Kernel modules for the initramfs: find them by name, order them by `depends=`.

The guest has no modprobe/depmod data, so /init insmods a fixed list; that list must put
every module after the modules it depends on. The dependencies are read from each .ko's
`.modinfo` section (what modinfo(8) prints), so no kmod is needed on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike (virtio-rng.ko registers as virtio_rng)."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class Module:
    name: str  # canonical name
    path: Path
    depends: tuple[str, ...]  # canonical names


def read_modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (last value wins)."""
    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".modinfo")
        raw = sec.data() if sec is not None else b""
    info: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def load_module(path: Path) -> Module:
    info = read_modinfo(path)
    name = info.get("name") or path.name.removesuffix(".ko")
    deps = tuple(canonical(d) for d in info.get("depends", "").split(",") if d)
    return Module(canonical(name), path, deps)


def index(root: Path) -> dict[str, Path]:
    """Canonical module name -> .ko path for every module under root."""
    return {canonical(p.name.removesuffix(".ko")): p for p in sorted(root.rglob("*.ko"))}


def resolve(root: Path, wanted: list[str], builtin: set[str] = frozenset()) -> list[Module]:
    """`wanted` plus everything they depend on, each module after its dependencies.

    Names in `builtin` (from modules.builtin) are satisfied without a .ko. Ties keep the
    order of `wanted`, so the result is stable. Raises LookupError for a module that is
    neither present nor built in, ValueError for a dependency cycle.
    """
    paths = index(root)
    builtin = {canonical(b) for b in builtin}
    order: list[Module] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        if name in done or name in builtin:
            return
        if name in active:
            raise ValueError(f"module dependency cycle: {' -> '.join([*active, name])}")
        if name not in paths:
            raise LookupError(f"module {name} not found under {root}")
        active.append(name)
        mod = load_module(paths[name])
        for dep in mod.depends:
            visit(dep)
        active.pop()
        done.add(name)
        order.append(mod)

    for name in wanted:
        visit(canonical(name))
    return order


def builtin_names(modules_dir: Path) -> set[str]:
    """Modules compiled into the kernel, from `<modules_dir>/modules.builtin` if present."""
    f = modules_dir / "modules.builtin"
    if not f.exists():
        return set()
    return {canonical(Path(line).name.removesuffix(".ko")) for line in f.read_text().split()}
