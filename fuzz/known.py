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

#: every defect found so far is fixed; fuzz/README.md lists them with their fixes
OPEN: dict[str, tuple[str, str]] = {}


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
