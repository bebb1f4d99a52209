"""Ring core throughput: pop+push chains per second, Cython core vs pure Python vs plain C.

    .venv/bin/python bench/ring.py [--seconds 0.25]

Configurations: split and packed rings, 1- and 3-descriptor chains (device-readable header
and device-writable data for 3), batches of 1 and 64 chains per pop and per push, EVENT_IDX
negotiated (so every push makes the event-idx decision). The plain C loop
(bench/c_ring_loop.c, compiled here with gcc -O2 and called through ctypes, N chains per
call) does the same reads, checks and writes as the ring core with no Python at all: it is
the practical limit.

How the ring is refilled, identically for all three implementations: every chain popped is
pushed back before the next pop, so a chain's descriptors stay valid and only the driver's
"available" marker has to move on.

* split (size 4096): avail.ring[j] names a fixed head whose chain never changes; when pop
  comes back empty the driver adds 4096 to avail idx (one 16-bit store), once per 4096
  chains.
* packed (size 4096 for 1-descriptor chains, 3072 for 3): descriptors must be rewritten
  each lap because their AVAIL/USED bits flip, so when pop comes back empty the driver
  copies a prepared image of the whole descriptor ring for the next lap (a 64 KiB / 48 KiB
  memcpy: numpy slice assignment from Python, memcpy in C), once per lap.

The refill is thus the same operation, done at the same points, for all three; it costs one
store (split) or about one nanosecond per chain (packed), which is in every figure alike.
Each figure is the best of three timed runs of about ``--seconds`` each.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads would steal a core

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from emu import _ring, pyring  # noqa: E402
from emu.memory import GuestMemory  # noqa: E402
from emu.ringdefs import (  # noqa: E402
    DESC_F_AVAIL,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    F_EVENT_IDX,
    RING_EVENT_FLAGS_DESC,
)

HERE = Path(__file__).resolve().parent
RAM = 0x100000
DESC, DRIVER, DEVICE, BUF = 0x0, 0x10000, 0x20000, 0x40000
FEATURES = 1 << F_EVENT_IDX
SPLIT_SIZE = 4096
DESC_T = struct.Struct("<QIHH")


@dataclass
class Setup:
    """One ring laid out in fresh guest memory, with the driver's refill for it."""

    mem: GuestMemory
    packed: bool
    size: int
    images: list[np.ndarray]  # packed: descriptor ring for lap wrap=False / wrap=True

    def __post_init__(self) -> None:
        self.ram = self.mem.regions[0].array
        self.next_image = 0  # the setup wrote lap True; the next refill writes lap False

    def refill(self) -> None:
        if self.packed:
            self.ram[DESC : DESC + 16 * self.size] = self.images[self.next_image]
            self.next_image ^= 1
        else:
            idx = self.ram[DRIVER + 2 : DRIVER + 4].view(np.uint16)
            idx += SPLIT_SIZE


def chain_bufs(ndesc: int) -> list[tuple[int, int, int]]:
    """(addr, len, flags) of one chain: a readable header, then writable data."""
    if ndesc == 1:
        return [(BUF, 512, DESC_F_WRITE)]
    return [(BUF, 16, 0)] + [(BUF + 0x1000 * k, 512, DESC_F_WRITE) for k in range(1, ndesc)]


