"""Defects the fuzzers found that are not fixed yet, one entry per regression input.

``OPEN["target/file"] = (pattern, reason)``: the regression input fuzz/regressions/target/file
reproduces the defect; tests/test_fuzz.py replays it as xfail(strict=True), so the fix makes
that test fail until its entry here is removed. Meanwhile ``python -m fuzz`` counts failures
whose message matches ``pattern`` as known instead of stopping on them (``--strict`` stops
on everything), so a run can look for new defects.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

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
    # legacy (v1) transport, net device, the driver takes GSO (bit 6, offered only on a
    # legacy transport): save_device records DEV_FEATURES without the legacy bits, so
    # restore_device refuses the device's own snapshot (driver features not a subset)
    "mmio/legacy-net-gso-snapshot": (
        r"emu refused its own snapshot: snapshot's driver features are not a subset",
        "a legacy net device that negotiated GSO saves a snapshot its own restore refuses",
    ),
    # the driver writes DriverFeatures bits the device does not offer and never sets
    # FEATURES_OK; the VMM saves: MmioTransport.save keeps the raw register, and
    # MmioTransport.restore (_saved_registers) refuses it as "not all offered here"
    "mmio/unoffered-driver-features-snapshot": (
        r"emu refused its own snapshot: saved driver features 0x[0-9a-f]+ are not all offered",
        "a snapshot taken while DriverFeatures holds unoffered bits is refused by its restore",
    ),
    # SET_LOG_BASE, then disconnect: Session.close leaves the dirty log mapped (the mmap
    # holds a dup of the frontend's fd); the device's callbacks keep the Session, and so
    # the mapping, alive until the next frontend connects
    "vhost_user/dirty-log-kept-after-close": (
        r"fds leaked: .*\(the dirty log is still mapped after Session.close\)",
        "Session.close does not unmap the dirty log: the frontend's log fd outlives the connection",
    ),
    # SET_MEM_TABLE with a region whose mmap offset is not page aligned (0x123): refused,
    # and its fd is never closed (GuestMemory.add_fd_region raises before its try, and
    # MemoryTable.add only expects OSError/ValueError from it)
    "vhost_user/refused-region-fd-leak": (
        r"fds leaked: .*\(came with (SET_MEM_TABLE|ADD_MEM_REG)\)",
        "each refused memory region (unaligned mmap offset) leaks its fd (issue 8)",
    ),
    # the same with an eventfd as the region's fd (and the unaligned offset)
    "vhost_user/refused-region-fd-leak-eventfd": (
        r"fds leaked: .*\(came with (SET_MEM_TABLE|ADD_MEM_REG)\)",
        "each refused memory region (unaligned mmap offset) leaks its fd (issue 8)",
    ),
    # handcrafted from issue 8's decoder defects (the fuzzer did not build them in 1M runs):
    # a device part of JSON nested 3000 deep, and one holding a 5000-digit integer
    "state/deep-json-nesting": (
        r"RecursionError",
        "JSON nested deeper than the interpreter's recursion limit escapes as RecursionError",
    ),
    "state/long-json-integer": (
        r"ValueError\('Exceeds the limit \(4300 digits\)",
        "a JSON integer over 4300 digits escapes as ValueError",
    ),
}


def patterns(target: str) -> list[re.Pattern[str]]:
    return [re.compile(p) for key, (p, _) in OPEN.items() if key.split("/")[0] == target]


def tolerant(one_input: Callable[[bytes], None], target: str) -> Callable[[bytes], None]:
    """``one_input`` that counts failures of known open defects instead of raising them."""
    known = patterns(target)
    seen: dict[str, int] = {}

    def run(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            match = next((p.pattern for p in known if p.search(text)), None)
            if match is None:
                raise
            if match not in seen:
                print(f"known open defect (fuzz/known.py): {text[:200]}", file=sys.stderr)
            seen[match] = seen.get(match, 0) + 1

    return run
