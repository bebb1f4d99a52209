"""(d) Cross-implementation restore: a state saved by one implementation, restored by
another, and the guest's requests carried on exactly once.

The thread's question: can a state move between implementations (Jason: migration
compatibility is what makes a standard device), or only within one? Each check stops a
blk device with requests in flight (``report``: executed, their used entries held back,
so they are in flight at the stop) or drained (``drain``), saves it, restores it into a
device of the other kind, and checks what the guest sees: every request completes once
with status OK, reads return what was written, the disk holds the writes, and a new
request goes through afterwards.

The pairs:

* ring core: the native one (``emu._ring``, Cython) and the pure-Python one
  (``emu.pyring``), both ways, split and packed rings;
* policy: saved under drain and restored into a device that stops under report (then
  stopped with requests in flight and restored again), and the other way round;
* transport: saved by emu's in-process virtio-mmio transport, restored behind emu's
  vhost-user backend over the same guest RAM (a file both map), the driver's rings
  carried over as a guest's RAM carries them.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emu.devices.blk import S_OK, SECTOR, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.progress import steps
from emu.queue import ring_module
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, RingState
from emu.state import parts
from emu.state.format import DeviceState, StateError, decode, encode
from emu.testing.blk import BlkDriver, status_of
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.driver_queue import DriverQueue
from emu.testing.guest_alloc import GuestAllocator
from emu.testing.vhost_user import VhostUserDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.frontend import FrontendError
from emu.vhost_user.protocol import Req
from emu.vhost_user.snapshot import StateTransferError
from emu.vhost_user.vring import encode_base

RAM = 16 << 20
DISK = 1 << 20
BLOCK = 4096
#: writes and reads in flight at each stop
WRITES, READS = 6, 4
#: report: completions never come before the stop; drain: the stop waits this long
HOLD, SHORT = 3600.0, 0.02


def block(tag: int, i: int) -> bytes:
    return hashlib.sha256(b"%d/%d" % (tag, i)).digest() * (BLOCK // 32)


class CheckFailed(Exception):
    """What the guest saw was not what it asked for."""


@dataclass
class Guest:
    """The guest side of one blk disk: RAM (a file, so a vhost-user backend can map it),
    the disk image, what the disk must hold, and the requests it waits for."""

    tmp: Path
    packed: bool
    ram: str = ""
    mem: GuestMemory = field(init=False)
    disk: Path = field(init=False)
    model: bytearray = field(default_factory=lambda: bytearray(DISK))
    expected: dict[int, bytes | None] = field(default_factory=dict)  # token -> read data
    cycle: int = 0

    def __post_init__(self) -> None:
        self.ram = str(self.tmp / "ram")
        self.mem = GuestMemory.create(RAM, backing=self.ram)
        self.disk = self.tmp / "disk.img"
        self.disk.write_bytes(bytes(DISK))

    def submit(self, blk: BlkDriver) -> None:
        """WRITES writes of fresh data and READS reads of what the last cycle wrote (the
        first cycle: of zeros), all outstanding, none on the same blocks."""
        for i in range(READS):
            at = (8 * self.cycle + i) * BLOCK
            want = bytes(self.model[at : at + BLOCK])
            self.expected[blk.submit(T_IN, at // SECTOR, in_size=BLOCK)] = want
        for i in range(WRITES):
            at = (8 * (self.cycle + 1) + i) * BLOCK
            data = block(self.cycle, i)
            self.expected[blk.submit(T_OUT, at // SECTOR, data)] = None
            self.model[at : at + BLOCK] = data
        self.cycle += 1

    def verify(self, blk: BlkDriver) -> str:
        """Every outstanding request once, OK, reads right; one more write and read; the
        disk as the guest wrote it. What was checked, in words."""
        done = blk.drv.wait(0, len(self.expected), timeout=20)
        tokens = sorted(c.token for c in done)
        if tokens != sorted(self.expected):
            raise CheckFailed(f"completions {tokens} are not the requests {sorted(self.expected)}")
        for c in done:
            if status_of(c) != S_OK:
                raise CheckFailed(f"request {c.token} completed with status {status_of(c)}")
            want = self.expected[c.token]
            if want is not None and c.data[:-1] != want:
                raise CheckFailed(f"read {c.token} returned other data than was written")
        n = len(done)
        self.expected.clear()
        at = (DISK - BLOCK) // SECTOR
        if blk.write(at, block(99, self.cycle)) != S_OK or blk.read(at, 8) != block(99, self.cycle):
            raise CheckFailed("a new request after the restore failed")
        self.model[DISK - BLOCK :] = block(99, self.cycle)
        if blk.drv.queues[0].poll():
            raise CheckFailed("a request completed twice")
        if self.disk.read_bytes() != bytes(self.model):
            raise CheckFailed("the disk does not hold what the guest wrote")
        return f"{n} requests completed once, OK, reads right; a new request; disk as written"

    def close(self) -> None:
        self.mem.close()


def native() -> str:
    """The ring core emu runs by default: the native one where it is built."""
    return "cython" if ring_module().__name__ == "emu._ring" else "python"


def _device(g: Guest, core: str, policy: str) -> BlkDevice:
    dev = BlkDevice(g.disk)
    dev.policy = policy
    for q in dev.queues:
        q.impl = core
    return dev


def _stop_with_requests(
    g: Guest, dev: BlkDevice, tr: MmioTransport, blk: BlkDriver, policy: str
) -> DeviceState:
    """Requests outstanding (held back), the stop under ``policy``, the saved state."""
    q = dev.queues[0]
    hold_completions(q, HOLD if policy == "report" else SHORT)
    g.submit(blk)
    deadline = time.monotonic() + 10
    while q.held() < WRITES + READS:  # executed, none published
        if time.monotonic() > deadline:
            raise CheckFailed("the device did not take the requests")
        time.sleep(0.001)
    tr.vmm_stop(policy)
    in_flight = len(q.inflight())
    if in_flight != (WRITES + READS if policy == "report" else 0):
        raise CheckFailed(f"{in_flight} requests in flight after a {policy} stop")
    return tr.save()


def _restore_mmio(
    g: Guest, drv: VirtioMmioDriver, state: DeviceState, core: str, policy: str
) -> tuple[BlkDevice, MmioTransport, BlkDriver]:
    """A fresh device (``core``, ``policy``) over the same RAM takes the state; the
    driver carries on (its state kept as guest RAM keeps it)."""
    saved = drv.save()
    drv.transport.device.close()
    dev = _device(g, core, policy)
    tr = MmioTransport(dev, g.mem)
    drv2 = VirtioMmioDriver.load(tr, g.mem, saved)
    tr.restore(decode(encode(state)))
    return dev, tr, BlkDriver(drv2)


def _start(g: Guest, core: str, policy: str, features: int | None = None):
    dev = _device(g, core, policy)
    tr = MmioTransport(dev, g.mem)
    drv = VirtioMmioDriver(tr, g.mem)
    blk = BlkDriver.open(drv, features, packed=g.packed, queue_size=64)
    return dev, tr, blk


def check_ring_cores(g: Guest, first: str, second: str) -> str:
    """Saved with ``first``'s ring core (report, requests in flight), restored into
    ``second``'s, then back."""
    dev, tr, blk = _start(g, first, "report")
    details = []
    for src, dst in ((first, second), (second, first)):
        state = _stop_with_requests(g, dev, tr, blk, "report")
        dev, tr, blk = _restore_mmio(g, blk.drv, state, dst, "report")
        hold_completions(dev.queues[0], 0.0)
        details.append(f"{src} -> {dst}: {g.verify(blk)}")
        module = type(dev.queues[0].ring).__module__
        if module != ring_module(dst).__name__:
            raise CheckFailed(f"the restored ring runs on {module}, not {dst}")
    dev.close()
    return "; ".join(details)


