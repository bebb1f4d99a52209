"""``emu bench debate --quick`` end to end: the report is produced, whole and sane.

One run (about 20 s on 2 cores) shared by the checks: every file is there, the PNGs are
PNG files the HTML and Markdown show, every latency is positive and finite, the NBD
samples really had their requests outstanding, a report stop is not slower than a drain
stop at 10 ms backend latency (the 10 ms margin is the backend's own delay, not the
machine's speed), every field of every device's state is classified, and every
cross-implementation restore passed. The conclusions are checked to follow the figures
they are given.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from emu.debate import conclude
from emu.testing.nbdkit import nbdkit_missing

ROOT = Path(__file__).resolve().parent.parent
PNGS = ("a_stop_by_depth.png", "b_drain_vs_report.png", "b_downtime_model.png", "c_state_bytes.png")
CSVS = ("a_stop_by_depth.csv", "b_stops.csv", "b_write_fence.csv", "c_state.csv", "d_restore.csv")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (why := nbdkit_missing()) is not None:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("debate") / "report"
    run = subprocess.run(
        [sys.executable, "-m", "emu.cli", "bench", "debate", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(out / "report.html") in run.stdout
    return out


@pytest.fixture(scope="module")
def results(report: Path) -> dict:
    return json.loads((report / "results.json").read_text())


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    off, kinds = 8, []
    while off < len(data):
        (length,) = struct.unpack(">I", data[off : off + 4])
        kind, body = data[off + 4 : off + 8], data[off + 8 : off + 8 + length]
        (crc,) = struct.unpack(">I", data[off + 8 + length : off + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        off += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return struct.unpack(">II", data[16:24])


def test_files_and_plots(report: Path) -> None:
    html = (report / "report.html").read_text()
    md = (report / "report.md").read_text()
    for name in PNGS:
        w, h = png_size((report / name).read_bytes())
        assert w > 200 and h > 200
        assert f'src="{name}"' in html and f"]({name})" in md
    for name in CSVS:
        lines = (report / name).read_text().splitlines()
        assert len(lines) > 1, name
    for q in "abcd":
        assert f"Conclusion ({q})" in md and f"Conclusion ({q})" in html


def _latencies(results: dict) -> list[float]:
    rows = results["stops"]["by_depth"] + results["stops"]["many_devices"]
    rows += results["policies"]["stops"]
    return [r[k] for r in rows for k in ("p50_us", "p99_us", "mean_us", "max_us")]


def test_latencies_are_sane(results: dict) -> None:
    values = _latencies(results)
    assert values and all(math.isfinite(v) and v > 0 for v in values)
    cost = results["policies"]["state_cost"]
    assert cost["save_us"] > 0 and cost["restore_us"] > 0 and cost["bytes"] > 0


def test_report_stop_not_slower_than_drain_at_10ms(results: dict) -> None:
    rows = {
        (r["interface"], r["op"], r["policy"]): r
        for r in results["policies"]["stops"]
        if r["backend"] == "nbd10ms"
    }
    depth = results["policies"]["plan"]["depth"]
    for iface in results["policies"]["plan"]["interfaces"]:
        for op in ("read", "write"):
            for policy in ("drain", "report"):  # the requests were at the server
                assert rows[iface, op, policy]["at_engine"] >= depth / 2
        assert rows[iface, "read", "report"]["p50_us"] <= rows[iface, "read", "drain"]["p50_us"]
        # the write fence: a report stop waits for the writes (10 ms at the server)
        assert rows[iface, "write", "report"]["p50_us"] > rows[iface, "read", "report"]["p50_us"]


def test_every_state_field_is_classified(results: dict) -> None:
    devices = {d["device"]: d for d in results["state"]["devices"]}
    assert set(devices) == {"blk", "net", "console", "rng", "fs", "vsock", "balloon"}
    for d in devices.values():
        assert d["unclassified"] == [], d["device"]
        assert d["bytes"]["virtio 1.4 common parts"] > 0
        assert d["total_bytes"] == sum(d["bytes"].values())
        assert d["inflight_chains"] > 0  # the report stop left requests in flight
    assert devices["vsock"]["host"]["connections dropped"] >= 1
    assert devices["net"]["net_cvq_standard_bytes"] > 0


def test_every_restore_passed(results: dict) -> None:
    checks = results["restore"]["checks"]
    assert len(checks) == 8
    failed = [(c["check"], c["ring"], c["checked"]) for c in checks if not c["passed"]]
    assert failed == []


def test_conclusions_follow_the_figures(results: dict) -> None:
    """The same sentence turns when the figures do: nothing in it is fixed."""
    said = " ".join(conclude.policies(results["policies"]))
    assert "faster than drain" in said
    turned = copy.deepcopy(results["policies"])
    for r in turned["stops"]:
        if r["backend"] == "nbd10ms" and r["op"] == "read":
            r["p50_us"] = 100.0 if r["policy"] == "drain" else 5000.0
    said = " ".join(conclude.policies(turned))
    assert "report stop took 5.0 ms: 50 times slower than drain's 100 us" in said
    assert all(c["passed"] for c in results["restore"]["checks"])
    failed = copy.deepcopy(results["restore"])
    failed["checks"][0].update(passed=False, checked="failed: boom")
    assert conclude.restore(failed)[0].startswith("7 of 8")
