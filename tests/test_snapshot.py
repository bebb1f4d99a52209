"""Stop a device mid-I/O, save it to a file, restore it into a fresh instance, carry on.

Every device, both ring formats, both quiesce policies, with 0, 1 and 32 requests in flight
at the stop. The guest is the reference driver; it keeps its own state across the restore
(``VirtioMmioDriver.save``/``load``) as a guest's RAM and driver would. Completions are
checked by token: each request completes exactly once. Under ``report`` the completions are
held back (a long ``latency``) so the requests are surely in flight at the stop; under
``drain`` a short one makes the stop wait for them.

Also: a restore in a fresh process over file-backed guest RAM, a Cython <-> Python ring core
round trip, and snapshots that must be refused without touching the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from modes import wait_until

from emu.backends.chardev import BufferChar
from emu.devices.base import VirtioDevice
from emu.devices.blk import SECTOR, T_OUT, BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import DeviceState, Part, StateError, decode, encode
from emu.testing.blk import BlkDriver, status_of
from emu.testing.console import GuestConsole
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.driver_queue import Completion
from emu.testing.net import GuestNet, ether
from emu.testing.rng import RngDriver
from emu.transport.mmio import MmioTransport

RAM = 16 << 20
IMAGE = 1 << 20
BLOCK = 4096
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000000ff")
#: report: completions never come before the stop (so the requests are in flight at it)
HOLD = 60.0
#: drain: completions come soon; the stop waits for them
SHORT = 0.01


@dataclass
class Side:
    """One guest's view of one device: RAM, device, transport, driver."""

    mem: GuestMemory
    dev: VirtioDevice
    tr: MmioTransport
    drv: VirtioMmioDriver

    @classmethod
    def create(cls, mem: GuestMemory, dev: VirtioDevice) -> Side:
        tr = MmioTransport(dev, mem)
        return cls(mem, dev, tr, VirtioMmioDriver(tr, mem))

    def stop_and_save(self, path: Path, policy: str) -> None:
        self.tr.vmm_stop(policy)
        statefile.save(path, self.tr.save())

    def restore(self, dev: VirtioDevice, path: Path) -> None:
        """The old device goes away; a fresh one takes over from the file, same RAM."""
        saved = self.drv.save()
        self.dev.close()
        tr = MmioTransport(dev, self.mem)
        self.drv = VirtioMmioDriver.load(tr, self.mem, saved)
        tr.restore(statefile.load(path))
        self.dev, self.tr = dev, tr


def tokens_once(done: list[Completion], expected: list[int]) -> None:
    got = [c.token for c in done]
    assert len(got) == len(set(got)), f"duplicate completions: {got}"
    assert sorted(got) == sorted(expected)


# -- one scenario per device: set up, put n requests in flight, check after restore --
# A scenario may go through several stop/restore cycles; ``side`` always holds the
# current device and driver.


