"""A dynamically linked program from a Debian package, with every shared library it loads.

The guest has no libraries of its own (busybox is static), so a dynamic program goes in
with its whole DT_NEEDED closure and its loader. The libraries are looked up in the
packages the program's package depends on, transitively: dpkg-shlibdeps puts the package
of every needed soname into Depends, so following the Depends of each package that gave a
library finds them all. Everything comes from `apt-get download` into emu's cache, so a
fresh machine needs nothing installed, and the host's own libraries never leak in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from emu.guest.packages import PackageError, dependencies, unpacked, unpacked_all


@dataclass(frozen=True)
class Program:
    path: Path  # the program inside its unpacked package
    interpreter: str  # its PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
    libraries: dict[str, Path]  # soname -> the file in an unpacked package (loader included)
    packages: dict[str, str]  # package -> version, of every package that gave a file


@dataclass(frozen=True)
class _Elf:
    soname: str | None
    needed: tuple[str, ...]
    interpreter: str | None


def _read_elf(path: Path) -> _Elf | None:
    """DT_SONAME, DT_NEEDED and PT_INTERP of an ELF file; None if it is not ELF."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            soname, needed, interp = None, [], None
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    interp = seg.get_interp_name()
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    for tag in sec.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)
                        elif tag.entry.d_tag == "DT_SONAME":
                            soname = tag.soname
    except (OSError, ELFError):
        return None
    return _Elf(soname, tuple(needed), interp)


def _shared_objects(root: Path) -> dict[str, tuple[Path, _Elf]]:
    """soname -> (file, its ELF facts) for the regular files of an unpacked package.

    When a soname occurs twice the file with the shorter path wins (the library directory
    over a plugin or debug directory).
    """
    found: dict[str, tuple[Path, _Elf]] = {}
    files = (p for p in root.rglob("*.so*") if p.is_file() and not p.is_symlink())
    for path in sorted(files, key=lambda p: (len(p.parts), str(p))):
        info = _read_elf(path)
        if info is not None and info.soname and info.soname not in found:
            found[info.soname] = (path, info)
    return found


def resolve(package: str, program: str) -> Program:
    """`program` (an absolute path inside `package`) and its libraries' closure."""
    root, version = unpacked(package)
    path = root / program.lstrip("/")
    info = _read_elf(path)
    if info is None:
        raise PackageError(f"{program} in {package} is not an ELF file")
    if info.interpreter is None:
        raise PackageError(f"{program} in {package} is not dynamically linked")
    used = {package: version}
    pending = [*info.needed, Path(info.interpreter).name]
    index: dict[str, tuple[Path, _Elf, str]] = {}  # soname -> (file, facts, package)
    libraries: dict[str, Path] = {}
    versions: dict[str, str] = {}
    searched = {package}
    frontier = dependencies(package)
    while True:
        grew = True
        while grew:  # take everything the packages seen so far provide
            grew = False
            for soname in list(pending):
                if soname in index:
                    lib, facts, pkg = index[soname]
                    libraries[soname] = lib
                    pending.remove(soname)
                    pending += [n for n in facts.needed if n not in libraries and n not in pending]
                    if pkg not in used:
                        used[pkg] = versions[pkg]
                        frontier += dependencies(pkg)
                    grew = True
        if not pending:
            break
        frontier = [p for p in dict.fromkeys(frontier) if p not in searched]
        if not frontier:
            raise PackageError(f"{program}: no dependency of {package} provides {pending}")
        trees = unpacked_all(frontier)
        searched.update(frontier)
        frontier = []
        for pkg, (tree, ver) in trees.items():
            versions[pkg] = ver
            for soname, (lib, facts) in _shared_objects(tree).items():
                index.setdefault(soname, (lib, facts, pkg))
    return Program(path, info.interpreter, libraries, used)
