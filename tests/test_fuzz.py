"""The fuzz targets (fuzz/) in the test suite.

* every committed regression input is replayed; one whose defect is still open
  (fuzz/known.py) is an xfail(strict=True), so its fix shows up as a failure here until
  the entry is removed;
* every committed seed replays clean (or fails only with a known open defect);
* each target fuzzes for a few seconds through the real runner (atheris), from its seeds;
* the targets' checks can fail: each is shown catching a defect planted in emu.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from emu.devices.blk import BlkDevice
from emu.vhost_user.backend import Session
from fuzz import TARGETS
from fuzz._oracle import Finding
from fuzz.known import OPEN, tolerant


@pytest.fixture(autouse=True)
def _emu_logging_back():
    """The targets quiet emu's logger for the fuzzer; other tests read its records."""
    emu = logging.getLogger("emu")
    saved = emu.level, emu.propagate, list(emu.handlers)
    yield
    emu.setLevel(saved[0])
    emu.propagate, emu.handlers[:] = saved[1], saved[2]


ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
FUZZ_SECONDS = 4


def _target(name: str):
    return importlib.import_module(f"fuzz.{name}")


def _regressions() -> list:
    params = []
    for target in TARGETS:
        for path in sorted((FUZZ / "regressions" / target).glob("*")):
            key = f"{target}/{path.name}"
            marks = [pytest.mark.xfail(strict=True, reason=OPEN[key][1])] if key in OPEN else []
            params.append(pytest.param(target, path, id=key, marks=marks))
    return params


def test_every_open_defect_has_its_regression_input():
    for key in OPEN:
        target, name = key.split("/")
        assert (FUZZ / "regressions" / target / name).is_file(), key


@pytest.mark.parametrize(("target", "path"), _regressions())
def test_regression(target: str, path: Path):
    _target(target).one_input(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_replay(target: str):
    seeds = sorted((FUZZ / "corpus" / target).glob("seed-*"))
    assert seeds, f"no seeds for {target} (python -m fuzz.seeds)"
    run = tolerant(_target(target).one_input, target)
    for path in seeds:
        run(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_briefly(target: str, tmp_path: Path):
    """The runner itself, bounded in time; a finding (crash) fails the test."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            target,
            "--time",
            str(FUZZ_SECONDS),
            "--seed",
            "1",
            "--work-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    crashes = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert proc.returncode == 0 and not crashes, proc.stderr[-3000:]
    assert "Done" in proc.stderr, proc.stderr[-3000:]


# -- the checks bite: each target catches a defect planted in emu --


def _seed(target: str, name: str) -> bytes:
    return (FUZZ / "corpus" / target / f"seed-{name}").read_bytes()


def test_ring_target_catches_cores_that_disagree(monkeypatch):
    from fuzz import ring

    class Lossy(ring._ring.SplitRing):
        def pop(self, max_chains):  # drops every chain: what a core bug would look like
            super().pop(max_chains)
            return ring.Batch.empty()

    monkeypatch.setattr(ring, "_ring", type("core", (), {"SplitRing": Lossy}))
    with pytest.raises(Finding, match="pop"):
        ring.one_input(_seed("ring", "split-f0"))


def test_devices_target_catches_writes_outside_the_buffers(monkeypatch):
    from fuzz import devices

    execute = BlkDevice._execute

    def stray(self, r):
        self.mem.write(devices.RINGS - 16, b"!")  # below every ring: never given to it
        return execute(self, r)

    monkeypatch.setattr(BlkDevice, "_execute", stray)
    monkeypatch.setenv("EMU_BLK_PLANE", "python")  # the plant is in the Python path
    with pytest.raises(Finding, match="outside the buffers"):
        devices.one_input(_seed("devices", "00-q0-split"))


def test_devices_target_catches_used_lengths_beyond_the_buffer(monkeypatch):
    from fuzz import devices

    monkeypatch.setattr(BlkDevice, "_execute", lambda self, r: (0, 1 << 20))
    monkeypatch.setenv("EMU_BLK_PLANE", "python")  # the plant is in the Python path
    with pytest.raises(Finding, match="used length"):
        devices.one_input(_seed("devices", "00-q0-split"))


def test_mmio_target_catches_an_exception_the_device_thread_swallowed(monkeypatch):
    from fuzz import mmio

    def broken(self, q):
        raise KeyError("planted")

    monkeypatch.setattr(BlkDevice, "handle_queue", broken)
    with pytest.raises(Finding, match="planted"):
        for how in range(0x40):  # every blk variant the seeds bring up and kick
            if 1 + how % 4 == 2 and (FUZZ / "corpus" / "mmio" / f"seed-{how:02x}").exists():
                mmio.one_input(_seed("mmio", f"{how:02x}"))


def test_vhost_user_target_catches_an_fd_leak(monkeypatch):
    from fuzz import vhost_user

    monkeypatch.setattr(Session, "close", lambda self: self.reset())  # keeps the socket
    with pytest.raises(Finding, match="fds leaked"):
        vhost_user.one_input(_seed("vhost_user", "00-split"))


def test_state_target_catches_a_non_state_error(monkeypatch):
    from fuzz import state

    def bad(data):
        raise ValueError("planted")

    monkeypatch.setattr(state, "decode", bad)
    with pytest.raises(Finding, match="planted"):
        state.one_input(_seed("state", "rng-v0-split"))