def setup(packed: bool, ndesc: int) -> Setup:
    mem = GuestMemory.create(RAM)
    bufs = chain_bufs(ndesc)
    if not packed:
        nchains = SPLIT_SIZE // 4 if ndesc > 1 else SPLIT_SIZE
        for c in range(nchains):
            for k, (addr, length, flags) in enumerate(bufs):
                i = c * ndesc + k
                more = DESC_F_NEXT if k < ndesc - 1 else 0
                mem.write(DESC + 16 * i, DESC_T.pack(addr, length, flags | more, i + 1))
        heads = np.arange(SPLIT_SIZE, dtype=np.uint16) % nchains * ndesc
        mem.write(DRIVER + 4, heads.tobytes())
        mem.write_int(DRIVER + 2, 2, SPLIT_SIZE)
        mem.write_int(DRIVER + 4 + 2 * SPLIT_SIZE, 2, 0)  # used_event
        return Setup(mem, False, SPLIT_SIZE, [])
    size = 4096 if ndesc == 1 else 3072
    images = []
    for wrap in (False, True):
        bits = DESC_F_AVAIL if wrap else DESC_F_USED
        image = bytearray()
        for c in range(size // ndesc):
            for k, (addr, length, flags) in enumerate(bufs):
                more = DESC_F_NEXT if k < ndesc - 1 else 0
                image += DESC_T.pack(addr, length, c, flags | more | bits)
        images.append(np.frombuffer(bytes(image), np.uint8))
    mem.write(DESC, images[1].tobytes())
    mem.write_int(DRIVER, 2, 0)  # driver event: DESC mode, offset 0 of lap 0
    mem.write_int(DRIVER + 2, 2, RING_EVENT_FLAGS_DESC)
    return Setup(mem, True, size, images)


def python_driven(impl: object, s: Setup, batch: int) -> Callable[[int], None]:
    """The device loop the Cython and Python cores run in: pop, push back, refill when dry."""
    cls = impl.PackedRing if s.packed else impl.SplitRing
    ring = cls(s.mem, s.size, DESC, DRIVER, DEVICE, FEATURES)
    pop, push, refill = ring.pop, ring.push, s.refill
    lens = np.full(batch, 512, np.uint32)

    def run(chains: int) -> None:
        done = 0
        while done < chains:
            heads = pop(batch).heads
            k = len(heads)
            if not k:
                refill()
                continue
            push(heads, lens if k == batch else lens[:k])
            done += k

    return run


class BenchRing(ctypes.Structure):
    """struct bench_ring in c_ring_loop.c."""

    _fields_ = [
        ("ram", ctypes.c_void_p),
        ("gpa", ctypes.c_uint64),
        ("ram_size", ctypes.c_uint64),
        ("dirty", ctypes.c_void_p),
        ("desc", ctypes.c_uint64),
        ("driver", ctypes.c_uint64),
        ("device", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("batch", ctypes.c_uint32),
        ("packed", ctypes.c_uint32),
        ("event_idx", ctypes.c_uint32),
        ("image", ctypes.c_void_p * 2),
        ("nd", ctypes.c_void_p),
        ("seq", ctypes.c_void_p),
        ("heads", ctypes.c_void_p),
        ("starts", ctypes.c_void_p),
        ("addr", ctypes.c_void_p),
        ("len", ctypes.c_void_p),
        ("wr", ctypes.c_void_p),
        ("push_len", ctypes.c_void_p),
        ("segcap", ctypes.c_uint64),
        ("nfetched", ctypes.c_uint64),
        ("notifies", ctypes.c_uint64),
        ("next_avail", ctypes.c_uint32),
        ("next_used", ctypes.c_uint32),
        ("signalled_used", ctypes.c_uint32),
        ("avail_wrap", ctypes.c_uint32),
        ("used_wrap", ctypes.c_uint32),
        ("refill_wrap", ctypes.c_uint32),
    ]


def build_c(tmp: Path) -> ctypes.CDLL:
    so = tmp / "c_ring_loop.so"
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(HERE / "c_ring_loop.c")]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    lib.bench_ring_run.argtypes = [ctypes.POINTER(BenchRing), ctypes.c_uint64]
    lib.bench_ring_run.restype = ctypes.c_int64
    lib.bench_ring_check.argtypes = [ctypes.POINTER(BenchRing)]
    return lib


def c_driven(lib: ctypes.CDLL, s: Setup, batch: int) -> Callable[[int], None]:
    region = s.mem.regions[0]
    segcap = 8 * s.size
    keep = {
        "nd": np.zeros(s.size, np.uint32),
        "seq": np.zeros(s.size, np.uint64),
        "heads": np.zeros(s.size, np.uint16),
        "starts": np.zeros(s.size + 1, np.uint32),
        "addr": np.zeros(segcap, np.uint64),
        "len": np.zeros(segcap, np.uint32),
        "wr": np.zeros(segcap, np.uint8),
        "push_len": np.full(batch, 512, np.uint32),
    }
    r = BenchRing(
        ram=region.array.ctypes.data,
        gpa=region.gpa,
        ram_size=region.size,
        dirty=region.dirty.ctypes.data,
        desc=DESC,
        driver=DRIVER,
        device=DEVICE,
        size=s.size,
        batch=batch,
        packed=s.packed,
        event_idx=1,
        segcap=segcap,
        avail_wrap=1,
        used_wrap=1,
        **{k: v.ctypes.data for k, v in keep.items()},
    )
    if s.packed:
        r.image[0], r.image[1] = s.images[0].ctypes.data, s.images[1].ctypes.data
    if not lib.bench_ring_check(ctypes.byref(r)):
        raise RuntimeError("bench ring areas outside RAM")

    def run(chains: int, _keep: dict = keep) -> None:  # _keep: the arrays outlive r
        if lib.bench_ring_run(ctypes.byref(r), chains) < 0:
            raise RuntimeError("C loop met a ring error")

    return run


def measure(run: Callable[[int], None], seconds: float) -> float:
    """Chains per second: calibrate the count, then the best of three timed runs."""
    n = 64
    while True:
        t0 = time.perf_counter()
        run(n)
        t = time.perf_counter() - t0
        if t > seconds / 10:
            break
        n *= 4
    n = max(64, int(n * seconds / t) // 64 * 64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.25, help="length of one timed run")
    args = ap.parse_args()
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_c(Path(tmp))
        for fmt in ("split", "packed"):
            for ndesc in (1, 3):
                for batch in (1, 64):
                    row = {}
                    for name in ("cython", "python", "c"):
                        s = setup(fmt == "packed", ndesc)
                        if name == "c":
                            run = c_driven(lib, s, batch)
                        else:
                            run = python_driven(_ring if name == "cython" else pyring, s, batch)
                        row[name] = measure(run, args.seconds)
                        s.mem.close()
                    results[fmt, ndesc, batch] = row

    print(
        f"{'ring':<7}{'desc':>5}{'batch':>6}{'cython/s':>13}{'python/s':>12}{'C/s':>13}"
        f"{'cy/py':>8}{'C/cy':>7}"
    )
    for (fmt, ndesc, batch), row in results.items():
        print(
            f"{fmt:<7}{ndesc:>5}{batch:>6}{row['cython']:>13,.0f}{row['python']:>12,.0f}"
            f"{row['c']:>13,.0f}{row['cython'] / row['python']:>8.1f}"
            f"{row['c'] / row['cython']:>7.2f}"
        )
    print()
    for (fmt, ndesc, batch), row in results.items():
        for name, value in row.items():
            print(f"ring_{fmt}_{ndesc}desc_batch{batch}_{name} {value:.0f} chains/s")
    head = results["split", 1, 64]
    print(f"ring_cython_over_python {head['cython'] / head['python']:.1f} x")
    print(f"ring_c_over_cython {head['c'] / head['cython']:.2f} x")


if __name__ == "__main__":
    main()
