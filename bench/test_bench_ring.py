"""Ring core pop+push round (split ring, 1-descriptor chains, batch 64): Cython vs Python.

    .venv/bin/python -m pytest bench/test_bench_ring.py --benchmark-enable

One round pops 64 chains and pushes them back; the ring is set up and refilled exactly as in
bench/ring.py (see its docstring), which also compares against a plain C loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ring as ringbench  # noqa: E402

from emu import _ring, pyring  # noqa: E402


@pytest.mark.parametrize("impl", [_ring, pyring], ids=["cython", "python"])
def test_split_1desc_batch64(benchmark, impl):
    s = ringbench.setup(packed=False, ndesc=1)
    run = ringbench.python_driven(impl, s, 64)
    benchmark.group = "ring split 1-desc batch 64 (64 chains per round)"
    benchmark(run, 64)
    s.mem.close()


@pytest.mark.parametrize("impl", [_ring, pyring], ids=["cython", "python"])
def test_packed_3desc_batch64(benchmark, impl):
    s = ringbench.setup(packed=True, ndesc=3)
    run = ringbench.python_driven(impl, s, 64)
    benchmark.group = "ring packed 3-desc batch 64 (64 chains per round)"
    benchmark(run, 64)
    s.mem.close()
