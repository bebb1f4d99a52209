"""Parametrizations every device test shares: ring formats x notification x indirect, and
the two ring cores."""

import pytest

from emu.queue import _cring

RING_MODES = [
    pytest.param(dict(packed=p, event_idx=e, indirect=i), id=f"{n}-{en}-{iname}")
    for p, n in ((False, "split"), (True, "packed"))
    for e, en in ((True, "evidx"), (False, "noevidx"))
    for i, iname in ((True, "indirect"), (False, "direct"))
]
RING_CORES = [
    "python",
    pytest.param(
        "cython", marks=pytest.mark.skipif(_cring is None, reason="emu._ring is not built")
    ),
]
