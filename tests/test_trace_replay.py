"""Replay what a real Linux 6.1 guest did to QEMU's virtio-mmio registers against emu.

The traces (shared/traces/linux-6.1, see its README) record every register access of a
whole guest run. Replaying the R/W lines against emu's transport and device checks that
emu accepts everything Linux writes, and answers the reads whose values the spec fixes the
way QEMU did. Guest RAM is zero-filled, so kicks find empty rings: this is a test of the
register interface, not of request handling.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.transport import mmio, mmio_regs
from emu.transport.mmio import MmioTransport

TRACES = Path(os.environ.get("EMU_TRACES", "/work/shared/traces/linux-6.1"))
QUEUE_MAX = 1024  # what QEMU's virtio-mmio reports and Linux then writes as QueueNum
MIB = 1 << 20

#: registers whose value the spec (or the device type) fixes, compared exactly
EXACT = {
    mmio_regs.MAGIC_VALUE,
    mmio_regs.VERSION,
    mmio_regs.DEVICE_ID,
    mmio_regs.STATUS,
    mmio_regs.QUEUE_READY,
}
#: config bytes that follow from how the test builds the device (same disk size, MAC, limits)
CONFIG_CHECKED = {
    "blk": {*range(0, 8), *range(0xC, 0x10), *range(0x14, 0x18)},  # capacity seg_max blk_size
    "net": set(range(0, 8)),  # mac, status
    "rng": set(),
}


@dataclass
class Trace:
    name: str
    version: int
    device_id: int
    accepted: int
    accesses: list[tuple[int, str, int, int, int]] = field(default_factory=list)
    # (line number, "R"/"W", offset, size, value)


def load(name: str) -> Trace:
    path = TRACES / f"{name}.trace"
    if not path.exists():
        pytest.skip(f"trace {path} not available")
    text = path.read_text()
    head = re.search(r"DeviceID (\d+) \S+ Version (\d)", text)
    accepted = re.search(r"driver features accepted: (0x[0-9a-f]+)", text)
    assert head and accepted, f"{path}: header without device or accepted features"
    trace = Trace(name, int(head[2]), int(head[1]), int(accepted[1], 16))
    for lineno, line in enumerate(text.splitlines(), 1):
        f = line.split()
        if line.startswith("#") or len(f) != 5 or f[1] not in ("R", "W"):
            continue  # STATUS/KICK/POP/FILL/FLUSH/NOTIFY/IRQ lines and comments
        base = int(f[0], 16)
        off = int(f[2], 16)
        assert off < 0x200 and base & 0x1FF == 0
        trace.accesses.append((lineno, f[1], off, int(f[3]), int(f[4], 16)))
    return trace


def ram_size(trace: Trace) -> int:
    """Enough zeroed RAM at gpa 0 to hold every ring the trace set up."""
    high: dict[int, int] = {}
    top = 0
    for _, kind, off, _, value in trace.accesses:
        if kind != "W":
            continue
        if off in (
            mmio_regs.QUEUE_DESC_HIGH,
            mmio_regs.QUEUE_DRIVER_HIGH,
            mmio_regs.QUEUE_DEVICE_HIGH,
        ):
            high[off] = value
        elif off in (
            mmio_regs.QUEUE_DESC_LOW,
            mmio_regs.QUEUE_DRIVER_LOW,
            mmio_regs.QUEUE_DEVICE_LOW,
        ):
            top = max(top, value | high.get(off + 4, 0) << 32)
        elif off == mmio_regs.QUEUE_PFN and trace.version == 1:
            top = max(top, value << 12)
    assert top < 1 << 32, "rings above 4 GiB: the trace is not what this test expects"
    return (top + MIB + MIB - 1) // MIB * MIB  # a 1024-entry ring needs < 64 KiB past its start


class NullNet:
    """A net backend that drops what the guest sends and never receives."""

    def attach(self, device: VirtioDevice) -> None:
        pass

    def send(self, frame: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def device_module(name: str):
    try:
        return importlib.import_module(f"emu.devices.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"emu.devices.{name}":
            raise
        pytest.skip(f"emu.devices.{name} does not exist yet")


def make_device(kind: str, tmp_path: Path) -> VirtioDevice:
    if kind == "blk":
        disk = tmp_path / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 * MIB)  # the traced guest's sparse 64 MiB disk
        return device_module("blk").BlkDevice(
            disk, queue_max_size=QUEUE_MAX, seg_max=254, logical_block_size=512
        )
    if kind == "net":
        return device_module("net").NetDevice(NullNet(), queue_max_size=QUEUE_MAX)
    return device_module("rng").RngDevice(queue_max_size=QUEUE_MAX)


class Replayer:
    def __init__(self, trace: Trace, kind: str, device: VirtioDevice, mem: GuestMemory) -> None:
        self.trace = trace
        self.kind = kind
        self.dev = device
        self.t = MmioTransport(device, mem, version=trace.version)
        self.offered = 0
        self.features_sel = 0
        self.queue_sel = 0
        self.traced_ready: set[int] = set()

    def write(self, lineno: int, off: int, size: int, value: int) -> None:
        self.t.write(off, size, value)
        if off == mmio_regs.DEVICE_FEATURES_SEL:
            self.features_sel = value
        elif off == mmio_regs.QUEUE_SEL:
            self.queue_sel = value
        elif off in (mmio_regs.QUEUE_READY, mmio_regs.QUEUE_PFN) and value:
            self.traced_ready.add(self.queue_sel)
        if self.trace.version == 2:
            bad = self.t.status & (mmio_regs.S_DEVICE_NEEDS_RESET | mmio_regs.S_FAILED)
            assert not bad, f"line {lineno}: status {self.t.status:#x} after W {off:#x}={value:#x}"

    def read(self, lineno: int, off: int, size: int, value: int) -> None:
        got = self.t.read(off, size)
        where = f"line {lineno}: R {off:#05x}/{size}"
        if off in EXACT or off == mmio_regs.QUEUE_PFN and self.trace.version == 1:
            assert got == value, f"{where}: emu {got:#x}, Linux saw {value:#x}"
        elif off == mmio_regs.QUEUE_SIZE_MAX:
            assert bool(got) == bool(value), f"{where}: emu {got:#x}, Linux saw {value:#x}"
        elif off == mmio_regs.DEVICE_FEATURES:
            self.offered |= got << (32 * self.features_sel)
        elif off >= mmio_regs.CONFIG and set(range(off, off + size)) <= {
            mmio_regs.CONFIG + b for b in CONFIG_CHECKED[self.kind]
        }:
            assert got == value, f"{where} (config): emu {got:#x}, QEMU gave {value:#x}"

    def check_running(self) -> None:
        """Just before the guest's final reset: DRIVER_OK, the traced queues live."""
        assert self.t.status & mmio_regs.S_DRIVER_OK
        assert self.traced_ready, "the trace set up no queue"
        for i in self.traced_ready:
            assert self.dev.queues[i].started, f"queue {i} not started"
        assert self.dev.driver_features == self.trace.accepted

    def check_reset(self) -> None:
        assert self.t.status == 0 and self.t.interrupt_status == 0
        for q in self.dev.queues:
            assert not q.ready and not q.started, f"queue {q.index} still live after reset"


