"""``emu state show`` (the summary) and ``emu state diff``, on states real devices saved:
the golden files (every device type, both ring formats) and a blk device saved twice
in this test, before and after requests went in flight."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from modes import wait_until

from emu.cli import main
from emu.devices import registry
from emu.devices.blk import T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.state import file as statefile
from emu.state.diff import diff
from emu.state.summary import summary
from emu.state.view import view
from emu.testing.blk import BlkDriver
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport

GOLDEN = Path(__file__).parent / "golden" / "v1"
CASES = sorted(p.stem for p in GOLDEN.glob("*.state"))
NAMES = {t.device_id: t.name for t in registry.types()}
#: what each device's summary says about its own state (the golden cases' devices)
DEVICE_LINES = {
    "blk": "capacity 128 sectors (64 KiB), block size 512, read-write, 1 queue",
    "net": "mac 52:54:00:12:34:56, link up",
    "console": "port 1 'golden': closed in the guest",
    "rng": "no device state",
    "fs": "2 nodes, 1 open handle, 12 answers withheld by the stop",
    "balloon": "target 64 pages (256 KiB), actual 8 pages (32 KiB)",
    "vsock": "1 connection at the save",
}


def rows(text: str) -> list[str]:
    """The summary's rows without their labels, wrapped lines joined."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(" " * 13):
            out[-1] += " " + line.strip()
        else:
            out.append(line[11:].strip())
    return out


def run(*args: str):
    return CliRunner().invoke(main, ["state", *args])


@pytest.mark.parametrize("case", CASES)
def test_the_summary_of_a_golden_state(case: str) -> None:
    path = GOLDEN / f"{case}.state"
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    kind, ring = case.split("-")
    res = run("show", str(path))
    assert res.exit_code == 0, res.output
    text = res.output
    first = text.splitlines()[0]
    assert first.startswith(f"{kind} device (virtio device type ")
    assert f"{path.stat().st_size} bytes" in first
    assert "status     0x0f ACKNOWLEDGE DRIVER DRIVER_OK FEATURES_OK" in text
    (negotiated,) = [r.split() for r in rows(text) if r.startswith("negotiated ")]
    assert "VERSION_1" in negotiated and ("RING_PACKED" in negotiated) == (ring == "packed")
    assert f"{ring} ring format" in text
    # every queue the golden maker saw running, with its chains in flight by head
    queues = {r.split(":")[0]: r.split(": ", 1)[1] for r in rows(text) if re.match(r"\d+: ", r)}
    for i, q in meta["queues"].items():
        config, _, inflight = queues[i].split("; ")
        assert config == f"size {q['size']}, enabled"
        heads = [str(c["head"]) for c in q["inflight"]]
        expect = (
            f"{len(heads)} in flight: heads {' '.join(heads)}" if heads else "nothing in flight"
        )
        assert inflight == expect
    flat = " ".join(text.split())
    assert DEVICE_LINES[kind] in flat
    # the parts' bytes and the container add up to the file
    totals = [int(n) for n in re.findall(r"\((\d+) bytes\)", flat)]
    container = int(re.search(r"container (\d+)", flat).group(1))
    assert sum(totals) + container == path.stat().st_size


def test_json_and_breakdown_stay_and_do_not_mix() -> None:
    path = str(GOLDEN / "fs-split.state")
    shown = json.loads(run("show", "--json", path).output)
    assert shown["device_type"] == 26 and shown["parts"][0]["name"] == "DEV_FEATURES"
    assert "dir.nodes: 2 entries" in run("show", "--breakdown", path).output
    res = run("show", "--json", "--breakdown", path)
    assert res.exit_code == 2 and "pick one" in res.output


def test_a_device_without_its_own_lines_lists_its_fields() -> None:
    state = statefile.load(GOLDEN / "balloon-split.state")
    state.device_type = 99  # no device type of this id: its part is only shown, not judged
    for p in state.parts:
        if p.type == 0xE105:
            p.type = 0xE100 + 99
    lines = summary(view(state), NAMES)
    assert lines[0].startswith("device (virtio device type 99)")
    (device,) = [ln for ln in lines[1:] if ln.startswith("device ")]
    assert device.split(None, 1)[1] == "actual 8, stats: 1 entry, target 64"  # file order


