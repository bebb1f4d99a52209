"""bench/stop_latency.py --quick end to end (a few seconds): it runs, every request of
every sample comes back exactly once (the bench exits non-zero otherwise), the requests
of an NBD sample really are outstanding at the engine when the clock starts, and the
headline lines are printed.

    .venv/bin/python -m pytest bench/test_stop_latency.py
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu.testing.nbdkit import nbdkit_missing

BENCH = Path(__file__).with_name("stop_latency.py")
HEADLINES = (
    "stop_report_nbd10ms_depth128_p99_us",
    "stop_drain_nbd10ms_depth128_p99_us",
    "stop_report_nbd10ms_depth128_write_p99_us",
    "stop_drain_nbd10ms_depth128_write_p99_us",
    "stop_report_nbd10ms_depth128_write_fence_us",
    "stop_report_depth128_lat10ms_p99_us",
    "stop_drain_depth128_lat10ms_p99_us",
)


@pytest.mark.skipif(nbdkit_missing() is not None, reason=str(nbdkit_missing()))
def test_quick_run():
    root = str(BENCH.parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=root,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    values = {}
    rows = []
    for line in run.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(("stop_", "state_")):
            values[parts[0]] = float(parts[1])
        elif len(parts) == 9 and parts[0] == "nbd10ms" and parts[4] == "128":
            rows.append(parts)
    for name in HEADLINES:
        assert name in values and math.isfinite(values[name]), name
    # the sample's requests were at the server when the stop came (the "at eng" column)
    assert rows and all(float(r[5]) >= 64 for r in rows), rows
