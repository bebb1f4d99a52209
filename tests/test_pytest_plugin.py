"""emu's pytest plugin: its params, its fixtures and markers inside another test suite, and
examples/ run against emu installed from a wheel, not against this source tree.

Suites run in pytest subprocesses with their own pytest.ini (so this tree's settings do
not apply) and a JUnit XML report whose outcomes and skip reasons are checked. The guests
boot only in the examples run (two boots: a UML guest, a microvm guest with a snapshot
and a restore).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from emu.testing.device_param import DeviceParam, device_params
from emu.testing.guest_session import GuestParam, unavailable

ROOT = Path(__file__).resolve().parents[1]


# -- params --


def test_device_param_parses_tokens_in_any_order():
    assert DeviceParam.parse(None) == DeviceParam()
    assert DeviceParam.parse("blk-packed-python") == DeviceParam("blk", "packed", "python")
    assert DeviceParam.parse("python/net") == DeviceParam("net", core="python")
    assert DeviceParam.parse({"type": "fs", "ring": "packed"}).id.startswith("fs-packed-")
    assert len(device_params(types=["rng", "blk"])) == 8


@pytest.mark.parametrize(
    "spec, error",
    [
        ("disk", "device type 'disk'"),
        ("blk-split-packed", "two rings"),
        ({"type": "rng", "core": "rust"}, "ring core 'rust'"),
    ],
)
def test_device_param_refuses_what_it_does_not_know(spec, error):
    with pytest.raises(ValueError, match=error):
        DeviceParam.parse(spec)


def test_guest_param_parses_and_refuses():
    assert GuestParam.parse("microvm-qsd") == GuestParam("microvm", "qsd")
    assert GuestParam.parse(None) == GuestParam("uml", "emu")
    with pytest.raises(ValueError, match="needs kind=microvm"):
        GuestParam.parse("uml-qemu")
    with pytest.raises(ValueError, match="guest kind 'kvm'"):
        GuestParam.parse("kvm")
    with pytest.raises(ValueError, match="no device type 'gpu'"):
        GuestParam(extra=("gpu",))


# -- a suite that uses the plugin, from this source tree --

SUITE = '''
import pytest
from emu.testing.pytest_plugin import device_params

TYPES = ["rng", "blk", "console", "net", "fs", "vsock", "balloon"]
MODULES = {"cython": "emu._ring", "python": "emu.pyring"}


def io(dev):
    """One real round trip through the device, whatever its type."""
    kind = dev.param.type
    if kind == "rng":
        assert len(dev.read(32)) == 32
    elif kind == "blk":
        assert dev.write(1, b"z" * 512) == 0 and dev.read(1, 1) == b"z" * 512
        assert dev.host.read_bytes()[512:1024] == b"z" * 512
    elif kind == "console":
        dev.write(0, b"hi")
        assert dev.host.wait_output(2) == b"hi"
    elif kind == "net":
        dev.host.send(dev.mac * 2 + b"\\x88\\xb5" + b"x" * 50)
        assert dev.recv()[1][12:] == b"\\x88\\xb5" + b"x" * 50
    elif kind == "fs":
        (dev.host / "f").write_bytes(b"on the host")
        assert [d.name for d in dev.listdir(1) if d.name == b"f"] == [b"f"]
    elif kind == "vsock":
        assert dev.cid == 3
    elif kind == "balloon":
        assert dev.actual == 0 and "inflate" in dev.q


@pytest.mark.parametrize("emu_device", device_params(types=TYPES), indirect=True)
def test_every_device(emu_device):
    io(emu_device)
    assert emu_device.packed == (emu_device.param.ring == "packed")
    assert emu_device.ring_modules == {MODULES[emu_device.param.core]}


def test_default(emu_device):
    assert emu_device.param.id.startswith("rng-split-")
    io(emu_device)


@pytest.mark.emu_guest(kind="microvm", blk="qsd")
def test_marker_microvm(emu_guest):
    raise AssertionError("must have been skipped")


@pytest.mark.emu_guest(kind="uml")
def test_marker_uml():
    raise AssertionError("must have been skipped")


@pytest.mark.parametrize("emu_guest", ["microvm"], indirect=True)
def test_fixture_param(emu_guest):
    raise AssertionError("must have been skipped")
'''


#: the plugin from this tree, whether or not this environment's emu was installed with its
#: entry point (with it, a bare -p of the module would register the plugin twice)
PLUGIN = ["-p", "no:emu", "-p", "emu.testing.pytest_plugin"]


def run_suite(
    suite: Path, cwd: Path, env: dict[str, str], *args: str
) -> tuple[dict[str, tuple[str, str]], str]:
    """pytest on ``suite``: {test name: (outcome, message)} from its JUnit report, and
    its output."""
    report = cwd / f"report-{len(list(cwd.glob('report-*')))}.xml"
    cmd = [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-rs"]
    cmd += [f"--junitxml={report}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert report.exists(), out
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("skipped", "failure", "error"):
            if (el := case.find(tag)) is not None:
                outcome, message = tag, el.get("message", "")
        outcomes[case.get("name")] = (outcome, message)
    return outcomes, out


def source_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


CLEANUP = """
import json, os, pathlib
import pytest