class BlkScenario:
    counted_queue = 0

    def __init__(self, tmp: Path) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(IMAGE))
        self.model = bytearray(IMAGE)
        self.tokens: list[int] = []
        self.pending: list[tuple[int, bytes]] = []
        self.cycle = 0

    def device(self) -> BlkDevice:
        return BlkDevice(self.image)

    def open(self, side: Side, packed: bool) -> None:
        self.side = side
        self.blk = BlkDriver.open(side.drv, packed=packed)
        self.write_now(0, b"\x01")

    def write_now(self, block: int, fill: bytes) -> None:
        data = fill * BLOCK
        assert self.blk.write(block * BLOCK // SECTOR, data) == 0
        self.model[block * BLOCK : (block + 1) * BLOCK] = data

    def submit(self, n: int) -> None:
        for i in range(n):
            block, data = 1 + i, bytes([0x40 + 0x20 * self.cycle + i]) * BLOCK
            self.tokens.append(self.blk.submit(T_OUT, block * BLOCK // SECTOR, data))
            self.pending.append((block, data))
            self.model[block * BLOCK : (block + 1) * BLOCK] = data

    def fetched(self) -> bool:
        disk = self.image.read_bytes()
        return all(disk[b * BLOCK : (b + 1) * BLOCK] == d for b, d in self.pending)

    def check(self) -> None:
        drv = self.blk.drv = self.side.drv
        done = drv.wait(0, len(self.tokens))
        tokens_once(done, self.tokens)
        assert {status_of(c) for c in done} <= {0}
        for b in range(40, 48):  # carry on: new writes, then read the whole disk back
            self.write_now(b, bytes([b + self.cycle]))
        assert self.blk.flush() == 0
        assert self.blk.read(0, IMAGE // SECTOR) == bytes(self.model)
        assert drv.queues[0].poll() == []
        assert self.image.read_bytes() == bytes(self.model)
        self.tokens, self.pending, self.cycle = [], [], self.cycle + 1


class Sink:
    """Net backend for the test: frames the device sends, kept across the restore."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.device: NetDevice | None = None

    def attach(self, device: NetDevice) -> None:
        self.device = device

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        """The backend outlives the device it was attached to (as a TAP fd can)."""


def frame(payload: bytes, dst: bytes = PEER) -> bytes:
    return ether(dst, PEER if dst == MAC else MAC, payload.ljust(46, b"."))


class NetScenario:
    counted_queue = 1  # tx

    def __init__(self, tmp: Path) -> None:
        self.sink = Sink()
        self.sent: list[bytes] = []
        self.rx: list[bytes] = []
        self.tokens: list[int] = []

    def device(self) -> NetDevice:
        return NetDevice(self.sink, mac=MAC.hex(":"))

    def open(self, side: Side, packed: bool) -> None:
        self.side = side
        self.g = GuestNet(side.drv, packed=packed, queue_size=128, rx_buffers=48)
        self.roundtrip(b"warm-up")

    def roundtrip(self, payload: bytes) -> None:
        self.g.send(frame(payload))
        self.sent.append(frame(payload))
        self.side.dev.deliver(frame(payload, dst=MAC))
        assert self.g.recv()[1] == frame(payload, dst=MAC)

    def submit(self, n: int) -> None:
        stats = self.side.dev.stats
        self.base = stats.tx_frames, stats.rx_frames
        for i in range(n):
            out = frame(b"out %d" % i)
            self.tokens.append(self.g.drv.submit(1, [bytes(self.g.hdr_len), out], []))
            self.sent.append(out)
            self.rx.append(frame(b"in %d" % i, dst=MAC))
            self.side.dev.deliver(self.rx[-1])

    def fetched(self) -> bool:
        stats, n = self.side.dev.stats, len(self.tokens)
        return (stats.tx_frames, stats.rx_frames) == (self.base[0] + n, self.base[1] + n)

    def check(self) -> None:
        drv = self.g.drv = self.side.drv
        tokens_once(drv.wait(1, len(self.tokens)), self.tokens)
        assert [self.g.recv()[1] for _ in self.rx] == self.rx  # each once, in order
        self.roundtrip(b"after")
        assert self.sink.frames == self.sent  # each sent once
        assert drv.queues[0].poll() == [] and drv.queues[1].poll() == []
        self.tokens, self.rx = [], []


class ConsoleScenario:
    counted_queue = 1  # port 0 tx

    def __init__(self, tmp: Path) -> None:
        self.chardev = BufferChar()
        self.out = b""
        self.inp = b""
        self.tokens: list[int] = []

    def device(self) -> ConsoleDevice:
        return ConsoleDevice(self.chardev)

    def open(self, side: Side, packed: bool) -> None:
        self.side = side
        self.g = GuestConsole(side.drv, packed=packed, queue_size=128, rx_buffers=48)
        self.roundtrip(b"hello;")

    def roundtrip(self, data: bytes) -> None:
        self.g.write(0, data)
        self.out += data
        self.chardev.feed(data.upper())
        assert self.g.read(0, len(data)) == data.upper()

    def submit(self, n: int) -> None:
        for i in range(n):
            data = b"w%03d;" % i
            self.tokens.append(self.g.drv.submit(1, [data], []))
            self.out += data
        for i in range(n):  # small pieces: many rx chains are filled at the stop
            self.inp += b"r%03d;" % i
            self.chardev.feed(b"r%03d;" % i)

    def fetched(self) -> bool:
        port = self.side.dev.ports[0]
        return self.chardev.output == self.out and not self.chardev.pending() and not port.backlog

    def check(self) -> None:
        drv = self.g.drv = self.side.drv
        tokens_once(drv.wait(1, len(self.tokens)), self.tokens)
        assert self.g.read(0, len(self.inp)) == self.inp  # each byte once, in order
        self.roundtrip(b"after;")
        assert self.chardev.output == self.out  # each write once
        assert drv.queues[1].poll() == []
        self.tokens, self.inp = [], b""


class RngScenario:
    counted_queue = 0

    def __init__(self, tmp: Path) -> None:
        self.fills = 0
        self.tokens: list[int] = []

    def source(self, n: int) -> bytes:
        self.fills += 1
        return os.urandom(n)

    def device(self) -> RngDevice:
        return RngDevice(self.source)

    def open(self, side: Side, packed: bool) -> None:
        self.side = side
        self.rng = RngDriver.open(side.drv, packed=packed)
        assert len(self.rng.read(16)) == 16

    def submit(self, n: int) -> None:
        self.base = self.fills
        self.tokens += [self.rng.drv.submit(0, [], [16]) for _ in range(n)]

    def fetched(self) -> bool:
        return self.fills == self.base + len(self.tokens)

    def check(self) -> None:
        drv = self.rng.drv = self.side.drv
        done = drv.wait(0, len(self.tokens))
        tokens_once(done, self.tokens)
        assert all(c.length == 16 for c in done)
        assert len(self.rng.read(32)) == 32
        assert drv.queues[0].poll() == []
        self.tokens = []


SCENARIOS = {"blk": BlkScenario, "net": NetScenario, "console": ConsoleScenario}
SCENARIOS["rng"] = RngScenario


@pytest.fixture
def mem():
    m = GuestMemory.create(RAM)
    yield m
    m.close()


def stop_restore_cycle(
    tmp_path: Path, sc, side: Side, policy: str, n: int, impl: str | None = None
) -> None:
    """n requests in flight, stop, save to a file, restore into a fresh device, check."""
    for q in side.dev.queues:
        hold_completions(q, HOLD if policy == "report" else SHORT)
    sc.submit(n)
    if policy == "report":
        wait_until(sc.fetched)
    path = tmp_path / "device.state"
    side.stop_and_save(path, policy)
    left = side.dev.queues[sc.counted_queue].inflight()
    assert len(left) == (n if policy == "report" else 0)
    fresh = sc.device()
    for q in fresh.queues:
        q.impl = impl
    side.restore(fresh, path)
    sc.check()


@pytest.mark.parametrize("n", [0, 1, 32])
@pytest.mark.parametrize("policy", ["drain", "report"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_stop_save_restore(tmp_path, mem, kind, packed, policy, n):
    sc = SCENARIOS[kind](tmp_path)
    side = Side.create(mem, sc.device())
    sc.open(side, packed)
    stop_restore_cycle(tmp_path, sc, side, policy, n)
    side.dev.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_cython_state_restores_into_python_and_back(tmp_path, mem, kind, packed):
    pytest.importorskip("emu._ring")
    sc = SCENARIOS[kind](tmp_path)
    side = Side.create(mem, sc.device())
    for q in side.dev.queues:
        q.impl = "cython"
    sc.open(side, packed)
    for impl, module in (("python", "emu.pyring"), ("cython", "emu._ring")):
        stop_restore_cycle(tmp_path, sc, side, "report", 8, impl)
        assert type(side.dev.queues[0].ring).__module__ == module
    side.dev.close()


@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_report_stop_then_resume_same_device(tmp_path, mem, kind):
    """No snapshot: the stopped device itself carries on, with the same exactly-once."""
    sc = SCENARIOS[kind](tmp_path)
    side = Side.create(mem, sc.device())
    sc.open(side, False)
    for q in side.dev.queues:
        hold_completions(q, HOLD)
    sc.submit(32)
    wait_until(sc.fetched)
    side.tr.vmm_stop("report")
    assert len(side.dev.queues[sc.counted_queue].inflight()) == 32
    for q in side.dev.queues:
        hold_completions(q, 0.0)
    side.tr.vmm_resume()
    sc.check()
    side.dev.close()


# -- a restore in a fresh process: guest RAM in a file both processes map --


def child_main(argv: list[str]) -> None:
    """The restored side: device, transport and driver come back from files and carry on."""
    ram, image, state, driver, count, result = argv
    mem = GuestMemory.create(RAM, backing=ram)
    dev = BlkDevice(image)
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver.load(tr, mem, pickle.loads(Path(driver).read_bytes()))
    tr.restore(statefile.load(state))
    done = drv.wait(0, int(count))
    blk = BlkDriver(drv)
    status = blk.write(50 * BLOCK // SECTOR, b"\x77" * BLOCK)
    disk = blk.read(0, IMAGE // SECTOR)
    out = dict(
        tokens=[c.token for c in done],
        statuses=[status_of(c) for c in done] + [status],
        disk=hashlib.sha256(disk).hexdigest(),
    )
    Path(result).write_text(json.dumps(out))
    dev.close()
    mem.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_restore_in_a_fresh_process(tmp_path, packed):
    ram = tmp_path / "guest.ram"
    mem = GuestMemory.create(RAM, backing=ram)
    sc = BlkScenario(tmp_path)
    side = Side.create(mem, sc.device())
    sc.open(side, packed)
    for q in side.dev.queues:
        hold_completions(q, HOLD)
    sc.submit(32)
    wait_until(sc.fetched)
    side.stop_and_save(tmp_path / "device.state", "report")
    (tmp_path / "driver.pickle").write_bytes(pickle.dumps(side.drv.save()))
    side.dev.close()
    args = [ram, sc.image, tmp_path / "device.state", tmp_path / "driver.pickle", "32"]
    args.append(tmp_path / "result.json")
    subprocess.run([sys.executable, __file__, *map(str, args)], check=True, timeout=60, cwd=ROOT)
    got = json.loads((tmp_path / "result.json").read_text())
    tokens_once([Completion(t, 0, b"") for t in got["tokens"]], sc.tokens)
    assert got["statuses"] == [0] * 33
    sc.model[50 * BLOCK : 51 * BLOCK] = b"\x77" * BLOCK
    assert got["disk"] == hashlib.sha256(sc.model).hexdigest()
    assert sc.image.read_bytes() == bytes(sc.model)
    mem.close()


# -- snapshots that must be refused, leaving the fresh device as it was --


def fingerprint(tr: MmioTransport) -> tuple:
    dev = tr.device
    queues = [(q.size, q.ready, q.desc, q.driver, q.device, q.started) for q in dev.queues]
    regs = (tr.status, tr.driver_features, tr.interrupt_status)
    return dev.run_state, dev.save_state(), dict(dev._restore), queues, regs


def with_part(state: DeviceState, ptype: int, value: bytes) -> DeviceState:
    out = [Part(p.type, value, p.selector, p.flags) if p.type == ptype else p for p in state.parts]
    return DeviceState(state.device_type, out, state.flags)


def blk_part(state: DeviceState, version: tuple[int, int] = (1, 0), **changes) -> DeviceState:
    (p,) = state.find(parts.device_part(2))
    fields = json.loads(p.value[4:]) | changes
    return with_part(state, p.type, struct.pack("<HH", *version) + json.dumps(fields).encode())


def unknown_part(state: DeviceState) -> DeviceState:
    extra = Part(0xE0FF, struct.pack("<HH", 1, 0) + b"whatever")
    return DeviceState(state.device_type, [*state.parts, extra], state.flags)


BAD_STATES = {
    "corrupt": (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum mismatch"),
    "truncated": (lambda d: d[:-7], "truncated"),
    "unknown required part": (
        lambda d: encode(unknown_part(decode(d))),
        "required but unknown",
    ),
    "newer device part": (
        lambda d: encode(blk_part(decode(d), version=(2, 0))),
        r"DEVICE_2 \(blk state\) is version 2.0, of another major version",
    ),
    "newer minor device part": (
        lambda d: encode(blk_part(decode(d), version=(1, 1))),
        r"DEVICE_2 \(blk state\) is version 1.1, a newer minor version",
    ),
    "bad writeback": (
        lambda d: encode(blk_part(decode(d), writeback=7)),
        "'writeback' 7 is outside 0..1",
    ),
    "missing field": (
        lambda d: encode(blk_part(decode(d), serial=None)),
        "field 'serial' has the wrong type",
    ),
}


@pytest.fixture
def saved_blk(tmp_path, mem):
    """A blk snapshot with 4 writes in flight, the driver's state, and the scenario."""
    sc = BlkScenario(tmp_path)
    side = Side.create(mem, sc.device())
    sc.open(side, False)
    for q in side.dev.queues:
        hold_completions(q, HOLD)
    sc.submit(4)
    wait_until(sc.fetched)
    path = tmp_path / "good.state"
    side.stop_and_save(path, "report")
    driver = side.drv.save()
    side.dev.close()
    return sc, side, path, driver


@pytest.mark.parametrize("bad", sorted(BAD_STATES))
def test_bad_snapshot_refused_device_untouched(tmp_path, mem, saved_blk, bad):
    sc, side, path, driver = saved_blk
    change, message = BAD_STATES[bad]
    bad_path = tmp_path / "bad.state"
    bad_path.write_bytes(change(path.read_bytes()))
    dev = sc.device()
    tr = MmioTransport(dev, mem)
    before = fingerprint(tr)
    with pytest.raises(StateError, match=message):
        tr.restore(statefile.load(bad_path))
    assert fingerprint(tr) == before
    # untouched indeed: the good snapshot still restores into it and the guest carries on
    side.drv = VirtioMmioDriver.load(tr, mem, driver)
    tr.restore(statefile.load(path))
    side.dev, side.tr = dev, tr
    sc.check()
    dev.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: RngDevice(), "device type 2|not all offered here"),
        (lambda tmp: NetDevice(Sink()), "device type 2|not all offered here"),
        (lambda tmp: big_disk(tmp), "capacity 2048, this device's backing has 4096"),
        (lambda tmp: BlkDevice(tmp / "disk.img", readonly=True), "readonly False"),
        (
            lambda tmp: BlkDevice(tmp / "disk.img", num_queues=2),
            "queue_align has 1 queues|num_queues 1",
        ),
        (lambda tmp: BlkDevice(tmp / "disk.img", logical_block_size=4096), "block_size 512"),
    ],
    ids=["rng", "net", "capacity", "readonly", "num_queues", "block_size"],
)
def test_incompatible_device_refused_untouched(tmp_path, mem, saved_blk, make, message):
    _, _, path, _ = saved_blk
    dev = make(tmp_path)
    tr = MmioTransport(dev, mem)
    before = fingerprint(tr)
    with pytest.raises(StateError, match=message):
        tr.restore(statefile.load(path))
    assert fingerprint(tr) == before
    dev.close()


def big_disk(tmp: Path) -> BlkDevice:
    (tmp / "big.img").write_bytes(bytes(2 * IMAGE))
    return BlkDevice(tmp / "big.img")


ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    child_main(sys.argv[1:])
