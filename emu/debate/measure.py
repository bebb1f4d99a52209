"""Timing one stop: a blk device with ``depth`` requests outstanding, stopped through one
interface, timed from the request until the requester sees "stopped".

Shared by ``emu bench debate`` and ``bench/stop_latency.py`` (which prints its own tables
from it). Interfaces: the STOP status bit (the driver writes Status and polls until STOP
reads back set), virtio 1.4 SUSPEND (drain only; polls until SUSPEND=1, DRIVER_OK=0), the
VMM-side stop (``MmioTransport.vmm_stop``) and vhost-user GET_VRING_BASE (emu's Python
frontend against emu's backend: SET_VRING_ENABLE 0 + GET_VRING_BASE round trip).

Backends (``open_backend``): ``model`` (the delay model over a tmpfs file: used entries
published ``latency`` later, nothing outstanding anywhere), ``tmpfs`` and ``disk``
(io_uring on a file in /dev/shm, or on a disk with reads made cold before each sample),
and ``nbd<N>ms`` (libnbd against nbdkit's memory plugin, delay filter rdelay = wdelay =
N ms).

Each sample: ``depth`` 4 KiB reads (or writes) at distinct offsets are made available;
the clock starts once each one is published or held by the queue's deferred (for a real
backend: outstanding at the engine, or answered and not yet published). The device is
resumed and every request is collected, each exactly once with status OK, before the
next sample (anything else is a ``BenchDefect``).

Polls sleep(0) between register reads, which releases the GIL, as a vCPU thread would be
outside the interpreter while the guest runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from emu.devices.blk import S_OK, T_IN, T_OUT, BlkDevice
from emu.memory import GuestMemory
from emu.state.format import decode, encode
from emu.testing.blk import BlkDriver, status_of
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.nbdkit import Nbdkit
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer

QUEUE = 256
DISK = 64 << 20
BLOCK = 4096
#: the deepest queue a sample uses: the NBD server gets a thread per request beyond it
MAX_DEPTH = 128
#: where the disk-backed image goes (the first that is not tmpfs)
DISK_DIRS = ("/var/tmp", "/tmp", os.getcwd())
#: the stop interfaces, as the report names them
INTERFACES = ("stop-bit", "suspend", "vmm", "vhost-user")
_NBD = re.compile(r"nbd(\d+(?:\.\d+)?)ms$")


class BenchDefect(Exception):
    """A stop that lost, doubled or failed a request: the bench found a bug."""


def make_disk(tmp: str, fill: bool = False) -> str:
    path = os.path.join(tmp, "disk.img")
    with open(path, "wb") as f:
        if fill:  # real blocks on the disk, so a cold read reads them
            chunk = os.urandom(1 << 20)
            for _ in range(DISK >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        else:
            f.truncate(DISK)
    return path


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind


def disk_dir() -> str | None:
    for d in DISK_DIRS:
        if os.path.isdir(d) and os.access(d, os.W_OK) and fs_type(d) not in ("tmpfs", "ramfs"):
            return d
    return None


def nbd_latency_ms(name: str) -> float | None:
    """N for a backend named ``nbd<N>ms``, else None."""
    m = _NBD.match(name)
    return float(m.group(1)) if m else None


@dataclass
class Backend:
    """Where the blk device's disk is: ``target`` for BlkDevice, ``latency`` for the delay
    model (model only), ``cold`` to evict the image's pages before a read sample."""

    name: str
    target: str
    latency: float = 0.0
    model: bool = False
    cold: Callable[[], None] | None = None


