"""What device tests share: ring formats x notification x indirect, the two ring cores,
the two blk data planes, and waiting for a condition another thread brings about."""

import time
from collections.abc import Callable

import pytest

from emu.queue import _cring

try:
    from emu.devices import _blkplane as blk_native
except ImportError:
    blk_native = None

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


BLK_PLANES = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(blk_native is None, reason="emu.devices._blkplane is not built"),
    ),
]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.001)
