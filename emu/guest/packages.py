"""Debian packages as unpacked trees in emu's cache, without installing them.

Guest kernels and busybox come from the distribution's archive (`apt-get download`,
`dpkg-deb -x`), so nothing binary is kept in the repository and the host's own packages
are left alone. Each package is unpacked once per version under
`<cache>/pkgs/<name>_<version>/`; anything built from them is keyed by those versions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from emu.progress import Progress, progress


class PackageError(RuntimeError):
    """A package could not be found, downloaded or unpacked."""


def cache_dir() -> Path:
    """$EMU_CACHE, else ~/.cache/emu (created on first use)."""
    path = Path(os.environ.get("EMU_CACHE") or Path.home() / ".cache" / "emu")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise PackageError(f"{cmd[0]} is not available: {e}") from None
    if res.returncode:
        raise PackageError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _lists_stamp() -> int:
    """Changes whenever `apt-get update` changes the package lists."""
    lists = Path("/var/lib/apt/lists")
    try:
        return max((p.stat().st_mtime_ns for p in lists.iterdir() if p.is_file()), default=0)
    except OSError:
        return 0


def _apt_show(name: str) -> str:
    """`apt-cache show` of the candidate, remembered in the cache until the lists change.

    apt-cache takes about 0.6 s a call here (no binary package cache), which would
    otherwise double the cost of starting a UML guest.
    """
    memo_file = cache_dir() / "apt-show.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    stamp = _lists_stamp()
    if memo.get("stamp") == stamp and name in memo.get("show", {}):
        return memo["show"][name]
    try:
        text = _run("apt-cache", "show", "--no-all-versions", name)
    except PackageError:  # unknown: the lists may never have been fetched
        _run("apt-get", "update", "-qq")
        text = _run("apt-cache", "show", "--no-all-versions", name)
        stamp = _lists_stamp()
    if memo.get("stamp") != stamp:
        memo = {"stamp": stamp, "show": {}}
    memo["show"][name] = text
    tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(memo_file)
    return text


def _field(control: str, key: str) -> str:
    for line in control.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def candidate_version(name: str) -> str:
    version = _field(_apt_show(name), "Version")
    if not version:
        raise PackageError(f"no candidate version for {name}")
    return version


def first_dependency(name: str) -> str:
    """The first Depends: of a metapackage, e.g. linux-image-cloud-amd64's versioned image."""
    deps = dependencies(name)
    if not deps:
        raise PackageError(f"{name} has no Depends")
    return deps[0]


def dependencies(name: str) -> list[str]:
    """Pre-Depends and Depends of the candidate, first alternative of each, no versions."""
    show = _apt_show(name)
    names = []
    for key in ("Pre-Depends", "Depends"):
        for item in filter(None, (d.strip() for d in _field(show, key).split(","))):
            names.append(item.split("|")[0].split("(")[0].split(":")[0].strip())
    return names


def unpacked(name: str) -> tuple[Path, str]:
    """(root of the unpacked package, its version), downloading it if not cached yet.

    A failed download is retried once after `apt-get update`: stale lists name versions
    the archive no longer has.
    """
    try:
        return _unpack(name)
    except PackageError:
        _run("apt-get", "update", "-qq")
        return _unpack(name)


def unpacked_all(names: list[str]) -> dict[str, tuple[Path, str]]:
    """`unpacked` for many packages, downloading the missing ones with one apt-get call."""
    try:
        return _unpack_all(names)
    except PackageError:
        _run("apt-get", "update", "-qq")
        return _unpack_all(names)


def _place(name: str, version: str) -> Path:
    return cache_dir() / "pkgs" / f"{name}_{version.replace(':', '%3a')}"


def _unpack(name: str) -> tuple[Path, str]:
    return _unpack_all([name])[name]


def _unpack_all(names: list[str]) -> dict[str, tuple[Path, str]]:
    wanted = {name: candidate_version(name) for name in dict.fromkeys(names)}
    missing = {n: v for n, v in wanted.items() if not _place(n, v).is_dir()}
    if missing:
        _download(missing)
    return {n: (_place(n, v), v) for n, v in wanted.items()}


def _download(packages: dict[str, str]) -> None:
    parent = cache_dir() / "pkgs"
    parent.mkdir(parents=True, exist_ok=True)
    # Download and unpack beside the final place, then rename: concurrent builders never
    # see a half-unpacked tree, and a crash leaves only a stray temp dir.
    with tempfile.TemporaryDirectory(dir=parent, prefix=".dl-") as tmp:
        # apt's _apt sandbox user cannot write to root-owned caches; the warning is harmless.
        cmd = ("apt-get", "download", "-q", *(f"{n}={v}" for n, v in packages.items()))
        _fetch(cmd, Path(tmp), packages)
        bar = progress(f"unpacking {', '.join(packages)}", len(packages))
        with bar:
            _unpack_into(Path(tmp), packages, bar)


def _size_kib(name: str) -> int:
    """The candidate's .deb size (apt-cache's Size:), 0 when the lists do not say."""
    try:
        return int(_field(_apt_show(name), "Size") or 0) >> 10
    except ValueError:
        return 0


def _fetch(cmd: tuple[str, ...], into: Path, packages: dict[str, str]) -> None:
    """``_run(*cmd, cwd=into)`` for apt-get download, watched: the progress is what has
    reached the directory against the sizes the package lists give."""
    total = sum(_size_kib(n) for n in packages)
    with progress(f"downloading {', '.join(packages)} (KiB)", total) as bar:
        with tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.Popen(
                    cmd, cwd=into, stdout=subprocess.DEVNULL, stderr=err, text=True
                )
            except FileNotFoundError as e:
                raise PackageError(f"{cmd[0]} is not available: {e}") from None
            done = 0
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    now = min(total, _bytes_under(into) >> 10)
                    bar.update(now - done)
                    done = now
            if proc.returncode:
                err.seek(0)
                raise PackageError(
                    f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().strip()}"
                )
            bar.update(total - done)


def _bytes_under(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:  # renamed away under us: apt moves partial files into place
                pass
    return total


def _unpack_into(tmp: Path, packages: dict[str, str], bar: Progress) -> None:
    for name, version in packages.items():
        bar.update(0, name)
        debs = list(tmp.glob(f"{name}_*.deb"))
        if len(debs) != 1:
            raise PackageError(f"apt-get download {name} gave {len(debs)} .deb files")
        tree = tmp / f"root-{name}"
        _run("dpkg-deb", "-x", str(debs[0]), str(tree))
        root = _place(name, version)
        try:
            tree.rename(root)
        except OSError:
            if not root.is_dir():  # lost a race with another builder: theirs is as good
                raise
            shutil.rmtree(tree, ignore_errors=True)
        bar.update(1, name)
