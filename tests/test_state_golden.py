"""Every golden snapshot (tests/golden/<set>/, made by earlier emus) still loads, restores
into a fresh device, and that device completes the requests in flight as it did then.

How the files were made and what they hold: tests/golden_state.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from golden_state import GOLDEN, replay

from emu.devices import registry
from emu.state import file as statefile
from emu.state.parts import to_json

CASES = sorted((d, p.stem) for d in GOLDEN.iterdir() if d.is_dir() for p in d.glob("*.json"))


def test_every_device_type_and_ring_has_golden_files():
    """A device type added to the registry needs golden files too (tests/golden_state.py)."""
    latest = max((d for d, _ in CASES), key=lambda d: d.name)
    cases = {case for d, case in CASES if d == latest}
    kinds = [t.name for t in registry.types()]
    assert cases == {f"{k}-{r}" for k in kinds for r in ("split", "packed")}


@pytest.mark.parametrize("case_dir, case", CASES, ids=[f"{d.name}/{c}" for d, c in CASES])
def test_golden_state_loads_and_requests_complete(tmp_path: Path, case_dir: Path, case: str):
    meta = json.loads((case_dir / f"{case}.json").read_text())
    state = statefile.load(case_dir / f"{case}.state")
    shown = to_json(state)
    assert not any(p.get("skipped") for p in shown["parts"]), "a part of a golden file was skipped"
    expect = meta["expect"]
    counts = {i: len(used) for i, used in expect["used"].items()}
    got = replay(case_dir, case, tmp_path, counts)
    in_flight = sum(len(q["inflight"]) for q in meta["queues"].values())
    assert in_flight and sum(counts.values()), "a golden case without requests in flight"
    for i, used in expect["used"].items():
        assert sorted(map(tuple, got["used"][i])) == sorted(map(tuple, used)), f"queue {i}"
    assert got["backend"] == expect["backend"]
