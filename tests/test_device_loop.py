"""The device thread's wait in C (emu.devices._loop, VirtioDevice.serve_parked) for devices
other than blk (tests/test_blk_loop.py has blk's): a running device serves kicks without
its Python loop, and a queue whose completions only the Python loop publishes (the delay
model's, due by time) keeps the device in the Python loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from modes import wait_until

from emu.devices.fs import FsDevice
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.fs import FuseClient
from emu.testing.rng import RngDriver
from emu.transport.mmio import MmioTransport

_loop = pytest.importorskip("emu.devices._loop", reason="emu.devices._loop is not built")


class Counted:
    """A device behind the in-process transport, counting its thread's trips through the
    Python loop's wait (``serve_parked``) and into the C wait (``_loop.serve_parked``)."""

    def __init__(self, dev, monkeypatch) -> None:
        self.mem = GuestMemory.create(8 << 20)
        self.dev = dev
        self.drv = VirtioMmioDriver(MmioTransport(dev, self.mem), self.mem)
        self.entries = self.in_c = 0
        parked, c_wait = dev.serve_parked, _loop.serve_parked

        def counted(ep) -> bool:
            self.entries += 1
            return parked(ep)

        def counted_c(*args) -> None:
            self.in_c += 1
            return c_wait(*args)

        dev.serve_parked = counted
        monkeypatch.setattr(_loop, "serve_parked", counted_c)

    def close(self) -> None:
        self.drv.reset()
        self.dev.close()
        self.mem.close()


def test_fs_requests_one_at_a_time_are_served_in_the_c_wait(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    c = Counted(FsDevice(str(tmp_path)), monkeypatch)
    try:
        fuse = FuseClient.connect(c.drv)
        node = fuse.lookup(1, "f").node
        wait_until(lambda: c.in_c >= 1)
        before = c.entries
        for _ in range(200):
            assert fuse.getattr(node).size == 5
        assert c.entries - before <= 5
    finally:
        c.close()


def test_rng_is_served_in_the_c_wait(monkeypatch) -> None:
    c = Counted(RngDevice(), monkeypatch)
    try:
        rng = RngDriver.open(c.drv)
        wait_until(lambda: c.in_c >= 1)
        before = c.entries
        for _ in range(100):
            assert len(rng.read(16)) == 16
        assert c.entries - before <= 5
    finally:
        c.close()


def test_a_delay_model_queue_keeps_the_python_loop(monkeypatch) -> None:
    """Completions due by time have no fd the C wait could watch: the device never waits
    there, and its requests are still answered (by the Python loop's timeout)."""
    c = Counted(RngDevice(), monkeypatch)
    try:
        rng = RngDriver.open(c.drv)
        wait_until(lambda: c.in_c >= 1)
        in_c = c.in_c  # before the delay model: the rng waited in C
        hold_completions(c.dev.queues[0], 0.002)
        for _ in range(20):
            assert len(rng.read(8)) == 8
        assert c.entries >= 20 and c.in_c == in_c  # the wait under way then handed back
    finally:
        c.close()