SEEN = pathlib.Path(__file__).with_name("seen.json")


@pytest.mark.emu_guest(kind="uml")
def test_a_guest_test_fails(emu_guest):
    SEEN.write_text(json.dumps([emu_guest.pid, str(emu_guest.dir)]))
    assert emu_guest.run("echo in the guest") == (0, "in the guest\\n")
    raise AssertionError("the test fails")


def test_its_guest_is_gone():
    pid, workdir = json.loads(SEEN.read_text())
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(workdir)
"""


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    d = tmp_path / "suite"
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\n")
    (d / "test_suite.py").write_text(textwrap.dedent(SUITE))
    (d / "test_cleanup.py").write_text(textwrap.dedent(CLEANUP))
    return d


def test_fixtures_do_io_and_markers_skip_with_the_reason(suite: Path, tmp_path: Path):
    """With no QEMU on PATH and no usable TMPDIR, the guest tests skip and say why;
    every device type does I/O in every ring format on every ring core."""
    env = source_env(PATH=str(tmp_path), TMPDIR=str(tmp_path / "missing"))
    outcomes, out = run_suite(suite, tmp_path, env, *PLUGIN)
    devices = {n: o for n, o in outcomes.items() if n.startswith("test_every_device")}
    assert len(devices) == 28, out
    assert all(o == ("passed", "") for o in devices.values()), out
    assert outcomes["test_default"] == ("passed", ""), out
    for name in ("test_marker_microvm", "test_fixture_param[microvm]"):
        assert outcomes[name][0] == "skipped", out
        assert "qemu-system-x86_64 is not installed" in outcomes[name][1], out
    assert outcomes["test_marker_uml"][0] == "skipped", out
    assert "not writable" in outcomes["test_marker_uml"][1], out


def test_emu_guests_option_skips_all_or_requires(suite: Path, tmp_path: Path):
    env = source_env(PATH=str(tmp_path))
    names = ["test_marker_microvm", "test_marker_uml", "test_fixture_param[microvm]"]
    select = ["-k", "marker or fixture_param", *PLUGIN]
    outcomes, out = run_suite(suite, tmp_path, env, "--emu-guests=skip", *select)
    for name in names:
        assert outcomes[name] == ("skipped", "guest tests are off (--emu-guests=skip)"), out
    outcomes, out = run_suite(suite, tmp_path, env, "--emu-guests=require", *select)
    assert outcomes["test_marker_microvm"][0] == "error", out  # failed in setup
    assert "--emu-guests=require, but qemu-system-x86_64" in out, out


def test_a_failing_guest_test_leaves_no_guest(suite: Path, tmp_path: Path):
    """One UML boot: the test fails, its guest is ended at teardown all the same (the
    next test sees neither its process nor its directory), and its console is shown."""
    if (why := unavailable(GuestParam("uml"))) is not None:
        pytest.skip(why)
    outcomes, out = run_suite(suite / "test_cleanup.py", tmp_path, source_env(), *PLUGIN)
    assert outcomes["test_a_guest_test_fails"] == ("failure", "AssertionError: the test fails")
    assert outcomes["test_its_guest_is_gone"] == ("passed", ""), out
    assert "--- emu uml-emu guest console" in out and "EMU-SHELL-READY" in out, out


#: a suite that uses none of the plugin's fixtures: what of emu its test finds imported
UNUSED = """
import json, pathlib, sys

