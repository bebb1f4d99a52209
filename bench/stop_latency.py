"""Stop latency: from the stop request to "stopped", per interface, policy, depth, backend.

Interfaces: the STOP status bit (driver writes Status, polls until STOP reads back set),
virtio 1.4 SUSPEND (drain only, as the spec requires; polls until SUSPEND=1, DRIVER_OK=0),
the VMM-side stop (``MmioTransport.vmm_stop``) and vhost-user GET_VRING_BASE (emu's Python
frontend against emu's backend: SET_VRING_ENABLE 0 + GET_VRING_BASE round trip).

Backends:

* ``model``: the delay model (emu.testing.delay) over a tmpfs file: requests run at once
  and their used entries are published ``lat`` later; nothing is outstanding anywhere, a
  report stop withdraws what is not published, a drain stop waits for it. Kept beside
  the real backends so old and new figures sit side by side.
* ``tmpfs``: the native plane on io_uring over a file in /dev/shm (requests complete as
  they are submitted: there is hardly ever anything outstanding).
* ``disk``: the same on a disk-backed file (the filesystem is printed); reads are made
  cold (fdatasync + POSIX_FADV_DONTNEED) before each sample so they go to the disk;
  writes land in the page cache.
* ``nbd0ms`` / ``nbd1ms`` / ``nbd10ms``: the native plane on libnbd against nbdkit's
  memory plugin, with the delay filter (rdelay = wdelay) for 1 and 10 ms.

The cells behind the headline p99s (nbd10ms, VMM stop, depth 128) take HEADLINE_REPS
samples (the ``n`` column), so their p99 is not just the largest of 25.

Each sample: ``depth`` 4 KiB reads (or writes) at distinct offsets are made available;
the bench waits until each one is published or held by the queue's deferred (for a
real backend: outstanding at the engine, or answered and not yet published; the ``at
eng`` column is the mean number at the engine when the clock starts). Then the clock
starts, the stop is requested, and it stops when the stop is visible to the requester.
The device is resumed and every request is collected, each exactly once with status OK,
before the next sample (anything else is a defect and ends the run).

Polls sleep(0) between register reads, which releases the GIL, as a vCPU thread would be
outside the interpreter while the guest runs. Save/restore time per device type is the
VMM-side path: ``transport.save()`` + encode, then decode + ``restore`` on a fresh
transport and device.

Prints a table, ``name value unit`` lines, and the headline lines last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from emu.backends.cable import Cable
from emu.backends.chardev import BufferChar
from emu.debate.measure import (
    QUEUE,
    disk_dir,
    fs_type,
    measure,
    open_backend,
    pct,
    time_save_restore,
)
from emu.debate.measure import make_disk as _disk
from emu.devices.blk import BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.testing.blk import BlkDriver
from emu.testing.console import GuestConsole
from emu.testing.driver import VirtioMmioDriver
from emu.testing.nbdkit import nbdkit_missing
from emu.testing.net import GuestNet
from emu.testing.rng import RngDriver
from emu.transport.mmio import MmioTransport

DEPTHS = (0, 16, 128)
LATENCIES = (0.0, 0.001, 0.01)
NBD_LATENCIES = {"nbd0ms": 0, "nbd1ms": 1, "nbd10ms": 10}
#: samples of the cells behind the headline p99s (nbd10ms, VMM stop, the deepest depth):
#: the p99 of --reps 25 samples is their maximum, one slow sample in a hundred decides it
HEADLINE_REPS = 200


def _key(iface: str) -> str:
    return iface.replace("-", "_")


# -- save / restore per device type --


def _setup_blk(tmp: str, mem: GuestMemory) -> tuple[MmioTransport, Callable[[], object]]:
    path = _disk(tmp)
    tr = MmioTransport(BlkDevice(path), mem)
    BlkDriver.open(VirtioMmioDriver(tr, mem), queue_size=QUEUE).write(0, b"x" * 4096)
    return tr, lambda: BlkDevice(path)


def _setup_net(tmp: str, mem: GuestMemory) -> tuple[MmioTransport, Callable[[], object]]:
    a, _ = Cable.pair()
    tr = MmioTransport(NetDevice(a), mem)
    GuestNet(VirtioMmioDriver(tr, mem), queue_size=QUEUE)
    return tr, lambda: NetDevice(Cable.pair()[0])


def _setup_console(tmp: str, mem: GuestMemory) -> tuple[MmioTransport, Callable[[], object]]:
    tr = MmioTransport(ConsoleDevice(BufferChar()), mem)
    GuestConsole(VirtioMmioDriver(tr, mem), queue_size=QUEUE)
    return tr, lambda: ConsoleDevice(BufferChar())


def _setup_rng(tmp: str, mem: GuestMemory) -> tuple[MmioTransport, Callable[[], object]]:
    tr = MmioTransport(RngDevice(), mem)
    RngDriver.open(VirtioMmioDriver(tr, mem), queue_size=QUEUE).read(16)
    return tr, RngDevice


SETUPS = {"blk": _setup_blk, "net": _setup_net, "console": _setup_console, "rng": _setup_rng}


def save_restore(kind: str, reps: int) -> tuple[list[float], list[float], int]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        mem = GuestMemory.create(64 << 20)
        tr, fresh = SETUPS[kind](tmp, mem)
        tr.vmm_stop()
        try:
            return time_save_restore(tr, fresh, mem, reps)
        finally:
            tr.device.close()
            mem.close()


@dataclass
class Plan:
    """Which cells run: full, or ``--quick`` (a few reps, fewer cells)."""

    reps: int
    headline_reps: int  # the cells behind the headline p99s (HEADLINE_REPS)
    depths: tuple[int, ...]
    model_lats: tuple[float, ...]
    model_ifaces: tuple[str, ...]
    real_ifaces: tuple[str, ...]
    backends: tuple[str, ...]

    @classmethod
    def make(cls, quick: bool, reps: int) -> Plan:
        if quick:
            return cls(
                5,
                5,
                (0, 128),
                (0.01,),
                ("vmm", "vhost-user"),
                ("vmm", "vhost-user"),
                ("tmpfs", "nbd10ms"),
            )
        real = ["tmpfs"] + (["disk"] if disk_dir() else []) + list(NBD_LATENCIES)
        return cls(
            reps,
            max(reps, HEADLINE_REPS),
            DEPTHS,
            LATENCIES,
            ("stop-bit", "suspend", "vmm", "vhost-user"),
            ("stop-bit", "vmm", "vhost-user"),
            tuple(real),
        )


HEADER = (
    f"{'backend':<10}{'op':<6}{'interface':<11}{'policy':<8}{'depth':>6}{'at eng':>7}"
    f"{'n':>5}{'p50 us':>10}{'p99 us':>10}{'max us':>10}"
)


class Results:
    """The table rows as they come, and the ``name value unit`` lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.headlines: list[str] = []
        #: (backend, op, iface, policy, depth) -> (p50, p99) in us
        self.cells: dict[tuple[str, str, str, str, int], tuple[float, float]] = {}

    def add(
        self,
        label: str,
        op: str,
        iface: str,
        policy: str,
        depth: int,
        samples: list[float],
        held: float,
        key: str,
    ) -> None:
        s = [x * 1e6 for x in samples]
        p50, p99, mx = statistics.median(s), pct(s, 99), max(s)
        shown = op if depth else "-"
        print(
            f"{label:<10}{shown:<6}{iface:<11}{policy:<8}{depth:>6}{held:>7.1f}{len(s):>5}"
            f"{p50:>10.1f}{p99:>10.1f}{mx:>10.1f}",
            flush=True,
        )
        self.cells[label, op, iface, policy, depth] = (p50, p99)
        self.lines += [
            f"{key}_p50_us {p50:.1f} us",
            f"{key}_p99_us {p99:.1f} us",
            f"{key}_max_us {mx:.1f} us",
        ]


