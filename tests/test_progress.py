"""Progress on stderr: shown when asked (or on a terminal), never otherwise, never on stdout.

The download test runs emu's real package code (emu.guest.packages) against stand-in
apt-get and apt-cache programs on PATH that serve a real .deb built here, written in two
halves with a pause between, so the progress must report a download half done.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from emu import progress
from emu.cli import main
from emu.guest import livemig, packages, vm

GOLDEN = Path(__file__).parent / "golden" / "v1" / "rng-split.state"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def steps(stream: io.StringIO) -> str:
    with progress.progress("counting", 3, stream) as bar:
        for i in range(3):
            bar.update(1, f"item {i}")
    return stream.getvalue()


def test_nothing_unless_asked_or_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    assert steps(io.StringIO()) == ""
    monkeypatch.setenv(progress.ENV, "0")
    assert steps(Terminal()) == ""


def test_a_terminal_gets_clicks_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    out = steps(Terminal())
    assert "\r" in out and "counting" in out and "3/3" in out and "item 2" in out


def test_asked_for_in_a_log_it_is_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    lines = steps(io.StringIO()).splitlines()
    assert lines[0] == "counting: 0/3 (0%) started"
    assert lines[1:4] == [f"counting: {i}/3 ({100 * i // 3}%) item {i - 1}" for i in (1, 2, 3)]
    assert re.fullmatch(r"counting: 3/3 \(100%\) done in \d+\.\d s", lines[4])


def test_the_cli_flag_holds_for_the_command_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import emu.commands.state as state_command

    seen = []
    real = state_command.view

    def watched(*args, **kw):
        seen.append(progress.wanted(io.StringIO()))
        return real(*args, **kw)

    monkeypatch.setattr(state_command, "view", watched)
    monkeypatch.delenv(progress.ENV, raising=False)
    assert CliRunner().invoke(main, ["--progress", "state", "show", str(GOLDEN)]).exit_code == 0
    assert progress.ENV not in os.environ
    monkeypatch.setenv(progress.ENV, "1")
    assert CliRunner().invoke(main, ["--no-progress", "state", "show", str(GOLDEN)]).exit_code == 0
    assert os.environ[progress.ENV] == "1"
    assert seen == [True, False]


# -- a download through emu's package code --


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """apt-get / apt-cache stand-ins serving one package, emu-fake 1.0, of about 64 KiB."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (it unpacks every guest package)")
    root = tmp_path / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: emu-fake\nVersion: 1.0\nArchitecture: all\nMaintainer: emu <emu@localhost>\n"
        "Description: progress test\n"
    )
    (root / "usr/share/emu-fake").mkdir(parents=True)
    (root / "usr/share/emu-fake/data").write_bytes(os.urandom(64 << 10))  # stays 64 KiB
    deb = tmp_path / "emu-fake.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    size = deb.stat().st_size
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-cache").write_text(
        f"#!/bin/sh\nprintf 'Package: emu-fake\\nVersion: 1.0\\nSize: {size}\\n'\n"
    )
    half = size // 2
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        '[ "$1" = download ] || exit 0\n'
        f"head -c {half} {deb} > emu-fake_1.0_all.deb\n"
        "sleep 1.5\n"
        f"tail -c +{half + 1} {deb} >> emu-fake_1.0_all.deb\n"
    )
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("EMU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    return deb


def test_a_download_shows_its_progress_when_asked(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(progress.ENV, "1")
    root, version = packages.unpacked("emu-fake")
    assert version == "1.0" and (root / "usr/share/emu-fake/data").stat().st_size == 64 << 10
    out, err = capsys.readouterr()
    assert out == ""
    total = fake_apt.stat().st_size >> 10
    got = [
        int(m.group(1))
        for m in re.finditer(rf"^downloading emu-fake \(KiB\): (\d+)/{total} ", err, re.M)
    ]
    assert got[0] == 0 and got[-1] == total, err
    assert any(0 < n < total for n in got), err  # seen half way, during the pause
    assert re.search(r"^unpacking emu-fake: 1/1 \(100%\) done in ", err, re.M), err


def test_a_download_is_silent_when_not_asked(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    root, _ = packages.unpacked("emu-fake")
    assert (root / "usr/share/emu-fake/data").is_file()
    assert capsys.readouterr() == ("", "")


def test_a_failed_download_says_why(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(progress.ENV, "1")
    (tmp_path / "bin" / "apt-get").write_text(
        '#!/bin/sh\n[ "$1" = download ] || exit 0\necho "E: no such archive" >&2\nexit 100\n'
    )
    with pytest.raises(packages.PackageError, match="failed \\(100\\): E: no such archive"):
        packages.unpacked("emu-fake")


class _Qmp:
    """QEMU's answers to a live migration's commands: query-migrate as a first pass goes."""

    def __init__(self) -> None:
        self.left = [256, 216, 56, 0, 0]  # MiB of RAM still to send

    def execute(self, cmd: str, **args: object) -> dict:
        if cmd != "query-migrate":
            return {}
        left = self.left.pop(0) if len(self.left) > 1 else self.left[0]
        ram = {"total": 256 << 20, "remaining": left << 20, "dirty-sync-count": 2 - bool(left)}
        return {"status": "active", "ram": ram}


def test_a_live_migration_shows_ram_done_and_its_pass(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    src = object.__new__(vm.Vm)  # the real Vm.migration over a scripted QMP
    src.qmp, src.on_migration = _Qmp(), None
    assert livemig.migrate(src, "tcp:x", None, 1 << 20)["status"] == "active"
    out, err = capsys.readouterr()
    assert out == "" and src.on_migration is None
    lines = err.splitlines()
    assert lines[0].startswith("live migration, MiB of RAM done: 0/256 (0%) started")
    assert "live migration, MiB of RAM done: 40/256 (15%) pass 1, active" in lines
    assert "live migration, MiB of RAM done: 256/256 (100%) pass 2, active" in lines
    assert "done in" in lines[-1]
