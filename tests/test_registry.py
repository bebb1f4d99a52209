"""The device registry: a device type declared in one place is served, saved, restored,
shown and demonstrated by emu's own commands, and attached to guests.

The toy device lives in this file only: registering it is all it takes.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from modes import wait_until

from emu.cli import main
from emu.commands.serve import make_devices, serve
from emu.devices import registry
from emu.devices._chain import ChainReader, ChainWriter, chains
from emu.devices.base import VirtioDevice
from emu.guest.backends import guest_devices
from emu.guest.devices import virtio_ids
from emu.queue import Virtqueue
from emu.state import file as statefile
from emu.state.format import StateError
from emu.state.schema import Int, List, Schema
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import attached
from emu.testing.vhost_user import VhostUserDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user.frontend import connect

TOY_ID = 0x7D  # not a virtio device type; nothing else needs to know it
SET = struct.Struct("<BI")  # request: register index, value
SUM = struct.Struct("<Q")  # answer: the sum of all registers


class ToyDevice(VirtioDevice):
    """A register file: each request sets one register and reads back the sum of all.

    Setting a register again to the same value changes nothing, so a request that ran
    before a stop and runs again after the restore answers the same.
    """

    device_id = TOY_ID
    name = "toy"
    state_schema = Schema("toy state", 1, 0, {"regs": List(Int(0, 2**32 - 1), 256)})

    def __init__(self, nregs: int = 4, queue_max_size: int | None = None) -> None:
        super().__init__(1, 0, queue_max_size)
        self.regs = [0] * nregs

    def handle_queue(self, q: Virtqueue) -> None:
        while True:
            q.set_kicks(False)
            while len(batch := q.pop(64)):
                lengths = []
                for c in chains(batch):
                    index, value = ChainReader(self.mem, c).unpack(SET)
                    if index < len(self.regs):
                        self.regs[index] = value
                    w = ChainWriter(self.mem, c)
                    w.pack(SUM, sum(self.regs))
                    lengths.append(w.written)
                q.push(batch.heads, lengths)
            if not q.set_kicks(True):
                return

    def save_state(self) -> dict:
        return {"regs": list(self.regs)}

    def load_state(self, state: dict) -> None:
        regs = self.state_schema.check(state)["regs"]
        if len(regs) != len(self.regs):
            raise StateError(f"toy: {len(regs)} registers saved, this one has {len(self.regs)}")
        self.regs = regs


def toy_from_spec(spec: registry.Spec, build: registry.Build) -> ToyDevice:
    if spec.arg and not spec.arg.isdigit():
        raise registry.SpecError("the number of registers")
    return ToyDevice(int(spec.arg or 4), queue_max_size=build.queue_max)


# -- the toy's driver helper (what emu/testing/<device>.py is for a real device) --


class ToyDriver:
    def __init__(self, drv) -> None:
        self.drv = drv

    @classmethod
    def open(cls, drv, **ring_options) -> ToyDriver:
        drv.init(**ring_options)
        drv.setup_queue(0, 16)
        drv.driver_ok()
        return cls(drv)

    def submit(self, index: int, value: int) -> int:
        return self.drv.submit(0, [SET.pack(index, value)], [SUM.size])

    def set(self, index: int, value: int) -> int:
        self.submit(index, value)
        (c,) = self.drv.wait(0)
        return SUM.unpack(c.data)[0]


def demo(opts: dict, say: Callable[[str], None]) -> None:
    with attached(ToyDevice()) as drv:
        toy = ToyDriver.open(drv, **opts)
        toy.set(0, 40)
        say(f"toy: registers add up to {toy.set(1, 2)}")


@pytest.fixture
def toy() -> Iterator[registry.DeviceType]:
    t = registry.register(
        registry.DeviceType(ToyDevice, "toy[:REGISTERS]", toy_from_spec, sys.modules[__name__])
    )
    yield t
    registry.unregister("toy")


@pytest.fixture
def mem():
    from emu.memory import GuestMemory

    m = GuestMemory.create(4 << 20)
    yield m
    m.close()


class Served:
    """``emu serve``'s own code (the spec through the registry, then the vhost-user
    server) on a thread of this process."""

    def __init__(self, specs: list[str], sockets: list[Path], **options) -> None:
        self.devices = make_devices(specs)
        self.done = threading.Event()
        args = (self.devices, [str(s) for s in sockets], self.done)
        self.thread = threading.Thread(target=serve, args=args, kwargs=options, daemon=True)
        self.thread.start()
        for s in sockets:
            wait_until(s.exists)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


def test_toy_device_served_saved_and_restored_in_process(toy, tmp_path: Path) -> None:
    sock = tmp_path / "toy.sock"
    first = Served(["toy:3"], [sock], policy="report")
    (dev,) = first.devices
    assert isinstance(dev, ToyDevice) and len(dev.regs) == 3
    fe = VhostUserDriver(sock)
    try:
        drv = ToyDriver.open(fe, packed=False)
        assert drv.set(0, 5) == 5
        assert drv.set(2, 7) == 12
        hold_completions(dev.queues[0], 3600.0)  # the next requests run, and stay in flight
        tokens = [drv.submit(1, 30), drv.submit(0, 6)]
        wait_until(lambda: dev.queues[0].held() == 2)
        base = fe.stop_ring(0)
        state = fe.save_state()
        first.close()
        second = Served(["toy:3"], [sock])
        try:
            fe.sock.close()
            fe.sock = connect(sock)
            fe.init(packed=False)
            fe.load_state(state)
            fe.restart_ring(0, base)
            done = fe.wait(0, 2)
            assert sorted(c.token for c in done) == sorted(tokens)
            assert SUM.unpack(done[-1].data)[0] == 43  # 6 + 30 + 7, each request once
            assert drv.set(2, 0) == 36
            assert second.devices[0].save_state() == {"regs": [6, 30, 0]}
        finally:
            second.close()
    finally:
        fe.close()


def test_toy_device_mmio_snapshot_shown_and_restored(toy, tmp_path: Path, mem) -> None:
    (dev,) = registry.make_devices(["toy:2"])
    tr = MmioTransport(dev, mem)
    drv = ToyDriver.open(VirtioMmioDriver(tr, mem))
    assert drv.set(1, 99) == 99
    tr.vmm_stop("report")
    path = tmp_path / "toy.state"
    statefile.save(path, tr.save())
    shown = CliRunner().invoke(main, ["state", "show", "--json", str(path)])
    assert shown.exit_code == 0, shown.output
    assert '"name": "DEVICE_125"' in shown.output and '"version": "1.0"' in shown.output
    saved = drv.drv.save()
    dev.close()
    (fresh,) = registry.make_devices(["toy:2"])
    tr2 = MmioTransport(fresh, mem)
    drv = ToyDriver(VirtioMmioDriver.load(tr2, mem, saved))
    tr2.restore(statefile.load(path))
    assert drv.set(0, 1) == 100
    fresh.close()
    (other,) = registry.make_devices(["toy:5"])
    with pytest.raises(StateError, match="toy: 2 registers saved, this one has 5"):
        MmioTransport(other, mem).restore(statefile.load(path))
    other.close()


def test_toy_device_in_emu_demo_and_guest_specs(toy) -> None:
    res = CliRunner().invoke(main, ["demo", "--in-process", "toy"])
    assert res.exit_code == 0, res.output
    assert "toy: registers add up to 42" in res.output
    assert virtio_ids()["toy"] == TOY_ID
    (attach,) = guest_devices("uml", ["toy:2"], [Path("/run/toy.sock")])
    assert (attach.type, attach.vhost_user) == ("toy", True)
    bad = CliRunner().invoke(main, ["serve", "--socket", "/nonexistent/s", "toy:x"])
    assert bad.exit_code == 2 and "the number of registers" in bad.output


def test_toy_is_gone_after_unregister() -> None:
    with pytest.raises(registry.SpecError, match="no device type 'toy'"):
        registry.get("toy")
    assert "toy" not in virtio_ids()


def test_builtin_types_declare_everything_in_their_module() -> None:
    types = {t.name: t for t in registry.types()}
    assert {n: t.device_id for n, t in types.items()} == {
        "net": 1,
        "blk": 2,
        "console": 3,
        "rng": 4,
        "balloon": 5,
        "fs": 26,
        "vsock": 19,
    }
    for t in types.values():
        assert t.cls.__module__ == f"emu.devices.{t.name}"
        assert t.schema is t.cls.state_schema and t.schema.version == (1, 0)
        assert t.state_part == 0xE100 + t.device_id
        assert registry.schemas()[t.state_part] is t.schema
        assert t.usage.startswith(t.name)
        assert callable(t.driver_module().demo)
        assert t.driver == f"emu.testing.{t.name}"


def test_a_clashing_type_is_refused(toy) -> None:
    class Other(ToyDevice):
        name = "other"

    with pytest.raises(ValueError, match="clashes with toy"):
        registry.register(registry.DeviceType(Other, "other", toy_from_spec, "x"))


def test_production_code_never_imports_the_driver_helpers() -> None:
    """The registry names them as dotted paths: serving, saving and restoring every
    device type leaves emu.testing unimported (checked in a fresh interpreter)."""
    import subprocess

    code = (
        "import sys\n"
        "from emu.devices import registry\n"
        "from emu.commands import serve, state\n"
        "from emu.guest import backends\n"
        "registry.types(); registry.schemas()\n"
        "bad = sorted(m for m in sys.modules if m.startswith('emu.testing'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "spec",
    ["vsock:CID=\u00b2,uds={d}/v.sock", "fs:{d},queues=\u00b2", "blk:{d}/disk.img:queues=\u00b2"],
)
def test_a_number_in_unicode_digits_is_a_spec_error_not_a_traceback(spec, tmp_path):
    """str.isdigit is true for '²', which int() refuses: each spec number is ASCII only."""
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    with pytest.raises(registry.SpecError, match="\u00b2"):
        registry.make_devices([spec.format(d=tmp_path)])


@pytest.mark.parametrize(
    "spec",
    [
        "blk:{d}/disk.img:queues=1{big}",
        "blk:{d}/disk.img,hold=1{big}",
        "fs:{d},queues=1{big}",
        "balloon,target=1{big}",
    ],
)
def test_a_number_of_thousands_of_digits_is_a_spec_error_not_a_traceback(spec, tmp_path):
    """int() raises ValueError for more than 4300 digits: a spec number is checked first."""
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    with pytest.raises(registry.SpecError):
        registry.make_devices([spec.format(d=tmp_path, big="0" * 5000)])
