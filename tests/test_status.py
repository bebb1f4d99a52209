"""VirtioDevice.status and `emu serve`'s SIGUSR1 report: what someone looking at a guest
that waits for its disk reads to find out what it waits for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from emu.devices.blk import T_IN, BlkDevice
from emu.memory import GuestMemory
from emu.queue import Virtqueue
from emu.testing.blk import BlkDriver, header
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport.mmio import MmioTransport

RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def blk(mem: GuestMemory, disk: Path):  # type: ignore[no-untyped-def]
    made = []

    def _open(packed: bool) -> tuple[BlkDevice, VirtioMmioDriver, BlkDriver]:
        dev = BlkDevice(str(disk))
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        made.append((dev, drv))
        return dev, drv, BlkDriver.open(drv, packed=packed)

    yield _open
    for dev, drv in made:
        drv.reset()
        dev.close()


def field(line: str, name: str) -> int:
    m = re.search(rf"\b{name} (\d+)", line)
    assert m, f"no {name} in {line!r}"
    return int(m.group(1))


@pytest.mark.parametrize("packed", RINGS)
def test_a_request_made_available_without_a_kick_shows_as_the_driver_ahead(blk, packed):
    dev, drv, b = blk(packed)
    b.read(0, 1)
    (head, line) = dev.status()
    assert head == "blk: running"
    assert "in_flight 0" in line and "kick_waiting no" in line
    served = field(line, "next_avail")
    if not packed:
        assert field(line, "avail idx") == served == field(line, "used idx")

    drv.queues[0].add([header(T_IN, 0)], [512, 1])  # made available, never kicked
    (_, line) = dev.status()
    assert field(line, "next_avail") == served  # the device has not seen it
    if packed:
        assert "driver_event off_wrap" in line and "device_event off_wrap" in line
    else:
        assert field(line, "avail idx") == served + 1
        assert field(line, "used idx") == served


@pytest.mark.parametrize("packed", RINGS)
def test_a_request_the_backend_holds_shows_in_flight_and_at_the_backend(blk, packed):
    dev, drv, b = blk(packed)
    b.read(0, 1)
    hold_completions(dev.queues[0], 3600.0)
    b.submit(T_IN, 0, in_size=512)
    deadline = time.monotonic() + 5
    while "at_backend 1" not in (line := dev.status()[1]):
        assert time.monotonic() < deadline, line
        time.sleep(0.01)
    assert "in_flight 1" in line
    assert field(line, "next_avail") == field(line, "next_used") + 1


def test_a_device_thread_that_does_not_come_back_is_named_with_its_stack(blk):
    dev, drv, b = blk(False)
    b.read(0, 1)
    release = threading.Event()

    def stuck_in_a_backend() -> None:
        release.wait(30)

    dev._post(stuck_in_a_backend, wait=False)
    try:
        deadline = time.monotonic() + 5
        while not dev._commands and dev._owner.acquire(blocking=False):
            dev._owner.release()  # not picked up yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drv.queues[0].add([header(T_IN, 0)], [512, 1])
        lines = dev.status(timeout=0.2)
    finally:
        release.set()
    text = "\n".join(lines)
    assert "has not come back for 0.2 s" in text
    assert re.search(r"queue 0: avail idx (\d+)", text)
    assert "stuck_in_a_backend" in text  # the device thread's stack
    assert dev.status()[0] == "blk: running"  # and it answers again once free


def test_ring_fields_outside_guest_ram_are_said_so_not_raised(mem):
    q = Virtqueue(0, 256)
    q.driver, q.device = mem.size - 2, mem.size + 4096
    text = q.driver_status(mem)
    assert "outside RAM" in text
    assert q.status(mem) == "queue 0: not started, gate open"


def test_a_closed_device_says_so(disk):
    dev = BlkDevice(str(disk))
    dev.close()
    assert dev.status() == ["blk: idle, closed"]


def test_emu_serve_prints_every_queue_on_sigusr1(tmp_path, disk):
    sock = tmp_path / "blk.sock"
    cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), f"blk:{disk}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        fe = VhostUserDriver(sock)
        try:
            b = BlkDriver.open(fe)
            b.read(0, 1)
            proc.send_signal(signal.SIGUSR1)
            assert proc.stderr is not None
            lines = []
            while not lines or "queue 0:" not in lines[-1]:
                lines.append(proc.stderr.readline())
                assert lines[-1], "emu serve ended its stderr"
            text = "".join(lines)
            assert f"emu serve: {sock}: frontend connected (connection 1)" in text
            assert "emu serve: blk: running" in text
            assert field(lines[-1], "next_avail") == field(lines[-1], "avail idx") >= 1
            assert proc.poll() is None  # the report does not end it
            b.read(0, 1)  # nor the device
        finally:
            fe.close()
    finally:
        proc.terminate()
        proc.wait(10)
