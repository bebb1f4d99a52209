"""NbdEngine against nbdkit: requests in flight, and the scatter-list choice.

    .venv/bin/python bench/nbd.py [--seconds 2]

* 4 KiB random reads at queue depth 1 and 32 through the engine's async face against
  ``nbdkit --filter=delay memory 64M rdelay=1ms`` (64 server threads, so the server can
  hold 32 at once): IOPS for each, side by side, and ``nbd_engine_qd32_over_qd1``. With a
  1 ms server, QD1 is bounded near 1000 IOPS; QD32 shows how much overlap the engine
  gets (the ideal is 32).
* A guest's 1 MiB write arrives as 256 separate 4 KiB pages. The engine gathers a scatter
  list into one bounce buffer and sends one command; the alternative, one NBD command per
  segment, is measured here as 256 4 KiB writes all in flight at once (no server delay,
  memory plugin): microseconds per 1 MiB for each. The per-segment figure includes 256
  Python ``submit_py`` calls, printed on their own; the ``_min`` ratio leaves all of that
  time out (the server works while they run, so it favours the per-segment way).

The bench drives the engine from Python (``submit_py`` / ``reap_py``, a few microseconds
per request), which the 1 ms server latency dwarfs; the native blk plane calls the same
``cdef`` methods without Python.
"""

from __future__ import annotations

import argparse
import random
import select
import sys
import tempfile
import time
from pathlib import Path

from emu.backends import _nbd
from emu.testing.nbdkit import Nbdkit, nbdkit_missing

OP_READ, OP_WRITE = 0, 1
SIZE = 64 << 20
BLOCK = 4096


def randread_iops(engine: _nbd.NbdEngine, depth: int, seconds: float) -> float:
    """Keeps ``depth`` 4 KiB reads at random offsets in flight for ``seconds``."""
    rng = random.Random(depth)
    bufs = [bytearray(BLOCK) for _ in range(depth)]
    blocks = SIZE // BLOCK

    def submit(tag: int) -> None:
        rc = engine.submit_py(OP_READ, tag, [bufs[tag]], rng.randrange(blocks) * BLOCK)
        if rc:
            raise OSError(-rc, "submit")

    for tag in range(depth):
        submit(tag)
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        select.select([engine.fd], [], [], 5.0)
        now = time.perf_counter()
        for tag, result in engine.reap_py():
            if result != BLOCK:
                raise OSError(-result, "read")
            done += 1
            if now < end:
                submit(tag)
        if now >= end and engine.outstanding == 0:
            break
    return done / (time.perf_counter() - start)


def write_1m_us(engine: _nbd.NbdEngine, one_command: bool, rounds: int) -> tuple[float, float]:
    """Microseconds per 1 MiB written as 256 4 KiB pages (separate buffers), best of
    ``rounds``: the whole write, and the part spent in Python submitting it."""
    pages = [bytearray(BLOCK) for _ in range(256)]
    best = (float("inf"), 0.0)
    for r in range(rounds):
        start = time.perf_counter()
        if one_command:
            rc = engine.submit_py(OP_WRITE, r, pages, 0)
            assert rc == 0, rc
            want = 1
        else:
            for i, page in enumerate(pages):
                rc = engine.submit_py(OP_WRITE, i, [page], i * BLOCK)
                assert rc == 0, rc
            want = 256
        submitted = time.perf_counter()
        got = 0
        while got < want:
            got += len(engine.reap_py(256, True))
        took = (time.perf_counter() - start) * 1e6
        if took < best[0]:
            best = (took, (submitted - start) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per random-read figure")
    args = ap.parse_args()
    if (why := nbdkit_missing()) is not None:
        sys.exit(f"bench/nbd.py: {why}")
    lines: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        delayed = Nbdkit(
            Path(tmp) / "delay.sock", ["memory", "64M"], filters=["delay"], params=["rdelay=1ms"]
        )
        with delayed:
            engine = _nbd.NbdEngine(delayed.uri, depth=32)
            engine.pwritev([bytes(SIZE >> 4)], 0)
            qd1 = randread_iops(engine, 1, args.seconds)
            qd32 = randread_iops(engine, 32, args.seconds)
            engine.close()
        lines += [
            ("nbd_engine_delay1ms_randread_qd1_iops", qd1, "iops"),
            ("nbd_engine_delay1ms_randread_qd32_iops", qd32, "iops"),
            ("nbd_engine_qd32_over_qd1", qd32 / qd1, "x"),
        ]
        with Nbdkit(Path(tmp) / "mem.sock", ["memory", "64M"]) as plain:
            engine = _nbd.NbdEngine(plain.uri, depth=256)
            gathered, _ = write_1m_us(engine, True, 50)
            per_segment, in_python = write_1m_us(engine, False, 50)
            engine.close()
        lines += [
            ("nbd_write_1m_256seg_one_command_us", gathered, "us"),
            ("nbd_write_1m_256seg_command_per_segment_us", per_segment, "us"),
            ("nbd_write_1m_256seg_command_per_segment_python_submit_us", in_python, "us"),
            # without the Python submit time at all: the least per-segment would cost
            (
                "nbd_write_1m_per_segment_over_one_command_min",
                (per_segment - in_python) / gathered,
                "x",
            ),
        ]
    print(f"{'figure':<58}{'value':>12}  unit")
    for name, value, unit in lines:
        print(f"{name:<58}{value:>12.1f}  {unit}")
    print()
    for name, value, unit in lines:
        print(f"{name} {value:.2f} {unit}")


if __name__ == "__main__":
    main()
