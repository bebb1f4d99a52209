"""Hostile and inconsistent snapshots: every decode or validation failure is a StateError
with a clear message, raised before anything is applied, and a device never saves a state
it could not restore.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from modes import wait_until

from emu.cli import main
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.ringdefs import DESC_F_AVAIL, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import DeviceState, Part, StateError
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.rng import RngDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

DEEP = 100_000


def ext(raw: bytes, major: int = 1, minor: int = 0) -> bytes:
    return struct.pack("<HH", major, minor) + raw


HOSTILE_JSON = {
    "nested 100000 deep": b"[" * DEEP + b"]" * DEEP,
    "nested objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "5000-digit integer": b'{"capacity": ' + b"7" * 5000 + b"}",
    "NaN": b'{"capacity": NaN}',
    "nested 100 deep": b"[" * 100 + b"]" * 100,  # parses, but deeper than any state
}


@pytest.fixture
def mem():
    m = GuestMemory.create(4 << 20)
    yield m
    m.close()


def with_device_part(state: DeviceState, raw: bytes) -> DeviceState:
    dev_part = parts.device_part(state.device_type)
    out = [Part(p.type, raw, p.selector, p.flags) if p.type == dev_part else p for p in state.parts]
    return DeviceState(state.device_type, out, state.flags)


def rng_state(mem: GuestMemory, packed: bool = False, size: int = 8) -> DeviceState:
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    rng = RngDriver.open(VirtioMmioDriver(tr, mem), packed=packed, queue_size=size)
    assert len(rng.read(16)) == 16
    tr.vmm_stop("report")
    state = tr.save()
    dev.close()
    return state


@pytest.mark.parametrize("raw", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
@pytest.mark.parametrize("ptype", [parts.device_part(4), parts.TRANSPORT])
def test_hostile_json_is_a_state_error(raw: bytes, ptype: int) -> None:
    state = DeviceState(4, [Part(ptype, ext(raw))])
    with pytest.raises(StateError, match="JSON"):
        parts.parse(state)


@pytest.mark.parametrize("raw", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_refused_by_restore_untouched(mem: GuestMemory, raw: bytes) -> None:
    state = with_device_part(rng_state(mem), ext(raw))
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    with pytest.raises(StateError, match="JSON"):
        tr.restore(state)
    assert tr.status == 0 and not any(q.ready for q in dev.queues)
    dev.close()


def test_state_show_refuses_hostile_json_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.state"
    statefile.save(path, DeviceState(4, [Part(parts.device_part(4), ext(HOSTILE_JSON["NaN"]))]))
    for raw in HOSTILE_JSON.values():
        statefile.save(path, DeviceState(4, [Part(parts.device_part(4), ext(raw))]))
        res = CliRunner().invoke(main, ["state", "show", str(path)])
        assert res.exit_code == 1, res.output
        assert isinstance(res.exception, SystemExit), res.exception
        assert "JSON" in res.output


def test_huge_feature_words_refused() -> None:
    """A features part is a few le64 words; a megabyte of them is not a feature set."""
    state = DeviceState(4, [Part(parts.DEV_FEATURES, b"\xff" * (1 << 20))])
    with pytest.raises(StateError, match="DEV_FEATURES"):
        parts.parse(state)


def test_serve_restore_dir_refuses_hostile_json_without_a_traceback(
    tmp_path: Path, mem: GuestMemory
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state = rng_state(mem)  # without its virtio-mmio registers, which vhost-user refuses
    good = DeviceState(4, [p for p in state.parts if p.type != parts.TRANSPORT])
    for raw in (HOSTILE_JSON["nested 100000 deep"], HOSTILE_JSON["5000-digit integer"]):
        statefile.save(state_dir / "rng.sock.state", with_device_part(good, ext(raw)))
        cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(tmp_path / "rng.sock")]
        res = subprocess.run(
            [*cmd, "--restore-dir", str(state_dir), "rng"], capture_output=True, timeout=60
        )
        assert res.returncode == 1, res.stderr
        assert b"Traceback" not in res.stderr
        assert b"JSON" in res.stderr
        assert not (tmp_path / "rng.sock").exists()


# -- values of the right shape but the wrong type or range --


def edit_part(state: DeviceState, ptype: int, change) -> DeviceState:
    out = []
    for p in state.parts:
        if p.type == ptype:
            kind = parts.KINDS[ptype]
            value = kind.decode(p.value[4:] if kind.version else p.value)
            vq = p.vq_index if kind.per_queue else None
            p = parts.make(ptype, change(value), vq=vq, optional=p.optional)
        out.append(p)
    return DeviceState(state.device_type, out, state.flags)


REGISTERS = [
    ("queue_sel", -1),
    ("queue_sel", "0"),
    ("queue_sel", 1 << 32),
    ("device_features_sel", None),
    ("driver_features_sel", 2.5),
    ("driver_features", -1),
    ("shm_sel", [0]),
    ("interrupt_status", 7),
    ("interrupt_status", "1"),
    ("config_generation", -1),
    ("config_generation", None),
    ("guest_page_size", 3),
    ("queue_align", [-4096]),
    ("queue_align", ["4096"]),
    ("queue_align", 4096),
    ("queue_align", [4096] * 300),
    ("vmm_stopped", "yes"),
    ("guest_stop_pending", 1),
    ("config_pending", None),
    ("version", "2"),
    ("transport", None),
]


@pytest.mark.parametrize("name, value", REGISTERS, ids=[f"{n}={v!r}"[:40] for n, v in REGISTERS])
def test_bad_register_values_refused_untouched(mem: GuestMemory, name: str, value) -> None:
    state = edit_part(rng_state(mem), parts.TRANSPORT, lambda regs: regs | {name: value})
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    with pytest.raises(StateError, match=name):
        tr.restore(state)
    assert tr.status == 0 and tr.queue_sel == 0 and not any(q.ready for q in dev.queues)
    # every register still reads (nothing half-applied raises into a vCPU)
    for off in range(0, 0x100, 4):
        tr.read(off, 4)
    dev.close()


def test_missing_register_refused(mem: GuestMemory) -> None:
    state = edit_part(
        rng_state(mem),
        parts.TRANSPORT,
        lambda regs: {k: v for k, v in regs.items() if k != "shm_sel"},
    )
    dev = RngDevice()
    with pytest.raises(StateError, match="shm_sel"):
        MmioTransport(dev, mem).restore(state)
    dev.close()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(signalled_used=9), "signalled"),
        (dict(next_used=8), "next_used"),
        (dict(next_avail=200), "next_avail"),
    ],
    ids=["signalled-beyond", "used-beyond", "avail-beyond"],
)
def test_packed_ring_state_beyond_the_ring_refused(mem: GuestMemory, change, message) -> None:
    state = edit_part(rng_state(mem, packed=True), parts.RING_STATE, lambda r: r | change)
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    with pytest.raises(StateError, match=message):
        tr.restore(state)
    assert dev.broken is None and tr.status == 0
    dev.close()


def test_split_ring_size_must_be_a_power_of_two(mem: GuestMemory) -> None:
    state = edit_part(rng_state(mem), parts.VQ_CFG, lambda c: c | dict(size=6))
    dev = RngDevice()
    with pytest.raises(StateError, match="power of 2"):
        MmioTransport(dev, mem).restore(state)
    dev.close()


def test_started_ring_outside_guest_ram_refused(mem: GuestMemory) -> None:
    state = edit_part(rng_state(mem), parts.VQ_CFG, lambda c: c | dict(device=mem.size + 4096))
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    with pytest.raises(StateError, match="outside"):
        tr.restore(state)
    assert dev.broken is None and tr.status == 0
    dev.close()


def _packed_desc(mem: GuestMemory, table: int, slot: int, buf: int, buf_id: int, flags: int):
    mem.write(table + 16 * slot, struct.pack("<QIHH", buf, 16, buf_id, flags))


def test_packed_ring_with_more_descriptors_in_flight_than_slots_round_trips(
    mem: GuestMemory,
) -> None:
    """A driver that reuses slots of chains still in flight: the device took the chains
    (their buffers are saved with them), so its snapshot must restore as it ran."""
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    RngDriver.open(drv, packed=True, queue_size=4)
    hold_completions(dev.queues[0], 3600.0)
    table, buf = drv.queues[0].desc, drv.alloc.alloc(16 * 7)
    avail = DESC_F_WRITE | DESC_F_AVAIL

    def chain(first: int, n: int, buf_id: int, wrap: int) -> None:
        flags = avail if wrap else DESC_F_WRITE | DESC_F_USED
        for k in range(n):  # the first descriptor last: it publishes the chain
            slot = first + n - 1 - k
            more = DESC_F_NEXT if slot < first + n - 1 else 0
            _packed_desc(mem, table, slot, buf + 16 * (first + k), buf_id, flags | more)

    chain(0, 3, 0, 1)
    chain(3, 1, 1, 1)
    tr.write(mmio_regs.QUEUE_NOTIFY, 4, 0)
    wait_until(lambda: len(dev.queues[0].inflight()) == 2)
    chain(0, 3, 2, 0)  # over the slots of chain 0, still in flight: wrap counter 0
    tr.write(mmio_regs.QUEUE_NOTIFY, 4, 0)
    wait_until(lambda: len(dev.queues[0].inflight()) == 3)
    assert sum(c.ndesc for c in dev.queues[0].inflight()) == 7
    tr.vmm_stop("report")
    state = tr.save()
    dev.close()
    fresh = RngDevice()
    MmioTransport(fresh, mem).restore(state)
    wait_until(lambda: not fresh.queues[0].inflight())  # filled and used, once each
    assert fresh.broken is None
    fresh.close()


class LyingRng(RngDevice):
    """A device whose saved state its own load would refuse."""

    def save_state(self) -> dict:
        return {"pool": 1}


def test_a_state_that_cannot_be_restored_is_not_saved(mem: GuestMemory) -> None:
    dev = LyingRng()
    tr = MmioTransport(dev, mem)
    RngDriver.open(VirtioMmioDriver(tr, mem))
    tr.vmm_stop("report")
    with pytest.raises(StateError, match="cannot be restored.*pool"):
        tr.save()
    dev.close()


def test_deep_json_in_a_good_file_shows_the_error_part(tmp_path: Path, mem: GuestMemory) -> None:
    path = tmp_path / "dev.state"
    state = with_device_part(rng_state(mem), ext(HOSTILE_JSON["nested 100000 deep"]))
    statefile.save(path, state)
    res = CliRunner().invoke(main, ["state", "show", str(path)])
    assert res.exit_code == 1 and "DEVICE_4" in res.output
    statefile.save(path, rng_state(mem))
    res = CliRunner().invoke(main, ["state", "show", "--json", str(path)])
    assert res.exit_code == 0 and json.loads(res.output)["device_type"] == 4
