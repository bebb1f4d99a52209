"""emu's pytest plugin (entry point ``pytest11: emu``): devices and guests as fixtures.

* ``emu_device``: an in-process device on emu's virtio-mmio transport, the reference
  driver set up on it (emu.testing.device_param). Parametrize it indirectly with
  ``DeviceParam`` specs, e.g. ``"blk-packed-python"``, or ``device_params(...)``.
* ``emu_guest``: a real guest booted on emu's devices with ``run``, ``stop``, ``snapshot``
  and ``restore`` (emu.testing.guest_session), ended at teardown whatever the outcome.
  Chosen by an indirect param (``"microvm-qsd"``) or by the marker
  ``@pytest.mark.emu_guest(kind=..., blk=..., ...)`` (GuestParam's fields).
* The ``emu_guest`` marker also skips a test, with the reason, where the machine cannot
  run that guest; ``--emu-guests=skip`` skips every such test, ``--emu-guests=require``
  makes them fail instead of skipping (for CI that must not pass by skipping).

emu itself is imported only when a fixture or marker needs it, so the plugin costs a
test suite that does not use it nothing.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from emu.testing.device_param import EmuDevice
    from emu.testing.guest_session import EmuGuest, GuestParam

GUEST_MODES = ("auto", "skip", "require")
#: console lines shown (in the test's captured teardown output) when a guest test fails
CONSOLE_TAIL = 60


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("emu", "emu virtio devices and guests")
    group.addoption(
        "--emu-guests",
        choices=GUEST_MODES,
        default="auto",
        help="guest tests (the emu_guest marker and fixture): auto runs them where the "
        "machine can and skips them elsewhere, skip skips them all, require fails them "
        "where they cannot run. Default: auto.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "emu_guest(kind='uml', blk='emu', extra=(), disk_mib=16, mem_mib=256, policy='drain'):"
        " the test needs a real guest (emu's emu_guest fixture boots this one); skipped with"
        " the reason where the machine cannot run it.",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Which emu the run uses: a test suite can tell an installed emu from a source tree.
    The ring core is looked for, not imported: the header shows in every run, and a suite
    that uses no fixture must not pay for numpy and the rings (docs/pytest.md)."""
    try:
        import emu
    except ImportError as e:  # a broken install is the suite's problem, not the header's
        return f"emu: cannot import ({e})"
    built = importlib.util.find_spec("emu._ring") is not None
    core = "cython (emu._ring)" if built else "python only (emu._ring not built)"
    return f"emu: {Path(emu.__file__).resolve().parent}, ring core {core}"


def _guest_param(request: pytest.FixtureRequest) -> GuestParam:
    from emu.testing.guest_session import GuestParam

    if hasattr(request, "param"):
        return GuestParam.parse(request.param)
    return GuestParam.parse(_marker_spec(request.node.get_closest_marker("emu_guest")))


def _marker_spec(marker: pytest.Mark | None) -> Any:
    """``emu_guest("microvm-qsd")``, ``emu_guest(kind="microvm", blk="qsd")`` or both:
    ``emu_guest("microvm", blk="qsd")`` (the keywords change the spec's fields)."""
    if marker is None:
        return None
    if len(marker.args) > 1:
        raise ValueError(
            f"emu_guest marker: one spec such as 'microvm-qsd' at most, got {marker.args!r}"
        )
    if not marker.args:
        return dict(marker.kwargs) or None
    if not marker.kwargs:
        return marker.args[0]
    from dataclasses import asdict

    from emu.testing.guest_session import GuestParam

    return {**asdict(GuestParam.parse(marker.args[0])), **marker.kwargs}


def _cannot_run(config: pytest.Config, why: str) -> None:
    """Skip, or fail under --emu-guests=require."""
    if config.getoption("emu_guests") == "require":
        pytest.fail(f"--emu-guests=require, but {why}", pytrace=False)
    pytest.skip(why)


def _check_guest(config: pytest.Config, param: GuestParam) -> None:
    from emu.testing.guest_session import unavailable

    if config.getoption("emu_guests") == "skip":
        pytest.skip("guest tests are off (--emu-guests=skip)")
    if (why := unavailable(param)) is not None:
        _cannot_run(config, why)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked emu_guest is skipped before any fixture runs where its guest cannot."""
    marker = item.get_closest_marker("emu_guest")
    if marker is None:
        return
    from emu.testing.guest_session import GuestParam

    callspec = getattr(item, "callspec", None)
    if callspec is not None and "emu_guest" in callspec.params:
        spec: Any = callspec.params["emu_guest"]
    else:
        spec = _marker_spec(marker)
    _check_guest(item.config, GuestParam.parse(spec))


@pytest.fixture
def emu_device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmuDevice]:
    """An emu device in-process, set up by the reference driver (see
    emu.testing.device_param.EmuDevice); parametrize indirectly with DeviceParam specs
    ("rng", "blk-packed", "net-split-python", ...). Default: rng, split, cython."""
    from emu.testing.device_param import DeviceParam, open_device

    param = DeviceParam.parse(getattr(request, "param", None))
    if (why := param.available) is not None:
        pytest.skip(f"{param.id}: {why}")
    workdir = tmp_path / "emu-device"
    workdir.mkdir()
    with open_device(param, workdir) as dev:
        yield dev


@pytest.fixture
def emu_guest(request: pytest.FixtureRequest) -> Iterator[EmuGuest]:
    """A booted guest (emu.testing.guest_session.EmuGuest), ended at teardown; its console
    tail goes to the teardown output, which pytest shows when the test fails."""
    from emu.guest.packages import PackageError
    from emu.testing.guest_session import EmuGuest

    param = _guest_param(request)
    _check_guest(request.config, param)
    # unix socket paths are short (108 bytes): a directory of its own, not tmp_path
    workdir = Path(tempfile.mkdtemp(prefix=f"emu-{param.id}-"))
    guest = None
    try:
        try:
            guest = EmuGuest(param, workdir)
        except PackageError as e:
            _cannot_run(request.config, f"the {param.kind} guest image cannot be built: {e}")
        yield guest
    finally:
        if guest is not None:
            guest.close()
            lines = guest.transcript[-CONSOLE_TAIL:]
            print(f"--- emu {param.id} guest console (last {len(lines)} lines) ---")
            print("\n".join(lines))
        shutil.rmtree(workdir, ignore_errors=True)


def device_params(*args: Any, **kwargs: Any) -> list[Any]:
    """emu.testing.device_param.device_params, as pytest params with readable ids and a
    skip mark on those this machine cannot run (the Cython core not built)."""
    from emu.testing.device_param import device_params as combos

    out = []
    for p in combos(*args, **kwargs):
        why = p.available
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(p, id=p.id, marks=marks))
    return out
