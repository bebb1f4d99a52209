"""(a) Stop latency by interface against queue depth, and many devices stopped in turn
against all at once.

The thread's question: does a STOP status bit that the driver polls cost more than the
alternatives (an admin command, a VMM-side stop, vhost-user's GET_VRING_BASE), and does
polling many devices one after another stretch a migration's downtime? Every interface
is timed on the same blk device with ``depth`` reads outstanding at an NBD server with
a fixed latency (``Plan.backend``), under each policy it supports (SUSPEND: drain only,
as virtio 1.4 requires). virtio-mmio has no admin virtqueue (virtio 1.4 reserves
ADMIN_VQ for PCI), so the admin command is not measured; its cost would be a request
round trip on top of the same stop.

The many-devices cell: ``n`` blk devices, each with ``depth`` reads outstanding, stopped
with the STOP bit one after another (write, poll until stopped, next) and all at once
(write every device's Status, then poll each until all read stopped).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from emu.debate.measure import Backend, MmioCase, measure, open_backend, pct, wait_in_flight
from emu.progress import steps
from emu.transport import mmio_regs

#: interface -> the policies it can stop under
POLICIES = {
    "stop-bit": ("report", "drain"),
    "suspend": ("drain",),
    "vmm": ("report", "drain"),
    "vhost-user": ("report", "drain"),
}


@dataclass(frozen=True)
class Cell:
    """One measured series point: ``reps`` stops of one kind."""

    backend: str
    op: str
    interface: str
    policy: str
    depth: int
    reps: int

    def label(self) -> str:
        return f"{self.backend} {self.op} {self.interface} {self.policy} depth {self.depth}"


def summary(samples_s: list[float]) -> dict:
    """p50 / p99 / mean / max in microseconds of samples in seconds."""
    us = [x * 1e6 for x in samples_s]
    return dict(
        p50_us=statistics.median(us),
        p99_us=pct(us, 99),
        mean_us=statistics.mean(us),
        max_us=max(us),
        n=len(us),
    )


@contextlib.contextmanager
def _backends() -> Iterator[Callable[[str], Backend]]:
    """``get(name)``: the backend ``name``, kept open until the next name or the end."""
    stack = contextlib.ExitStack()
    current: list = [None, None]

    def get(name: str) -> Backend:
        if current[0] != name:
            stack.close()
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm"))
            current[:] = [name, stack.enter_context(open_backend(name, tmp))]
        return current[1]

    try:
        yield get
    finally:
        stack.close()


def run_cells(cells: list[Cell], label: str) -> list[dict]:
    """Each cell measured (cells of one backend in a row share its server)."""
    rows = []
    with _backends() as backend:
        for c in steps(cells, label, Cell.label):
            samples, held = measure(
                c.interface, c.policy, c.depth, backend(c.backend), c.reps, c.op
            )
            rows.append(dict(asdict(c), at_engine=held, **summary(samples)))
    return rows


@dataclass(frozen=True)
class Plan:
    backend: str
    depths: tuple[int, ...]
    reps: int
    devices: int  # the many-devices cell
    devices_depth: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls("nbd1ms", (0, 16, 64, 128), 10, 4, 32)
        return cls("nbd1ms", (0, 4, 16, 32, 64, 96, 128), 50, 8, 32)


def cells(plan: Plan) -> list[Cell]:
    return [
        Cell(plan.backend, "read", iface, policy, depth, plan.reps)
        for iface, policies in POLICIES.items()
        for policy in policies
        for depth in plan.depths
    ]


def _stopped(tr: object) -> bool:
    return bool(tr.read(mmio_regs.STATUS, 4) & mmio_regs.S_STOP)  # type: ignore[attr-defined]


def _stop_bit(cases: list[MmioCase], together: bool) -> float:
    """Seconds until every device reads STOP, one after another or all at once."""
    t0 = time.perf_counter()
    if together:
        for c in cases:
            c.tr.write(mmio_regs.STATUS, 4, c.tr.read(mmio_regs.STATUS, 4) | mmio_regs.S_STOP)
        for c in cases:
            while not _stopped(c.tr):
                time.sleep(0)
    else:
        for c in cases:
            c.stop("stop-bit")
    return time.perf_counter() - t0


def many_devices(plan: Plan, policy: str, backend: Backend) -> list[dict]:
    """``plan.devices`` devices stopped by the STOP bit in turn and at once."""
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        cases = [MmioCase(tmp, policy, backend) for _ in range(plan.devices)]
        try:
            for together in (False, True):
                samples = []
                for rep in range(plan.reps):
                    starts = [c.dev.queues[0].state().next_used for c in cases]
                    tokens = [c.submit(plan.devices_depth, "read", rep) for c in cases]
                    for c, start in zip(cases, starts, strict=True):
                        wait_in_flight(c, start, plan.devices_depth)
                    samples.append(_stop_bit(cases, together))
                    for c, t in zip(cases, tokens, strict=True):
                        c.resume("stop-bit")
                        c.collect(t)
                rows.append(
                    dict(
                        backend=backend.name,
                        policy=policy,
                        devices=plan.devices,
                        depth=plan.devices_depth,
                        order="all at once" if together else "one after another",
                        **summary(samples),
                    )
                )
        finally:
            for c in cases:
                c.close()
    return rows


def run(quick: bool) -> dict:
    """The rows of (a): ``by_depth`` and ``many_devices``."""
    plan = Plan.make(quick)
    by_depth = run_cells(cells(plan), "(a) stop latency by interface")
    many: list[dict] = []
    with _backends() as backend:
        for policy in steps(["drain", "report"], "(a) many devices"):
            many += many_devices(plan, policy, backend(plan.backend))
    return dict(plan=asdict(plan), by_depth=by_depth, many_devices=many)
