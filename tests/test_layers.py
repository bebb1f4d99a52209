"""The layer order (docs/architecture.md) as import-linter contracts in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layer_contracts_hold() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_the_contracts_catch_an_upward_import(tmp_path: Path) -> None:
    """A device importing the reference driver, and a transport importing blk, are caught."""
    shutil.copytree(ROOT / "emu", tmp_path / "emu", ignore=shutil.ignore_patterns("*.so", "*.c"))
    with open(tmp_path / "emu" / "devices" / "rng.py", "a") as f:
        f.write("\nimport emu.testing.driver  # noqa\n")
    with open(tmp_path / "emu" / "transport" / "mmio.py", "a") as f:
        f.write("\nimport emu.devices.blk  # noqa\n")
    res = lint(tmp_path)
    assert res.returncode != 0
    assert "emu.devices.rng -> emu.testing.driver" in res.stdout
    assert "emu.transport.mmio -> emu.devices.blk" in res.stdout