def test_nothing_of_emu():
    mods = sorted(m for m in sys.modules if m == "emu" or m.startswith("emu."))
    out = pathlib.Path(__file__).with_name("modules.json")
    out.write_text(json.dumps({"emu": mods, "numpy": "numpy" in sys.modules}))
"""


@pytest.mark.parametrize(
    "verbosity",
    ["-q", "-v"],  # -v: the report header (emu's path, the ring core) shows too
)
def test_a_suite_without_the_fixtures_imports_only_the_plugin(tmp_path: Path, verbosity: str):
    """docs/pytest.md: the plugin loads for every suite once emu is installed, so it must
    not import emu's devices, rings or numpy where no fixture asks for them."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_unused.py").write_text(textwrap.dedent(UNUSED))
    outcomes, out = run_suite(
        tmp_path / "test_unused.py", tmp_path, source_env(), verbosity, *PLUGIN
    )
    assert outcomes == {"test_nothing_of_emu": ("passed", "")}, out
    seen = json.loads((tmp_path / "modules.json").read_text())
    assert seen == {"emu": ["emu", "emu.testing", "emu.testing.pytest_plugin"], "numpy": False}
    if verbosity == "-v":  # the header still tells which ring core the run would use
        assert "ring core cython (emu._ring)" in out, out


def test_uml_has_no_snapshot():
    from emu.testing.guest_session import EmuGuest

    guest = EmuGuest.__new__(EmuGuest)  # no boot: the refusal comes first
    guest.param = GuestParam("uml")
    with pytest.raises(NotImplementedError, match="UML has no snapshot"):
        guest.snapshot("/nonexistent")


# -- examples/ against an installed emu --


def source_copy(dst: Path) -> None:
    """This tree's files as git knows them, plus the build outputs of the Cython modules
    with their times: the in-place modules are put where setuptools' build_ext looks, so
    that it compiles again only what changed since (timestamps decide, as always)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [f.decode() for f in listed if f and (ROOT / f.decode()).is_file()]
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "emu").rglob("*.c")]
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    lib = f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    for so in (ROOT / "emu").rglob("*.so"):
        target = dst / "build" / lib / so.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)


def install(tmp: Path) -> Path:
    """emu built into a wheel from a copy of this tree, installed with pip --target."""
    src, dist, target = tmp / "src", tmp / "dist", tmp / "installed"
    source_copy(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # without wheel (an environment from before it was a test dependency) pip builds in
    # an isolated environment, fetching the build requirements
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("wheel") else []
    run_ok([*pip, "wheel", "--no-deps", *offline, "-w", str(dist), str(src)])
    (wheel,) = dist.glob("emu-*.whl")
    run_ok([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    return target


def run_ok(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_examples_pass_against_the_installed_package(tmp_path: Path):
    target = install(tmp_path)
    assert (target / "emu" / "testing" / "pytest_plugin.py").exists()
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples)
    run = tmp_path / "elsewhere"  # the working directory: neither the tree nor the copy
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EMU_RING")}
    env["PYTHONPATH"] = str(target)
    kinds = [GuestParam("uml"), GuestParam("microvm")]
    guests = "require" if all(unavailable(p) is None for p in kinds) else "skip"
    # no -p: the installed entry point loads the plugin
    outcomes, out = run_suite(examples, run, env, f"--emu-guests={guests}")
    assert f"emu: {target.resolve() / 'emu'}, ring core cython (emu._ring)" in out, out
    assert str(ROOT) not in out, out  # nothing, not even a traceback, from the tree
    guest_tests = {"test_commands_in_a_uml_guest", "test_microvm_snapshot_and_restore"}
    assert len(outcomes) == 11, out
    for name, (outcome, message) in outcomes.items():
        if guests == "skip" and name in guest_tests:
            assert outcome == "skipped", out
        else:
            assert (outcome, message) == ("passed", ""), out
