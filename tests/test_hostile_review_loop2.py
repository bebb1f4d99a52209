"""Hostile review of the device thread's wait in C for every device
(``emu.devices._loop.serve_parked``, entered from ``VirtioDevice._run``).

The first tests are defects found in review (each failed before its fix): a frontend
that gives one kick eventfd to two rings and clears O_NONBLOCK froze the whole process
(the C wait read the kick holding the GIL) and hung the device thread (both loops read
a kick whose count the other ring's read had taken). The rest are attacks that found
nothing, kept because they can fail: a report stop racing kicks on more queues than one
epoll batch holds, and backend input (served only by the Python loop's wake-up) while a
guest keeps the thread busy in the wait in C.
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
from emu.testing.driver import VirtioMmioDriver
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


# -- attacks that found nothing --


class OneAtATime(EchoDevice):
    """Serves one chain per kick (each kick, one pass in the wait in C)."""

    def handle_queue(self, q):
        batch = q.pop(1)
        if len(batch):
            q.push(batch.heads, [0])


@pytest.fixture
def counted(monkeypatch):
    """Counts the device threads' entries into the wait in C (proof it was used)."""
    calls = [0]
    real = _loop.serve_parked

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(_loop, "serve_parked", counting)
    return calls


def test_a_stop_racing_kicks_on_more_queues_than_one_epoll_batch(mem, counted) -> None:
    """20 queues (more than the 16 events the wait in C takes per epoll_wait), every
    kick fd kept readable by a hostile guest, each kick serving one chain there. A
    report stop must get through (the wake eventfd is not starved by the kicks), and
    once STOPPED is seen no used index moves while the kicks go on; after resume every
    chain is answered exactly once."""
    nq, per_q = 20, 24
    dev = OneAtATime(num_queues=nq, queue_max_size=32)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    drv.init()
    dqs = [drv.setup_queue(i, 32) for i in range(nq)]
    drv.driver_ok()
    tokens = [{dq.add([b"x"], [1]) for _ in range(per_q)} for dq in dqs]
    stop = threading.Event()

    def guest() -> None:
        while not stop.is_set():
            for q in dev.queues:
                q.kick()
            time.sleep(0.0005)

    kicker = threading.Thread(target=guest, daemon=True)
    kicker.start()
    try:
        wait_until(lambda: sum(mem.read_int(dq.device + 2, 2) for dq in dqs) >= nq * per_q // 4)
        dev.request_stop("report")
        wait_until(lambda: dev.run_state is RunState.STOPPED)
        used = [mem.read_int(dq.device + 2, 2) for dq in dqs]
        assert sum(used) < nq * per_q, "all served before the stop: nothing raced"
        time.sleep(0.2)  # kicks go on against a stopped device
        assert [mem.read_int(dq.device + 2, 2) for dq in dqs] == used
        dev.resume()
        wait_until(lambda: sum(mem.read_int(dq.device + 2, 2) for dq in dqs) == nq * per_q)
    finally:
        stop.set()
        kicker.join()
    for dq, want in zip(dqs, tokens, strict=True):
        got = [c.token for c in dq.poll()]
        assert sorted(got) == sorted(want)
    assert counted[0] > 0
    dev.close()


class BackendFed(EchoDevice):
    """Queue 1 is fed by a backend (as net rx or vsock host input): ``feed`` queues a
    byte string and wakes the device thread, ``on_wake`` marks queue 1 for a pass, and
    that pass writes what waited into the guest's buffers."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.inbox: list[bytes] = []
        self.lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self.lock:
            self.inbox.append(data)
        self.wake()

    def wants_poll(self, q) -> bool:
        return q.index == 1

    def handle_queue(self, q) -> None:
        if q.index != 1:
            return super().handle_queue(q)
        while True:
            with self.lock:
                if not self.inbox:
                    return
                data = self.inbox[0]
            batch = q.pop(1)
            if not len(batch):
                return
            addrs, lens, _ = batch.segments(0)
            self.mem.write(int(addrs[0]), data[: int(lens[0])])
            with self.lock:
                self.inbox.pop(0)
            q.push(batch.heads, [min(len(data), int(lens[0]))])


def test_backend_input_is_served_while_the_guest_keeps_the_thread_in_c(mem, counted) -> None:
    """A guest keeps queue 0 busy (every kick a pass in the wait in C) while a backend
    thread feeds queue 1, which only the Python loop's wake-up serves (``on_wake`` /
    ``wants_poll``): every fed message must reach the guest, in order, none twice."""
    dev = BackendFed(queue_max_size=256)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    drv.init()
    tx = drv.setup_queue(0, 256)
    rx = drv.setup_queue(1, 256)
    drv.driver_ok()
    n = 100
    for _ in range(n):
        rx.add([], [16])
    stop = threading.Event()

    def guest() -> None:
        while not stop.is_set():
            dev.queues[0].kick()
            time.sleep(0.0002)

    kicker = threading.Thread(target=guest, daemon=True)
    kicker.start()
    try:
        for i in range(n):
            dev.feed(b"msg%03d" % i)
            if i % 10 == 0:
                time.sleep(0.001)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            got += [c.data[: c.length] for c in rx.poll()]
            time.sleep(0.005)
    finally:
        stop.set()
        kicker.join()
    assert got == [b"msg%03d" % i for i in range(n)]
    assert counted[0] > 0
    del tx
    dev.close()
