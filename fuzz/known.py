"""Defects the fuzzers found that are not fixed yet, one entry per regression input.

``OPEN["target/file"] = (pattern, reason)``: the regression input fuzz/regressions/target/file
reproduces the defect; tests/test_fuzz.py replays it as xfail(strict=True), so the fix makes
that test fail until its entry here is removed. Meanwhile ``python -m fuzz`` counts failures
whose message matches ``pattern`` as known instead of stopping on them (``--strict`` stops
on everything), so a run can look for new defects.
"""

from __future__ import annotations

import re

_REGS = (
    "virtio-mmio restore accepts transport registers of the wrong type from a state's "
    "TRANSPORT part (issue 8, snapshot semantics)"
)
OPEN: dict[str, tuple[str, str]] = {
    # JSON's Infinity as driver_features: TypeError out of MmioTransport.restore
    "state/driver-features-infinity": (r"virtio-mmio restore: TypeError", _REGS),
    # null as queue_align: TypeError out of MmioTransport.restore
    "state/queue-align-null": (r"virtio-mmio restore: TypeError", _REGS),
    # "x" as interrupt_status: restored, then an InterruptStatus read raises TypeError
    "state/interrupt-status-string": (r"register read after restore: TypeError", _REGS),
}


def patterns(target: str) -> list[re.Pattern[str]]:
    return [re.compile(p) for key, (p, _) in OPEN.items() if key.split("/")[0] == target]
