"""Stop latency: from the stop request to "stopped", per interface, policy, depth, latency.

Interfaces: the STOP status bit (driver writes Status, polls until STOP reads back set),
virtio 1.4 SUSPEND (drain only, as the spec requires; polls until SUSPEND=1, DRIVER_OK=0),
the VMM-side stop (``MmioTransport.vmm_stop``) and vhost-user GET_VRING_BASE (emu's Python
frontend against emu's backend: SET_VRING_ENABLE 0 + GET_VRING_BASE round trip).

Each sample: ``depth`` 4 KiB reads are made available and executed by the blk device (the
bench waits until every one is either published or held back; at 1 ms latency the first
ones may have completed by then), whose queue publishes completions ``latency`` seconds
after execution (the delay backend model: a report-mode stop withdraws
what is not published yet; a drain-mode stop waits for it). Then the clock starts, the stop
is requested, and it stops when the stop is visible to the requester. After each sample the
device is resumed and every request is collected (exactly once) before the next sample.

Polls sleep(0) between register reads, which releases the GIL, as a vCPU thread would be
outside the interpreter while the guest runs. Save/restore time per device type is the
VMM-side path: ``transport.save()`` + encode, then decode + ``restore`` on a fresh
transport and device.

Prints a table, ``name value unit`` lines, and the three headline lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from emu.backends.cable import Cable
from emu.backends.chardev import BufferChar
from emu.devices.blk import T_IN, BlkDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.state.format import decode, encode
from emu.testing.blk import BlkDriver
from emu.testing.console import GuestConsole
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.net import GuestNet
from emu.testing.rng import RngDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer

DEPTHS = (0, 16, 128)
LATENCIES = (0.0, 0.001, 0.01)
QUEUE = 256
DISK = 64 << 20


def _disk(tmp: str) -> str:
    path = os.path.join(tmp, "disk.img")
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


def _wait_in_flight(dev: BlkDevice, start_used: int, depth: int) -> None:
    """Until the device has executed all ``depth`` requests: each one is either published
    already or held back by the latency, i.e. in flight at the "backend"."""
    q = dev.queues[0]
    deadline = time.monotonic() + 10
    while ((q.state().next_used - start_used) & 0xFFFF) + q.held() < depth:
        if time.monotonic() > deadline:
            raise TimeoutError(f"device executed fewer than {depth}")
        time.sleep(0.0001)


def _poll(read: Callable[[], int], mask: int, want: int) -> None:
    while read() & mask != want:
        time.sleep(0)


class MmioCase:
    """blk behind the virtio-mmio transport, driven by the reference driver."""

    def __init__(self, tmp: str, policy: str, latency: float) -> None:
        self.mem = GuestMemory.create(64 << 20)
        self.dev = BlkDevice(_disk(tmp))
        self.dev.policy = policy
        for q in self.dev.queues:
            hold_completions(q, latency)
        self.tr = MmioTransport(
            self.dev, self.mem, stop_policy=policy, stop_feature_bit=mmio_regs.F_EMU_STOP
        )
        self.drv = VirtioMmioDriver(self.tr, self.mem)
        self.blk = BlkDriver.open(self.drv, queue_size=QUEUE)
        self.policy = policy

    def submit(self, depth: int) -> None:
        for i in range(depth):
            self.blk.submit(T_IN, 8 * i, in_size=4096)

    def collect(self, depth: int) -> None:
        if depth:
            self.drv.wait(0, depth, timeout=30)

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


class VhostCase:
    """blk behind emu's vhost-user backend, driven by emu's Python frontend."""

    def __init__(self, tmp: str, policy: str, latency: float) -> None:
        self.dev = BlkDevice(_disk(tmp))
        self.dev.policy = policy
        for q in self.dev.queues:
            hold_completions(q, latency)
        self.server = VhostUserServer(self.dev, os.path.join(tmp, "blk.sock")).start()
        self.fe = VhostUserDriver(self.server.path, 64 << 20)
        self.fe.init()
        self.fe.setup_queue(0, QUEUE)
        self.fe.driver_ok()
        self.blk = BlkDriver(self.fe)  # the frontend speaks the reference driver's API
        self.base = 0

    def submit(self, depth: int) -> None:
        for i in range(depth):
            self.blk.submit(T_IN, 8 * i, in_size=4096)

    def collect(self, depth: int) -> None:
        if depth:
            self.fe.wait(0, depth, timeout=30)

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


def measure(iface: str, policy: str, depth: int, latency: float, reps: int) -> list[float]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        case = (VhostCase if iface == "vhost-user" else MmioCase)(tmp, policy, latency)
        try:
            samples = []
            for _ in range(reps):
                start = case.dev.queues[0].state().next_used
                case.submit(depth)
                _wait_in_flight(case.dev, start, depth)
                samples.append(case.stop(iface))
                case.resume(iface)
                case.collect(depth)
            return samples
        finally:
            case.close()


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


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
    saves, restores = [], []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        mem = GuestMemory.create(64 << 20)
        tr, fresh = SETUPS[kind](tmp, mem)
        tr.vmm_stop()
        size = 0
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
        tr.device.close()
        mem.close()
    return saves, restores, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40, help="samples per cell")
    ap.add_argument("--quick", action="store_true", help="a few samples per cell")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps

    lines: list[str] = []
    print(
        f"{'interface':<11}{'policy':<8}{'depth':>6}{'lat':>7}{'p50 us':>11}{'p99 us':>11}"
        f"{'max us':>11}"
    )
    for iface in ("stop-bit", "suspend", "vmm", "vhost-user"):
        for policy in ("drain", "report"):
            for depth in DEPTHS:
                for lat in LATENCIES:
                    lat_name = f"{lat * 1000:g}ms"
                    if iface == "suspend" and policy == "report":
                        continue  # virtio 1.4 SUSPEND always drains
                    s = [x * 1e6 for x in measure(iface, policy, depth, lat, reps)]
                    p50, p99, mx = statistics.median(s), pct(s, 99), max(s)
                    print(
                        f"{iface:<11}{policy:<8}{depth:>6}{lat_name:>7}{p50:>11.1f}"
                        f"{p99:>11.1f}{mx:>11.1f}",
                        flush=True,
                    )
                    key = f"stop_{iface.replace('-', '_')}_{policy}_depth{depth}_lat{lat_name}"
                    lines += [
                        f"{key}_p50_us {p50:.1f} us",
                        f"{key}_p99_us {p99:.1f} us",
                        f"{key}_max_us {mx:.1f} us",
                    ]
                    if iface == "vmm" and depth == 128 and lat == 0.01:
                        headline = f"stop_{policy}_depth128_lat10ms_p99_us {p99:.1f} us"
                        lines.append(headline)
    print()
    print(f"{'device':<9}{'save us':>10}{'restore us':>12}{'bytes':>8}")
    for kind in SETUPS:
        saves, restores, size = save_restore(kind, max(reps, 20))
        s, r = statistics.median(saves) * 1e6, statistics.median(restores) * 1e6
        print(f"{kind:<9}{s:>10.1f}{r:>12.1f}{size:>8}")
        lines += [
            f"state_save_{kind}_us {s:.1f} us",
            f"state_restore_{kind}_us {r:.1f} us",
            f"state_bytes_{kind} {size} bytes",
        ]
        if kind == "blk":
            lines.append(f"state_save_restore_blk_us {s + r:.1f} us")
    print()
    for line in lines:
        if not line.startswith(("stop_report_depth128", "stop_drain_depth128", "state_save_res")):
            print(line)
    for line in lines:
        if line.startswith(("stop_report_depth128", "stop_drain_depth128", "state_save_res")):
            print(line)


if __name__ == "__main__":
    main()
