"""Hostile review of the device thread's wait in C for every device
(``emu.devices._loop.serve_parked``, entered from ``VirtioDevice._run``).

The first tests are defects found in review (each failed before its fix); the rest are
attacks that found nothing, kept because they can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import EchoDevice
from modes import wait_until

from emu.devices.base import RunState
from emu.memory import GuestMemory
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport.mmio import MmioTransport

_loop = pytest.importorskip("emu.devices._loop")

ROOT = Path(__file__).resolve().parents[1]

# A vhost-user frontend gives both rings of an echo device one kick eventfd (two fds
# in the backend, one file), has a request served, then clears O_NONBLOCK on its own
# copy: the backend's fds share the file status flags, so its ``set_blocking(False)`` at
# SET_VRING_KICK is undone. One kick makes both fds readable in the same epoll batch;
# the first read takes the count, the second finds it 0.
SHARED_BLOCKING_KICK = """
import os, sys, tempfile, time
sys.path.insert(0, {tests!r})
from conftest import EchoDevice
from emu.devices.base import RunState
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.backend import VhostUserServer

dev = EchoDevice(queue_max_size=64)
srv = VhostUserServer(dev, os.path.join(tempfile.mkdtemp(), "echo.sock")).start()
fe = VhostUserDriver(srv.path)
efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
fe._kicks[0] = fe._kicks[1] = efd
fe.init()
fe.setup_queue(0, 64)
fe.setup_queue(1, 64)
fe.driver_ok()
fe.submit(0, [b"x"], [1])
assert fe.wait(0)[0].data == b"x"
print("served", flush=True)
os.set_blocking(efd, True)
fe.kick(0)
"""


def run_child(body: str, tmp_path: Path, timeout: float = 15.0) -> str:
    """Run the scenario above then ``body`` in a child process (what it tests can freeze
    the whole interpreter); its stdout, or what it printed before it was killed."""
    script = tmp_path / "child.py"
    script.write_text(
        SHARED_BLOCKING_KICK.format(tests=str(ROOT / "tests")) + textwrap.dedent(body)
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return out + "\n<killed: timed out>"
    return done.stdout + done.stderr


# -- defects --


def test_a_blocking_kick_fd_does_not_freeze_the_process(tmp_path: Path) -> None:
    """The wait in C cleared a kick with ``read(fd, 8)`` holding the GIL (and the
    device's token). A kick fd whose count another read took first (one eventfd given
    for two rings, or the frontend reading its own eventfd) blocks that read; with the
    frontend having cleared O_NONBLOCK it blocks for good, and with the GIL held no
    other thread of the process runs again: every device, every vhost-user session, the
    main thread. The Python loop's ``clear_kick`` (os.eventfd_read) releases the GIL."""
    out = run_child(
        """
        time.sleep(0.5)
        print("alive", flush=True)
        os._exit(0)
        """,
        tmp_path,
    )
    assert "served" in out, out
    assert "alive" in out, f"the process froze after the kick:\n{out}"


def test_a_shared_kick_eventfd_does_not_hang_the_device_thread(tmp_path: Path) -> None:
    """The same hostile frontend, seen from the device: after the kick that found the
    second fd's count taken, the device thread must still serve both rings, answer a
    stop and close. Before the fix it sat in the second read (in C, and in the Python
    loop's ``clear_kick`` as well) until the frontend kicked again, so a stop (QueueReady=0,
    GET_VRING_BASE, a VMM stop) waited for the frontend."""
    out = run_child(
        """
        time.sleep(0.3)  # the device thread takes the kick first
        deadline = time.monotonic() + 5
        dev.request_stop("report")
        while dev.run_state is not RunState.STOPPED and time.monotonic() < deadline:
            time.sleep(0.01)
        print("state", dev.run_state.name, flush=True)
        if dev.run_state is RunState.STOPPED:
            dev.resume()
            fe.submit(1, [b"y"], [1])
            print("q1", fe.wait(1, timeout=5)[0].data, flush=True)
        os._exit(0)
        """,
        tmp_path,
    )
    assert "served" in out, out
    assert "state STOPPED" in out, f"the device thread did not answer a stop:\n{out}"
    assert "q1 b'y'" in out, out