def check_policies(g: Guest, saved_under: str, restored_under: str) -> str:
    """Saved under ``saved_under``, restored into a device stopping under
    ``restored_under``, which is then stopped with requests in flight and restored once
    more."""
    core = native()
    dev, tr, blk = _start(g, core, saved_under)
    state = _stop_with_requests(g, dev, tr, blk, saved_under)
    dev, tr, blk = _restore_mmio(g, blk.drv, state, core, restored_under)
    hold_completions(dev.queues[0], 0.0)
    first = g.verify(blk)
    state = _stop_with_requests(g, dev, tr, blk, restored_under)
    dev, tr, blk = _restore_mmio(g, blk.drv, state, core, restored_under)
    hold_completions(dev.queues[0], 0.0)
    second = g.verify(blk)
    dev.close()
    return f"after the {saved_under} state: {first}; after a {restored_under} stop: {second}"


def _vhost_offered(path: str) -> int:
    """The features a vhost-user backend offers (a probe connection)."""
    fe = VhostUserDriver(path, RAM)
    try:
        return fe.get_u64(Req.GET_FEATURES)
    finally:
        fe.close()


def check_mmio_to_vhost_user(g: Guest, notes: list[str]) -> str:
    """Saved by the in-process virtio-mmio transport (report, requests in flight),
    restored behind emu's vhost-user backend in this process over the same RAM file."""
    dst = _device(g, native(), "report")
    server = VhostUserServer(dst, g.tmp / "blk.sock").start()
    fe: VhostUserDriver | None = None
    try:
        # the source offers what both transports offer, as a management layer would set
        # it up for a migration between them (virtio-mmio adds its own transport bits)
        dev, tr, blk = _start(g, native(), "report", _vhost_offered(str(server.path)))
        state = _stop_with_requests(g, dev, tr, blk, "report")
        saved_driver = blk.drv.save()
        dev.close()
        acked = next(v for p, v in parts.parse(state) if p.type == parts.DRV_FEATURES)
        fe = VhostUserDriver(server.path, RAM, ram=g.ram)
        fe.init(
            acked,
            packed=g.packed,
            event_idx=bool(acked >> F_EVENT_IDX & 1),
            indirect=bool(acked >> F_INDIRECT_DESC & 1),
        )
        if fe.features != acked:
            raise CheckFailed(f"vhost-user negotiated {fe.features:#x}, the state {acked:#x}")
        fe.load_state(encode(state))
        notes.append(
            "the state loaded over vhost-user as saved; its TRANSPORT part (virtio-mmio "
            "registers) is another transport's and was skipped"
        )
        ring = next(v for p, v in parts.parse(state) if p.type == parts.RING_STATE)
        _carry_rings(fe, saved_driver)
        fe.restart_ring(0, encode_base(_ring_state(ring), g.packed))
        return "CHECK_DEVICE_STATE accepted; ring restarted at the saved base; " + g.verify(
            BlkDriver(fe)
        )
    except (FrontendError, StateTransferError, StateError) as e:
        raise CheckFailed(str(e)) from e
    finally:
        if fe is not None:
            fe.close()
        server.close()
        dst.close()