@contextlib.contextmanager
def open_backend(name: str, tmp: str, latency: float = 0.0) -> Iterator[Backend]:
    """The backend ``name`` (model, tmpfs, disk, nbd<N>ms), set up in ``tmp`` (the disk
    one in ``disk_dir()``), torn down afterwards."""
    if name in ("model", "tmpfs"):
        yield Backend(name, make_disk(tmp), latency, model=name == "model")
    elif name == "disk":
        where = disk_dir()
        if where is None:
            raise RuntimeError("no disk-backed directory for the disk backend")
        with tempfile.TemporaryDirectory(dir=where) as dtmp:
            path = make_disk(dtmp, fill=True)
            fd = os.open(path, os.O_RDWR)

            def cold() -> None:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

            try:
                yield Backend(name, path, cold=cold)
            finally:
                os.close(fd)
    else:
        ms = nbd_latency_ms(name)
        if ms is None:
            raise ValueError(f"unknown backend {name!r}")
        delay = {"filters": ["delay"], "params": [f"rdelay={ms:g}ms", f"wdelay={ms:g}ms"]}
        # a thread per request at the deepest depth, so the server holds them all at once
        srv = Nbdkit(
            os.path.join(tmp, "nbd.sock"),
            ["memory", f"{DISK}"],
            threads=2 * MAX_DEPTH,
            **(delay if ms else {}),
        )
        with srv:
            yield Backend(name, srv.uri)


def _poll(read: Callable[[], int], mask: int, want: int) -> None:
    while read() & mask != want:
        time.sleep(0)


def _new_device(be: Backend, policy: str) -> BlkDevice:
    dev = BlkDevice(be.target)
    dev.policy = policy
    if be.model:
        for q in dev.queues:
            hold_completions(q, be.latency)
    return dev


