"""VirtioDevice.describe and `emu serve`'s SIGUSR1 report: what someone looking at a guest
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
    (head, line) = dev.describe()
    assert head == "blk: running"
    assert "in_flight 0" in line and "kick_waiting no" in line
    served = field(line, "next_avail")
    if not packed:
        assert field(line, "avail idx") == served == field(line, "used idx")

    drv.queues[0].add([header(T_IN, 0)], [512, 1])  # made available, never kicked
    (_, line) = dev.describe()
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
    while "at_backend 1" not in (line := dev.describe()[1]):
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
        text = "\n".join(dev.describe(timeout=0.2))
        assert "has not come back for 0.2 s" in text
        assert re.search(r"queue 0: avail idx (\d+)", text)
        assert "stuck_in_a_backend" in text  # the device thread's stack
        assert len(dev._commands) == 1  # the description asked for waits its turn...
        dev.describe(timeout=0.05)
        assert len(dev._commands) == 1  # ...and asking again adds none
    finally:
        release.set()
    assert dev.describe()[0] == "blk: running"  # and it answers again once free


def test_ring_fields_outside_or_gone_from_guest_ram_are_said_so_not_raised():
    mem = GuestMemory.create(1 << 20)
    q = Virtqueue(0, 256)
    assert q.describe_driver(mem) == "no ring set up"
    q.driver, q.device, q.ready = 0, mem.size - 2, True  # gpa 0 is an address like any
    text = q.describe_driver(mem)
    assert re.match(r"avail idx \d+ flags \d+, used idx outside RAM flags \d+", text), text
    assert q.describe(mem) == "queue 0: not started, gate open"
    mem.regions[0].close()  # a new memory table unmapped it between lookup and read
    assert q.describe_driver(mem).startswith("avail idx unmapped flags unmapped")
    mem.regions.clear()


def test_a_closed_device_says_so(disk):
    dev = BlkDevice(str(disk))
    dev.close()
    assert dev.describe() == ["blk: idle, closed"]


class Serve:
    """`emu serve` as a process, its stderr ours to read."""

    def __init__(self, tmp: Path, *specs: str) -> None:
        self.socks = [tmp / f"{i}.sock" for i in range(len(specs))]
        cmd = [sys.executable, "-m", "emu.cli", "serve"]
        for sock, spec in zip(self.socks, specs, strict=True):
            cmd += ["--socket", str(sock), spec]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 20
        while not all(s.exists() for s in self.socks):
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)

    def report(self) -> list[str]:
        """SIGUSR1, and the report's lines up to the last queue's."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.stderr is not None
        lines: list[str] = []
        while not lines or "queue 0:" not in lines[-1] or len(lines) < 3 * len(self.socks):
            lines.append(self.proc.stderr.readline())
            assert lines[-1], "emu serve ended its stderr"
        return lines

    def end(self) -> int:
        """SIGTERM; the exit code (it must come within 10 s)."""
        self.proc.terminate()
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Serve] = []

    def start(*specs: str) -> Serve:
        made.append(Serve(tmp_path, *specs))
        return made[-1]

    yield start
    for s in made:
        s.close()


def test_emu_serve_prints_every_queue_on_sigusr1(serve, disk):
    s = serve(f"blk:{disk}")
    fe = VhostUserDriver(s.socks[0])
    try:
        b = BlkDriver.open(fe)
        b.read(0, 1)
        lines = s.report()
        text = "".join(lines)
        assert f"emu serve: {s.socks[0]}: frontend connected (connection 1)" in text
        assert "emu serve: blk: running" in text
        assert field(lines[-1], "next_avail") == field(lines[-1], "avail idx") >= 1
        assert s.proc.poll() is None  # the report does not end it
        b.read(0, 1)  # nor the device
    finally:
        fe.close()
    assert s.end() == 0


def test_every_device_type_reports_net_too(serve):
    """NetDevice has a ``status`` field of its own (the link status)."""
    s = serve("net:cable", "net:cable", "rng")
    text = "".join(s.report())
    assert text.count("no frontend (0 connections so far)") == 3
    assert "emu serve: net: idle" in text and "emu serve: rng: idle" in text
    assert s.end() == 0


def test_a_burst_of_signals_neither_kills_nor_wedges_it(serve, disk):
    s = serve(f"blk:{disk}")
    fe = VhostUserDriver(s.socks[0])
    try:
        b = BlkDriver.open(fe)
        for _ in range(2000):
            s.proc.send_signal(signal.SIGUSR1)
        b.read(0, 8)
        assert s.proc.poll() is None
    finally:
        fe.close()
    assert s.end() == 0


def test_a_stderr_nobody_reads_costs_the_report_only(serve, disk):
    s = serve(f"blk:{disk}")
    assert s.proc.stderr is not None
    s.proc.stderr.close()  # a log collector that went away: writes get EPIPE
    fe = VhostUserDriver(s.socks[0])
    try:
        b = BlkDriver.open(fe)
        s.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        b.read(0, 1)
        assert s.proc.poll() is None
    finally:
        fe.close()
    assert s.end() == 0


def test_a_guest_that_overruns_has_emu_serve_report_before_it_is_killed(
    tmp_path, monkeypatch, capfd
):
    """run_guest's timeout asks every emu serve started with a report signal (the
    backends of `emu guest run --emu`, the benches' backends) for its report."""
    from emu.guest import proc, run
    from emu.guest.backends import emu_backends

    monkeypatch.setitem(run._COMMAND, "uml", lambda *_: ["sleep", "60"])  # never powers off
    monkeypatch.setattr(run, "build_image", lambda *_, **__: None)
    with emu_backends("uml", ["rng"], tmp_path) as devices:
        res = run.run_guest("uml", devices, [], timeout=1.0)
        assert res.timed_out
        err = capfd.readouterr().err
        assert "emu serve: rng: idle" in err
        assert re.search(r"emu serve: \S+rng\.sock: no frontend", err)
    assert proc.ask_reports() == 0  # stopped children are not asked