@pytest.mark.parametrize(
    "name,kind",
    [
        ("blk-modern", "blk"),
        ("blk-legacy", "blk"),
        ("net-modern", "net"),
        ("rng-modern", "rng"),
    ],
)
def test_replay_linux_trace(name, kind, tmp_path, caplog):
    trace = load(name)
    device = make_device(kind, tmp_path)
    assert device.device_id == trace.device_id
    mem = GuestMemory.create(ram_size(trace))
    caplog.set_level(logging.WARNING, logger=mmio.__name__)
    try:
        r = Replayer(trace, kind, device, mem)
        final_reset = max(
            i
            for i, a in enumerate(trace.accesses)
            if a[1:3] == ("W", mmio_regs.STATUS) and a[4] == 0
        )
        for i, (lineno, kind_, off, size, value) in enumerate(trace.accesses):
            if i == final_reset:
                r.check_running()
            if kind_ == "W":
                r.write(lineno, off, size, value)
            else:
                r.read(lineno, off, size, value)
        r.check_reset()
        missing = trace.accepted & ~r.offered
        assert not missing, f"Linux accepted features emu does not offer: {missing:#x}"
        assert [rec.getMessage() for rec in caplog.records if rec.name == mmio.__name__] == []
    finally:
        device.close()
        mem.close()