class Case:
    """A blk device and a driver for it; ``submit`` / ``stop`` / ``resume`` / ``collect``."""

    dev: BlkDevice
    blk: BlkDriver
    model: bool

    def submit(self, depth: int, op: str, rep: int) -> list[int]:
        if op == "write":
            data = bytes([rep & 0xFF]) * BLOCK
            return [self.blk.submit(T_OUT, 8 * i, data) for i in range(depth)]
        return [self.blk.submit(T_IN, 8 * i, in_size=BLOCK) for i in range(depth)]

    def collect(self, tokens: list[int]) -> None:
        """Every request of the sample, each exactly once, status OK."""
        if not tokens:
            return
        done = self.blk.drv.wait(0, len(tokens), timeout=30)
        got = sorted(c.token for c in done)
        if got != sorted(tokens):
            raise BenchDefect(f"completions {got} are not the requests made {sorted(tokens)}")
        bad = [status_of(c) for c in done if status_of(c) != S_OK]
        if bad:
            raise BenchDefect(f"{len(bad)} requests failed after resume: statuses {bad}")

    def leftovers(self) -> int:
        """Completions that arrived beyond those collected (a request answered twice)."""
        time.sleep(0.05)
        return len(self.blk.drv._backlog.pop(0, [])) + len(self.blk.drv.queues[0].poll())

    def at_engine(self) -> int:
        """Requests the backend holds: at the engine (real) or held back (model)."""
        if self.model or not self.dev.engines:
            return self.dev.queues[0].held()
        return self.dev.engines[0].outstanding

    def stop(self, iface: str) -> float:
        raise NotImplementedError

    def resume(self, iface: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MmioCase(Case):
    """blk behind the virtio-mmio transport, driven by the reference driver."""

    def __init__(self, tmp: str, policy: str, be: Backend) -> None:
        self.mem = GuestMemory.create(64 << 20)
        self.dev = _new_device(be, policy)
        self.model = be.model
        self.tr = MmioTransport(
            self.dev, self.mem, stop_policy=policy, stop_feature_bit=mmio_regs.F_EMU_STOP
        )
        self.drv = VirtioMmioDriver(self.tr, self.mem)
        self.blk = BlkDriver.open(self.drv, queue_size=QUEUE)
        self.policy = policy

    def stop(self, iface: str) -> float:
        status = lambda: self.tr.read(mmio_regs.STATUS, 4)  # noqa: E731
        t0 = time.perf_counter()
        if iface == "stop-bit":
            self.tr.write(mmio_regs.STATUS, 4, status() | mmio_regs.S_STOP)
            _poll(status, mmio_regs.S_STOP, mmio_regs.S_STOP)
        elif iface == "suspend":
            self.tr.write(mmio_regs.STATUS, 4, status() | mmio_regs.S_SUSPEND)
            _poll(status, mmio_regs.S_SUSPEND | mmio_regs.S_DRIVER_OK, mmio_regs.S_SUSPEND)
        else:
            self.tr.vmm_stop(self.policy)
        return time.perf_counter() - t0

    def resume(self, iface: str) -> None:
        if iface == "vmm":
            self.tr.vmm_resume()
        else:
            self.drv.resume()

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


class VhostCase(Case):
    """blk behind emu's vhost-user backend, driven by emu's Python frontend."""

    def __init__(self, tmp: str, policy: str, be: Backend) -> None:
        self.dev = _new_device(be, policy)
        self.model = be.model
        self.server = VhostUserServer(self.dev, os.path.join(tmp, "blk.sock")).start()
        self.fe = VhostUserDriver(self.server.path, 64 << 20)
        self.fe.init()
        self.fe.setup_queue(0, QUEUE)
        self.fe.driver_ok()
        self.blk = BlkDriver(self.fe)  # the frontend speaks the reference driver's API
        self.base = 0

    def stop(self, iface: str) -> float:
        t0 = time.perf_counter()
        self.base = self.fe.stop_ring(0)
        return time.perf_counter() - t0

    def resume(self, iface: str) -> None:
        self.fe.restart_ring(0, self.base)
        self.fe.kick(0)

    def close(self) -> None:
        self.fe.close()
        self.server.close()
        self.dev.close()


def wait_in_flight(case: Case, start_used: int, depth: int) -> None:
    """Until each of the ``depth`` requests is published or held by the queue's deferred
    (a real backend: outstanding at the engine, or answered and not yet published)."""
    q = case.dev.queues[0]
    deadline = time.monotonic() + 10
    while ((q.state().next_used - start_used) & 0xFFFF) + q.held() < depth:
        if time.monotonic() > deadline:
            raise TimeoutError(f"device took fewer than {depth} requests")
        time.sleep(0.0001)


def measure(
    iface: str, policy: str, depth: int, be: Backend, reps: int, op: str = "read"
) -> tuple[list[float], float]:
    """Stop latencies (s) of ``reps`` samples, and the mean number at the backend at t0."""
    if depth > MAX_DEPTH:
        raise ValueError(f"depth {depth} over {MAX_DEPTH}")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        case = (VhostCase if iface == "vhost-user" else MmioCase)(tmp, policy, be)
        try:
            samples, held = [], []
            for rep in range(reps):
                if be.cold is not None and op == "read":
                    be.cold()
                start = case.dev.queues[0].state().next_used
                tokens = case.submit(depth, op, rep)
                wait_in_flight(case, start, depth)
                held.append(case.at_engine())
                samples.append(case.stop(iface))
                case.resume(iface)
                case.collect(tokens)
            extra = case.leftovers()
            if extra:
                raise BenchDefect(f"{extra} completions more than requests made")
            return samples, statistics.mean(held)
        finally:
            case.close()


def pct(samples: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``samples``."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def time_save_restore(
    tr: MmioTransport, fresh: Callable[[], Any], mem: GuestMemory, reps: int
) -> tuple[list[float], list[float], int]:
    """Seconds of each of ``reps`` saves of the stopped ``tr`` (``save`` + encode) and
    restores (decode + ``restore`` onto a fresh transport over ``fresh()``), and the
    state's bytes."""
    saves, restores, size = [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        data = encode(tr.save())
        t1 = time.perf_counter()
        dev = fresh()
        tr2 = MmioTransport(dev, mem)
        t2 = time.perf_counter()
        tr2.restore(decode(data))
        t3 = time.perf_counter()
        dev.close()
        saves.append(t1 - t0)
        restores.append(t3 - t2)
        size = len(data)
    return saves, restores, size
