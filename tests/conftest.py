"""Shared fixtures: guest RAM and a tiny echo device that depends on no real backend."""

from __future__ import annotations

import pytest

from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.queue import Virtqueue

ECHO_DEVICE_ID = 0x7E  # not a real virtio type; the transport does not care


class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable buffers.

    Config space: le32 magic (read-only) at 0, le32 scratch at 4 (writing it counts as a
    device-side config change, so tests can see ConfigGeneration move).
    """

    device_id = ECHO_DEVICE_ID
    name = "echo"
    MAGIC = 0xEC400EC4

    def __init__(self, num_queues: int = 2, device_features: int = 0, **kw: int) -> None:
        super().__init__(num_queues, device_features, **kw)
        self.scratch = 0

    def config_bytes(self) -> bytes:
        return self.MAGIC.to_bytes(4, "little") + self.scratch.to_bytes(4, "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and size == 4:
            self.scratch = value
            self.on_config_change()

    def handle_queue(self, q: Virtqueue) -> None:
        mem = self.mem
        while True:
            batch = q.pop(64)
            if not len(batch):
                if q.set_kicks(True):
                    continue
                return
            lengths = []
            for i in range(len(batch)):
                addrs, lens, writable = batch.segments(i)
                segs = list(zip(addrs.tolist(), lens.tolist(), writable.tolist(), strict=True))
                data = b"".join(mem.read(a, n) for a, n, w in segs if not w)
                done = 0
                for a, n, w in segs:
                    if w and done < len(data):
                        chunk = data[done : done + n]
                        mem.write(a, chunk)
                        done += len(chunk)
                lengths.append(done)
            q.push(batch.heads, lengths)


@pytest.fixture
def mem():
    m = GuestMemory.create(16 << 20)
    yield m
    m.close()


@pytest.fixture
def echo():
    dev = EchoDevice(queue_max_size=256)
    yield dev
    dev.close()


@pytest.fixture(scope="session")
def microvm_image():
    """The QEMU microvm guest image, built once (skips where QEMU or the packages are not)."""
    import shutil

    from emu.guest.images import build_image
    from emu.guest.packages import PackageError

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    try:
        return build_image("microvm")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


@pytest.fixture
def nbd_server(tmp_path):
    """Starts nbdkit servers (emu.testing.nbdkit.Nbdkit arguments) on sockets in tmp_path
    and stops them all at teardown; skips where nbdkit is not installed."""
    from emu.testing.nbdkit import Nbdkit, nbdkit_missing

    if (why := nbdkit_missing()) is not None:
        pytest.skip(why)
    started = []

    def start(plugin=None, **kw):
        srv = Nbdkit(tmp_path / f"nbd{len(started)}.sock", plugin or ["memory", "64M"], **kw)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def engines():
    """Makes NbdEngines (NbdEngine arguments) and closes them all at teardown."""
    from emu.backends._nbd import NbdEngine

    made = []

    def make(uri, **kw):
        e = NbdEngine(uri, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.fixture
def background_guest():
    """Boots guests in the background (emu.guest.background.BackgroundGuest arguments)
    and ends any still running at teardown, so a failed test leaves no guest behind."""
    from emu.guest.background import BackgroundGuest

    started = []

    def start(*args, **kw):
        guest = BackgroundGuest(*args, **kw)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.stop()