def _ring_state(ring: dict) -> RingState:
    return RingState(
        ring["next_avail"],
        ring["next_used"],
        ring["avail_wrap"],
        ring["used_wrap"],
        ring["signalled_used"],
        [],
    )


def _carry_rings(fe: VhostUserDriver, saved: dict) -> None:
    """The driver's rings, as the mmio driver left them in guest RAM, handed to the
    vhost-user frontend (which then shares the same RAM with the backend)."""
    start, end, nxt = saved["alloc"]
    fe.alloc = GuestAllocator(fe.mem, start, end)
    fe.alloc.next = nxt
    for fields in saved["queues"].values():
        q = DriverQueue.__new__(DriverQueue)
        vars(q).update(fields, mem=fe.mem, alloc=fe.alloc)
        fe.setup_vring(q)


@dataclass(frozen=True)
class Check:
    name: str
    ring: str  # split / packed
    kind: str  # ring core / policy / transport
    saved: str = ""  # policy: the one the state was saved under ...
    restored: str = ""  # ... and the one of the device that takes it


def checks() -> list[Check]:
    out = []
    for ring in ("split", "packed"):
        out += [
            Check("native ring core -> Python ring core -> native", ring, "ring core"),
            Check("saved under drain -> restored under report", ring, "policy", "drain", "report"),
            Check("saved under report -> restored under drain", ring, "policy", "report", "drain"),
            Check("in-process virtio-mmio -> vhost-user backend", ring, "transport"),
        ]
    return out


def _run_one(c: Check, tmp: Path) -> tuple[str, list[str]]:
    g = Guest(tmp, c.ring == "packed")
    notes: list[str] = []
    try:
        if c.kind == "ring core":
            if native() != "cython":
                raise CheckFailed("emu._ring is not built: no native ring core to compare")
            return check_ring_cores(g, "cython", "python"), notes
        if c.kind == "policy":
            return check_policies(g, c.saved, c.restored), notes
        return check_mmio_to_vhost_user(g, notes), notes
    finally:
        g.close()


def run(quick: bool) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        label = "(d) cross-implementation restore"
        for i, c in enumerate(steps(checks(), label, lambda c: f"{c.name} ({c.ring})")):
            where = Path(tmp) / str(i)
            where.mkdir()
            try:
                passed, (checked, notes) = True, _run_one(c, where)
            except (CheckFailed, StateError, TimeoutError, RuntimeError) as e:
                passed, checked, notes = False, f"failed: {e}", []
            rows.append(
                dict(
                    check=c.name,
                    ring=c.ring,
                    kind=c.kind,
                    passed=passed,
                    checked=checked,
                    notes=notes,
                )
            )
    return dict(checks=rows)