# -- diff --


def blk_states(tmp_path: Path, mem: GuestMemory) -> tuple[Path, Path, list[int]]:
    """A blk device saved after one write (nothing in flight), then again with two
    writes in flight; the heads of those two."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 << 10))
    dev = BlkDevice(disk)
    tr = MmioTransport(dev, mem)
    blk = BlkDriver.open(VirtioMmioDriver(tr, mem), queue_size=16)
    try:
        assert blk.write(0, b"\x01" * 4096) == 0
        tr.vmm_stop("drain")
        before, after = tmp_path / "before.state", tmp_path / "after.state"
        statefile.save(before, tr.save())
        tr.vmm_resume()
        hold_completions(dev.queues[0], 60.0)
        for i in range(2):
            blk.submit(T_OUT, 8 * (i + 1), bytes([i]) * 4096)
        wait_until(lambda: len(dev.queues[0].inflight()) == 2)
        heads = [c.head for c in dev.queues[0].inflight()]
        tr.vmm_stop("report")
        statefile.save(after, tr.save())
    finally:
        dev.close()
    return before, after, heads


def test_diff_of_a_device_saved_twice(tmp_path: Path, mem: GuestMemory) -> None:
    before, after, heads = blk_states(tmp_path, mem)
    res = run("diff", str(before), str(after))
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert lines[:2] == [f"--- {before}", f"+++ {after}"]
    a = view(statefile.load(before), registry.schemas())
    b = view(statefile.load(after), registry.schemas())
    na, nb = a.queues[0].ring["next_avail"], b.queues[0].ring["next_avail"]
    assert nb == na + 2
    assert f"queue 0: next_avail {na} -> {nb}" in lines
    shown = " ".join(map(str, heads))
    assert f"queue 0: in flight heads [] -> [{shown}] (0 -> 2 chains)" in lines
    size = next(p.size for p in b.parts if p.label == "INFLIGHT[0]")
    assert f"part INFLIGHT[0]: bytes 24 -> {size}" in lines  # 16-byte header, count 0
    assert not any(ln.startswith(("device:", "features:", "status:")) for ln in lines)
    # the JSON says the same, with whole values
    res = run("diff", "--json", str(before), str(after))
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["equal"] is False and out["a"] == str(before)
    (inflight,) = [c for c in out["changes"] if c["field"] == "in flight heads"]
    assert inflight == {
        "where": "queue 0",
        "field": "in flight heads",
        "a": [],
        "b": heads,
        "note": "0 -> 2 chains",
    }
    # and backwards: the same fields, the other way round
    back = diff(b, a)
    assert [(c.where, c.field) for c in back] == [(c.where, c.field) for c in diff(a, b)]


def test_diff_of_equal_states_is_silent(tmp_path: Path) -> None:
    copy = tmp_path / "copy.state"
    copy.write_bytes((GOLDEN / "fs-split.state").read_bytes())
    res = run("diff", str(GOLDEN / "fs-split.state"), str(copy))
    assert (res.exit_code, res.output) == (0, "")
    res = run("diff", "--json", str(GOLDEN / "fs-split.state"), str(copy))
    assert res.exit_code == 0 and json.loads(res.output)["changes"] == []


def test_diff_names_features_and_device_fields() -> None:
    res = run("diff", str(GOLDEN / "fs-split.state"), str(GOLDEN / "fs-packed.state"))
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert "features: negotiated 0x10130000000 -> 0x10530000000 (+RING_PACKED)" in lines
    assert any(ln.startswith("device: dir.nodes[1].file_handle ") for ln in lines)


def test_a_changed_device_field_is_named_by_its_path(tmp_path: Path) -> None:
    state = statefile.load(GOLDEN / "balloon-split.state")
    part = next(p for p in state.parts if p.type == 0xE105)
    value = json.loads(part.value[4:])
    value["actual"] = 9
    part.value = part.value[:4] + json.dumps(value, separators=(",", ":")).encode()
    changed = tmp_path / "changed.state"
    statefile.save(changed, state)
    res = run("diff", str(GOLDEN / "balloon-split.state"), str(changed))
    assert res.exit_code == 1
    assert res.output.splitlines()[2:] == ["device: actual 8 -> 9"]


def test_diff_refuses_corrupt_incompatible_and_other_devices(tmp_path: Path) -> None:
    good = GOLDEN / "blk-split.state"
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.state"
    corrupt.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    newer = tmp_path / "newer.state"
    body = bytearray(data[:-32])
    struct.pack_into("<H", body, 8, 2)  # format version 2, with a good checksum
    newer.write_bytes(bytes(body) + hashlib.sha256(body).digest())
    for other, words in (
        (corrupt, "checksum"),
        (newer, "format version 2 is not supported"),
        (tmp_path / "missing.state", "cannot read"),
        (GOLDEN / "net-split.state", "different devices"),
    ):
        for a, b in ((good, other), (other, good)):
            res = run("diff", str(a), str(b))
            assert res.exit_code == 2, (other, res.output)
            assert words in res.output and "Traceback" not in res.output
    res = run("show", str(corrupt))
    assert res.exit_code == 1 and "checksum" in res.output


def test_the_summary_of_a_state_saved_over_vhost_user(tmp_path: Path) -> None:
    """A blk backend stopped by emu's vhost-user frontend with requests in flight: the
    transport part is vhost-user's, and the heads in flight are the ring's."""
    from test_vhost_user_state import IMAGE, READS, WRITES, stop_with_inflight

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(IMAGE))
    s = stop_with_inflight(disk, tmp_path / "blk.sock", packed=False)
    s.fe.close()
    path = tmp_path / "blk.state"
    path.write_bytes(s.state)
    res = run("show", str(path))
    assert res.exit_code == 0, res.output
    got = {r.split(":")[0]: r for r in rows(res.output)}
    inflight = view(statefile.load(path), registry.schemas()).queues[0].inflight
    heads = " ".join(str(c["head"]) for c in inflight)
    assert len(inflight) == WRITES + READS
    assert got["0"].endswith(f"{WRITES + READS} in flight: heads {heads}")
    assert "status     0x00 (no bits set)" in res.output
    assert any(r.startswith("vhost-user version 1, vhost-user features 0x") for r in got.values())
    assert f"capacity {IMAGE // 512} sectors (1 MiB)" in res.output


def test_parts_no_schema_checks_are_shown_whatever_they_hold(tmp_path: Path) -> None:
    """TRANSPORT is read without a schema (it is optional): any JSON in it is shown, cut
    short, and compared; nothing in it can make show or diff fail."""
    state = statefile.load(GOLDEN / "rng-split.state")
    odd = {
        "transport": ["x"] * 100,
        "version": {"a": None},
        "interrupt_status": "0x1",
        "features": 1.5,
        "protocol": True,
        "vmm_stopped": "yes",
        "bases": [1, 2],
        "config_generation": "z" * 1000,
    }
    part = next(p for p in state.parts if p.type == 0xE003)
    part.value = part.value[:4] + json.dumps(odd).encode()
    path = tmp_path / "odd.state"
    statefile.save(path, state)
    res = run("show", str(path))
    assert res.exit_code == 0, res.output
    (transport,) = [r for r in rows(res.output) if r.startswith('["x", "x"')]
    assert "interrupt status 0x1, config generation zzz" in transport
    assert "vhost-user features 1.5, protocol true" in transport
    assert "stopped" not in transport and len(transport) < 300
    res = run("diff", str(GOLDEN / "rng-split.state"), str(path))
    assert res.exit_code == 1 and "transport: interrupt_status 0 -> " in res.output
