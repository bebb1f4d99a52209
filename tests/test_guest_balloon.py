"""A real guest's virtio_balloon on emu's balloon device gives memory back to the host.

UML only: QEMU 7.2 has no vhost-user balloon device. The guest (256 MiB) runs /init's
`balloon` workload (emu/guest/init_balloon.py) against emu's balloon served in this
process over vhost-user, with its control socket (`balloon,control=PATH`); the host
acts through that socket as `emu balloon --control PATH` does. Host memory is measured
where it lives: UML keeps guest RAM in an unlinked /dev/shm file whose fd its backends
get in SET_MEM_TABLE (emu.guest.uml.ram_file); its allocated blocks are what the guest
costs the host, and what emu's punches release.

* Inflate: the guest fills nearly all its free memory (tmpfs) and frees it, so its free
  pages are backed on the host (without free page reporting, which the device withholds
  here with `reporting=off`, freeing alone releases nothing: checked). The host sets a
  128 MiB target; once the guest's driver has inflated it, the RAM file holds at least
  95% of 128 MiB less.
  Target 0 deflates; data the guest then writes and reads back is intact (released pages
  come back on touch). The guest's stats arrive through the control socket.
* Free page reporting: the guest writes 128 MiB to tmpfs and deletes it; the driver
  reports the free pages and the RAM file shrinks by at least 90% of that, with no target
  set.
* `emu guest run --emu balloon,...` wires it under UML and refuses it under microvm.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emu.commands.balloon import ask
from emu.devices.balloon import BalloonDevice
from emu.devices.registry import make_devices
from emu.guest import GuestImage, build_image, uml
from emu.guest.devices import Device
from emu.guest.packages import PackageError
from emu.vhost_user.backend import VhostUserServer

MIB = 1 << 20
MEM_MIB = 256
TARGET_MIB = 128
FILL_MIB = 128
TIMEOUT = 90.0


@pytest.fixture(scope="module")
def uml_image() -> GuestImage:
    try:
        return build_image("uml")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


@contextmanager
def served_balloon(tmp: Path, reporting: bool) -> Iterator[tuple[BalloonDevice, Path, Path]]:
    """emu's balloon (with its control socket) served in this process: (device,
    vhost-user socket, control socket)."""
    ctl, sock = tmp / "balloon.ctl", tmp / "balloon.sock"
    (dev,) = make_devices([f"balloon,control={ctl}" + ("" if reporting else ",reporting=off")])
    assert isinstance(dev, BalloonDevice)
    server = VhostUserServer(dev, sock).start()
    try:
        yield dev, sock, ctl
    finally:
        server.close()
        dev.close()


def control(ctl: Path, line: str) -> dict:
    reply = ask(str(ctl), line)
    assert reply["ok"], reply
    return reply


def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


def test_inflate_releases_host_memory(
    uml_image: GuestImage, tmp_path: Path, background_guest
) -> None:
    passes = "fill,free,mem,inflated,deflated,check"
    with served_balloon(tmp_path, reporting=False) as (dev, sock, ctl):
        guest = background_guest(
            "uml",
            [Device("balloon", str(sock))],
            ["balloon"],
            params={"balloon.do": passes, "balloon.fill_mib": "avail", "balloon.mib": TARGET_MIB},
            image=uml_image,
            mem_mib=MEM_MIB,
            timeout=TIMEOUT,
        )
        filled = int(guest.wait_for("EMU-BALLOON filled").split()[2])
        guest.wait_for("EMU-BALLOON freed")
        ram = uml.ram_file(sock)
        before = uml.allocated(ram)
        info = control(ctl, "info")
        assert "page_reporting" not in info["features"]
        # freed without reporting: the host still holds every page the guest filled
        assert before >= filled * MIB, (before, filled)

        control(ctl, f"target {TARGET_MIB}")
        guest.wait_for("EMU-BALLOON inflated")
        assert dev.wait_actual(TARGET_MIB * 256, 30), dev.info()
        after = uml.allocated(ram)
        released = before - after
        ratio = released / (TARGET_MIB * MIB)
        assert ratio >= 0.95, f"released {released / MIB:.1f} MiB of {TARGET_MIB}"
        info = control(ctl, "info")
        assert info["inflated_pages"] == TARGET_MIB * 256, info
        assert info["ignored_pfns"] == 0 and info["release_errors"] == 0, info

        stats = control(ctl, "stats")
        assert stats["fresh"], stats
        mem = guest.matching("EMU-RESULT balloon.MemTotal")
        total_kib = int(mem[0].split()[2])
        assert stats["stats"]["total-memory"] == total_kib * 1024, (stats, total_kib)

        control(ctl, "target 0")
        guest.wait_for("EMU-BALLOON deflated")
        res = guest.result(TIMEOUT)
    assert res.ok, res.console[-3000:]
    # the guest had 128 MiB less free memory while inflated
    free = int(res.results["balloon.freed_memfree"]) - int(res.results["balloon.inflated_memfree"])
    assert free >= TARGET_MIB * 1024 * 0.9, res.console[-3000:]
    assert res.results["balloon.check.rc"] == "0"


def test_free_page_reporting_releases_freed_memory(
    uml_image: GuestImage, tmp_path: Path, background_guest
) -> None:
    with served_balloon(tmp_path, reporting=True) as (dev, sock, ctl):
        guest = background_guest(
            "uml",
            [Device("balloon", str(sock))],
            ["balloon"],
            params={
                "balloon.do": "fill,free,inflated",
                "balloon.fill_mib": FILL_MIB,
                "balloon.mib": 1,
            },
            image=uml_image,
            mem_mib=MEM_MIB,
            timeout=TIMEOUT,
        )
        guest.wait_for("EMU-BALLOON filled")
        ram = uml.ram_file(sock)
        full = uml.allocated(ram)
        assert "page_reporting" in control(ctl, "info")["features"]
        guest.wait_for("EMU-BALLOON freed")
        goal = full - FILL_MIB * MIB * 0.9
        wait_until(lambda: uml.allocated(ram) <= goal, "freed memory released", 30)
        released = full - uml.allocated(ram)
        info = control(ctl, "info")
        assert info["reported_bytes"] >= FILL_MIB * MIB * 0.9, info
        assert info["inflated_pages"] == 0, info
        control(ctl, "target 1")  # the guest's cue to finish: a 1 MiB balloon
        res = guest.result(TIMEOUT)
    assert res.ok, res.console[-3000:]
    assert released >= FILL_MIB * MIB * 0.9


def test_emu_guest_run_serves_the_balloon(uml_image: GuestImage, tmp_path: Path) -> None:
    """`emu guest run --emu balloon,...` under UML (here with a target from the start, so
    the guest inflates as its driver binds); microvm is refused before it boots."""
    base = [sys.executable, "-m", "emu.cli", "guest", "run"]
    image = ["--kernel", str(uml_image.kernel), "--initrd", str(uml_image.initrd)]
    ctl = tmp_path / "b.ctl"
    cmd = [*base, "--kind", "uml", *image, "--emu", f"balloon,control={ctl},target=16"]
    cmd += ["--run", "devices,balloon", "--param", "balloon.do=inflated", "--param"]
    cmd += ["balloon.mib=16", "--timeout", str(TIMEOUT)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT + 30)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "driver=virtio_balloon" in log
    assert "EMU-RESULT balloon.inflated_pages 4096" in log
    refused = subprocess.run(
        [*base, "--kind", "microvm", "--emu", "balloon", "--run", "none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "no vhost-user balloon" in refused.stderr