def run_model(plan: Plan, res: Results) -> None:
    """The delay-model rows (as this bench printed them before real backends)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        for lat in plan.model_lats:
            lat_name = f"{lat * 1000:g}ms"
            with open_backend("model", tmp, lat) as be:
                for iface in plan.model_ifaces:
                    for policy in ("drain", "report"):
                        if iface == "suspend" and policy == "report":
                            continue  # virtio 1.4 SUSPEND always drains
                        for depth in plan.depths:
                            samples, held = measure(iface, policy, depth, be, plan.reps)
                            key = f"stop_{_key(iface)}_{policy}_depth{depth}_lat{lat_name}"
                            res.add(
                                f"model{lat_name}", "read", iface, policy, depth, samples, held, key
                            )
                            if iface == "vmm" and depth == 128 and lat == 0.01:
                                p99 = res.cells[f"model{lat_name}", "read", iface, policy, depth][1]
                                res.headlines.append(
                                    f"stop_{policy}_depth128_lat10ms_p99_us {p99:.1f} us"
                                )


def run_real(plan: Plan, res: Results) -> None:
    """io_uring and NBD rows: reads and writes, both policies, every interface."""
    deepest = max(plan.depths)
    for name in plan.backends:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp, open_backend(name, tmp) as be:
            for op in ("read", "write"):
                for iface in plan.real_ifaces:
                    for policy in ("drain", "report"):
                        for depth in plan.depths:
                            if depth == 0 and op == "write":
                                continue  # nothing outstanding: the op makes no difference
                            headline = (name, iface, depth) == ("nbd10ms", "vmm", deepest)
                            reps = plan.headline_reps if headline else plan.reps
                            samples, held = measure(iface, policy, depth, be, reps, op)
                            key = f"stop_{_key(iface)}_{policy}_{name}_{op}_depth{depth}"
                            res.add(name, op, iface, policy, depth, samples, held, key)


def summarise(plan: Plan, res: Results) -> None:
    """Per backend at the deepest depth (VMM stop): p99 of reads and writes per policy, and
    the write fence: a report stop's p50 with writes outstanding minus with reads."""
    depth = max(plan.depths)
    for name in plan.backends:
        for iface, tag in (("vmm", ""), ("vhost-user", "_vhost_user")):
            for policy in ("report", "drain"):
                for op, suffix in (("read", ""), ("write", "_write")):
                    if (c := res.cells.get((name, op, iface, policy, depth))) is not None:
                        line = (
                            f"stop_{policy}_{name}_depth{depth}{suffix}{tag}_p99_us {c[1]:.1f} us"
                        )
                        (res.headlines if name == "nbd10ms" and not tag else res.lines).append(line)
            r = res.cells.get((name, "read", iface, "report", depth))
            w = res.cells.get((name, "write", iface, "report", depth))
            if r is not None and w is not None:
                line = f"stop_report_{name}_depth{depth}_write_fence{tag}_us {w[0] - r[0]:.1f} us"
                (res.headlines if name == "nbd10ms" and not tag else res.lines).append(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=25, help="samples per cell")
    ap.add_argument("--quick", action="store_true", help="a few samples, fewer cells")
    args = ap.parse_args()
    if (why := nbdkit_missing()) is not None:
        raise SystemExit(f"stop_latency: {why}")
    plan = Plan.make(args.quick, args.reps)
    where = disk_dir()
    if "disk" in plan.backends and where is not None:
        print(f"disk: a file in {where} ({fs_type(where)}), reads made cold before each sample")
    res = Results()
    print(HEADER)
    run_model(plan, res)
    run_real(plan, res)
    summarise(plan, res)

    print()
    print(f"{'device':<9}{'save us':>10}{'restore us':>12}{'bytes':>8}")
    for kind in SETUPS:
        saves, restores, size = save_restore(kind, max(plan.reps, 20))
        s, r = statistics.median(saves) * 1e6, statistics.median(restores) * 1e6
        print(f"{kind:<9}{s:>10.1f}{r:>12.1f}{size:>8}")
        res.lines += [
            f"state_save_{kind}_us {s:.1f} us",
            f"state_restore_{kind}_us {r:.1f} us",
            f"state_bytes_{kind} {size} bytes",
        ]
        if kind == "blk":
            res.headlines.append(f"state_save_restore_blk_us {s + r:.1f} us")
    print()
    for line in res.lines + res.headlines:
        print(line)


if __name__ == "__main__":
    main()
