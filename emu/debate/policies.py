"""(b) Drain against report as the backend's latency grows, reads and writes apart.

The thread's question: must a device finish its in-flight requests before it says
"stopped" (drain; what virtio 1.4 SUSPEND does), or may it stop at once and report them
(the STOP bit's idea)? Measured on real backends: io_uring on a file in /dev/shm
(``tmpfs``, latency ~0; the full run adds a disk-backed file with reads made cold,
``disk``) and NBD on nbdkit with its delay filter at each latency of
``Plan.latencies_ms``. ``depth`` requests are outstanding at the backend when the stop
comes. Interfaces: the VMM-side stop (what a migration uses) and, in the full run,
vhost-user GET_VRING_BASE.

The write fence: a report stop cannot recall a write already handed to the backend (it
must not land after the destination resubmitted it), so it waits for it. Its cost is a
report stop's median with writes outstanding minus the same with reads outstanding.

The downtime figures are a MODEL, not a migration: the device's share of a stop-and-copy
downtime = the measured stop (p50) + the measured save of the stopped device + the
measured restore into a fresh one (blk, ``save_restore``). The RAM's final pass and the
VMM's own work are not in it (they do not depend on the policy).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass

from emu.debate.measure import QUEUE, disk_dir, make_disk, time_save_restore
from emu.debate.stops import Cell, run_cells
from emu.devices.blk import BlkDevice
from emu.memory import GuestMemory
from emu.testing.blk import BlkDriver
from emu.testing.driver import VirtioMmioDriver
from emu.transport.mmio import MmioTransport


@dataclass(frozen=True)
class Plan:
    latencies_ms: tuple[float, ...]
    depth: int
    reps: int
    interfaces: tuple[str, ...]
    files: tuple[str, ...]  # io_uring backends beside tmpfs ("disk": cold reads from a disk)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls((0, 1, 2, 5, 10), 128, 10, ("vmm", "vhost-user"), ())
        files = ("disk",) if disk_dir() else ()
        return cls((0, 1, 2, 3, 5, 7, 10), 128, 50, ("vmm", "vhost-user"), files)

    def backends(self) -> list[tuple[str, float]]:
        """(backend name, its added latency in ms): io_uring files (none added: the
        disk's own), then NBD at each latency."""
        files = [("tmpfs", 0.0)] + [(name, 0.0) for name in self.files]
        return files + [(f"nbd{ms:g}ms", float(ms)) for ms in self.latencies_ms]


def cells(plan: Plan) -> list[Cell]:
    return [
        Cell(name, op, iface, policy, plan.depth, plan.reps)
        for name, _ in plan.backends()
        for iface in plan.interfaces
        for op in ("read", "write")
        for policy in ("drain", "report")
    ]


def save_restore(reps: int) -> dict:
    """Median seconds of saving a stopped blk device (``save`` + encode) and restoring it
    (decode + ``restore`` on a fresh transport and device), and the state's bytes."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = make_disk(tmp)
        mem = GuestMemory.create(16 << 20)
        tr = MmioTransport(BlkDevice(path), mem)
        try:
            BlkDriver.open(VirtioMmioDriver(tr, mem), queue_size=QUEUE).write(0, b"x" * 4096)
            tr.vmm_stop()
            saves, restores, size = time_save_restore(tr, lambda: BlkDevice(path), mem, reps)
        finally:
            tr.device.close()
            mem.close()
    return dict(
        save_us=statistics.median(saves) * 1e6,
        restore_us=statistics.median(restores) * 1e6,
        bytes=size,
    )


def derive(plan: Plan, rows: list[dict], state: dict) -> tuple[list[dict], list[dict]]:
    """The write fence and the downtime model per backend and interface."""
    cell = {(r["backend"], r["interface"], r["op"], r["policy"]): r for r in rows}
    fences, downtime = [], []
    fixed = state["save_us"] + state["restore_us"]
    for name, ms in plan.backends():
        for iface in plan.interfaces:
            read, write = (cell[name, iface, op, "report"]["p50_us"] for op in ("read", "write"))
            fences.append(
                dict(
                    backend=name,
                    latency_ms=ms,
                    interface=iface,
                    report_read_p50_us=read,
                    report_write_p50_us=write,
                    fence_us=write - read,
                )
            )
            for op in ("read", "write"):
                stops = {p: cell[name, iface, op, p]["p50_us"] for p in ("drain", "report")}
                downtime.append(
                    dict(
                        backend=name,
                        latency_ms=ms,
                        interface=iface,
                        op=op,
                        drain_us=stops["drain"] + fixed,
                        report_us=stops["report"] + fixed,
                        saved_us=stops["drain"] - stops["report"],
                    )
                )
    return fences, downtime


def run(quick: bool) -> dict:
    plan = Plan.make(quick)
    rows = run_cells(cells(plan), "(b) drain vs report")
    latency = {name: ms for name, ms in plan.backends()}
    for r in rows:
        r["latency_ms"] = latency[r["backend"]]
    state = save_restore(5 if quick else 50)
    fences, downtime = derive(plan, rows, state)
    return dict(plan=asdict(plan), stops=rows, state_cost=state, fence=fences, downtime=downtime)
