"""Real-guest virtio-blk throughput and backend CPU cost with fio, emu against its peers.

Guests run fio (the `fio` workload, emu/guest/fio.py) on /dev/vda with O_DIRECT and
libaio, time based, one job after another: 1 MiB sequential write and read (QD1), then
4 KiB random write and read at QD1 and QD32. The disk is an image on tmpfs.

    UML (virtio_uml)    emu serve (vhost-user)  vs  qemu-storage-daemon, same file
    QEMU microvm (TCG)  emu serve (vhost-user)  vs  qemu-storage-daemon  vs  QEMU's
                        built-in virtio-blk, same file
    UML, NBD            emu serve blk:nbd+unix://  vs  qemu-storage-daemon driver=nbd, on
                        one nbdkit (file plugin on the image, delay filter rdelay=1ms):
                        4 KiB random read at QD1 and QD32 (the emu row needs
                        emu.backends._nbd; it says "skipped" without it)

Under UML the sequential and the 4 KiB jobs run in two boots; the backend process's
utime + stime (/proc, the process and its children) over the 4 KiB boot, divided by the
4 KiB requests fio completed in it, is the backend CPU per 4 KiB request (boot-time
requests are counted in the CPU time but not in the divisor: a few dozen against
thousands). `--quick`: 1 s per job on a 64 MiB disk, for a check that everything runs.

Under UML (the NBD rows too) the backend, nbdkit included, runs on one CPU and the guest on
the other, for every backend alike (`--no-pin`: wherever the scheduler puts them). UML is
two host processes that hand the CPU to each other on every guest system call (the
kernel and the ptraced process of fio); left to the scheduler, they are sometimes placed
on two CPUs, and a wake-up across CPUs costs tens of microseconds on this VM
(bench/blk_plane.py's two columns). At QD32 that placement, not the backend, then decides
the figure: unpinned, a backend that keeps the other CPU busy makes UML faster. microvm
runs unpinned: QEMU's built-in disk has no process of its own to place.

UML's QD1 columns measure a race in UML more than the backend: an interrupt that comes
within some 30 us of UML's kick is often noticed only at UML's next timer tick. At QD1,
pinned, emu answers in about 10 us and fio sees a p99 of 5-8 ms (mean 230-380 us), while
qemu-storage-daemon answers later and sees 75 us; a scratch build of emu that waited
30 us before each interrupt saw a p99 of 175 us and a mean of 133 us.

`--rounds N` runs every configuration N times, the configurations in turn each round,
and keeps each figure's best round (the highest MiB/s or IOPS, the lowest CPU per
request): this machine's speed drifts by a fifth over minutes, and a TCG guest feels it
most, so a ratio of two runs minutes apart can say more about the drift than about the
backends; interleaved rounds give both sides the same chances.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from emu import progress
from emu.guest import qsd
from emu.guest.fio import FioJob, FioResult, run_fio
from emu.guest.images import build_image
from emu.guest.proc import children, start, stop

SEQ = [
    FioJob("seq_write_1m", rw="write", bs="1m", iodepth=1),
    FioJob("seq_read_1m", rw="read", bs="1m", iodepth=1),
]
RAND = [
    FioJob("randwrite_4k_qd1", rw="randwrite", bs="4k", iodepth=1),
    FioJob("randwrite_4k_qd32", rw="randwrite", bs="4k", iodepth=32),
    FioJob("randread_4k_qd1", rw="randread", bs="4k", iodepth=1),
    FioJob("randread_4k_qd32", rw="randread", bs="4k", iodepth=32),
]
NBD = [RAND[2], RAND[3]]
PHASES = [j.name for j in SEQ + RAND]
NBD_DELAY = "1ms"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and everything below it (backends run under a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total + sum(_cpu_seconds(c) for c in children(pid))


@contextmanager
def _listening(
    cmd: list[str], sock: Path, what: str, report: int | None = None
) -> Iterator[subprocess.Popen]:
    """Runs `cmd` (which listens on unix socket `sock`) while the block runs; ``report``:
    the signal on which it prints its state if a guest overruns (emu.guest.proc)."""
    sock.unlink(missing_ok=True)
    proc = start(cmd, report=report)
    try:
        deadline = time.monotonic() + 20.0
        while not qsd.listening(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}) before listening")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on {sock}")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)
        sock.unlink(missing_ok=True)


@contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Processes started in the block run on ``cpu`` (None: wherever they are put)."""
    if cpu is None:
        yield
        return
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, was)


def emu_serve(spec: str, sock: Path) -> AbstractContextManager[subprocess.Popen]:
    """`emu serve` as its own process (so its CPU time is its own); a guest that overruns
    gets its queues' state printed (SIGUSR1) before it is killed."""
    cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), spec]
    return _listening(cmd, sock, "emu serve", signal.SIGUSR1)


def nbdkit(image: Path, sock: Path) -> AbstractContextManager[subprocess.Popen]:
    """nbdkit serving `image` with every read delayed by NBD_DELAY; threads enough for QD32."""
    cmd = ["nbdkit", "--foreground", "--unix", str(sock), "--threads", "64"]
    cmd += ["--filter=delay", "file", str(image), f"rdelay={NBD_DELAY}"]
    return _listening(cmd, sock, "nbdkit")


def _run(kind: str, device: str, jobs: list[FioJob], runtime: int) -> FioResult:
    jobs = [FioJob(**{**vars(j), "runtime": runtime}) for j in jobs]
    return run_fio(kind, [device], jobs, timeout=120 + 3 * runtime * len(jobs))


def _figures(res: FioResult) -> dict[str, float]:
    """MiB/s for the 1 MiB jobs, IOPS for the 4 KiB ones."""
    out = {}
    for name, job in res.jobs.items():
        side = job.read if "read" in name else job.write
        out[name] = side.bw_bytes / (1 << 20) if name.startswith("seq") else side.iops
    return out


def _ios_4k(res: FioResult) -> int:
    return sum(j.read.ios + j.write.ios for n, j in res.jobs.items() if "_4k_" in n)


Pin = tuple[int | None, int | None]  # (the backend's CPU, the guest's)
UNPINNED: Pin = (None, None)


def measure(
    kind: str, backend: str, image: Path, tmp: Path, runtime: int, pin: Pin
) -> tuple[dict, float]:
    """(figures per phase, backend CPU us per 4 KiB request or nan) for one configuration."""
    if backend == "qemu":
        res = _run(kind, f"qemu-blk:{image}", SEQ + RAND, runtime)
        return _figures(res), float("nan")
    sock = tmp / f"{backend}.sock"
    serve = emu_serve(f"blk:{image}", sock) if backend == "emu" else qsd.blk_export(image, sock)
    backend_cpu, guest_cpu = pin if kind == "uml" else UNPINNED
    with on_cpu(backend_cpu), serve as proc, on_cpu(guest_cpu):
        if kind != "uml":
            return _figures(_run(kind, f"blk:{sock}", SEQ + RAND, runtime)), float("nan")
        figures = _figures(_run(kind, f"blk:{sock}", SEQ, runtime))
        before = _cpu_seconds(proc.pid)
        res = _run(kind, f"blk:{sock}", RAND, runtime)
        cpu = _cpu_seconds(proc.pid) - before
    return figures | _figures(res), cpu / _ios_4k(res) * 1e6


def measure_nbd(
    image: Path, tmp: Path, runtime: int, pin: Pin
) -> dict[str, dict[str, float] | str]:
    """QD1 and QD32 random reads through one delayed nbdkit, per backend (or why skipped)."""
    nbd_sock = tmp / "nbd.sock"
    out: dict[str, dict[str, float] | str] = {}
    backend_cpu, guest_cpu = pin
    with on_cpu(backend_cpu), nbdkit(image, nbd_sock):
        sock = tmp / "nbd-vu.sock"
        if importlib.util.find_spec("emu.backends._nbd") is None:
            out["emu"] = "emu.backends._nbd is not built (the NBD engine)"
        else:
            with emu_serve(f"blk:nbd+unix:///?socket={nbd_sock}", sock), on_cpu(guest_cpu):
                out["emu"] = _figures(_run("uml", f"blk:{sock}", NBD, runtime))
        with qsd.nbd_export(nbd_sock, sock), on_cpu(guest_cpu):
            out["qsd"] = _figures(_run("uml", f"blk:{sock}", NBD, runtime))
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "nan"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per job, 64 MiB disk")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--no-microvm", action="store_true", help="UML only (microvm is slow)")
    ap.add_argument("--no-nbd", action="store_true", help="skip the NBD rows")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved runs; the best of each")
    ap.add_argument("--no-pin", action="store_true", help="UML and its backend on any CPU")
    progress.add_argument(ap)
    args = ap.parse_args()
    progress.ask(args.progress)
    runtime, disk_mib = (1, 64) if args.quick else (args.runtime, args.disk_mib)
    cpus = sorted(os.sched_getaffinity(0))
    pin: Pin = UNPINNED if args.no_pin or len(cpus) < 2 else (cpus[0], cpus[1])
    kinds = ["uml"] if args.no_microvm else ["uml", "microvm"]
    for kind in kinds:
        build_image(kind, fio=True)  # fetched and cached once, outside the timings
    configs = [("uml", "emu"), ("uml", "qsd")]
    if not args.no_microvm:
        configs += [("microvm", "emu"), ("microvm", "qsd"), ("microvm", "qemu")]

    table: dict[tuple[str, str], dict[str, float]] = {}
    cpu: dict[str, float] = {}
    nbd: dict[str, dict[str, float] | str] = {}
    bar = progress.progress("guest runs", args.rounds * len(configs) + 1)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmpdir, bar:
        tmp = Path(tmpdir)
        image = tmp / "disk.img"
        for _ in range(args.rounds):
            for kind, backend in configs:
                bar.update(0, f"{kind}/{backend}")
                with open(image, "wb") as f:  # a fresh sparse disk per configuration
                    f.truncate(disk_mib << 20)
                figures, us = measure(kind, backend, image, tmp, runtime, pin)
                best = table.setdefault((kind, backend), figures)
                for phase, value in figures.items():
                    best[phase] = max(best[phase], value)
                if kind == "uml":
                    cpu[backend] = min(cpu.get(backend, us), us)
                bar.update(1, f"{kind}/{backend}")
        bar.update(0, "NBD")
        if args.no_nbd:
            nbd = {"emu": "--no-nbd", "qsd": "--no-nbd"}
        elif shutil.which("nbdkit") is None:
            nbd = {b: "nbdkit is not installed" for b in ("emu", "qsd")}
        else:
            nbd = measure_nbd(image, tmp, runtime, pin)
        bar.update(1, "NBD")

    mode = "quick: 1 s per job, 64 MiB disk" if args.quick else f"{runtime} s per job"
    if args.rounds > 1:
        mode += f", best of {args.rounds} interleaved rounds"
    if pin == UNPINNED:
        mode += "; UML unpinned"
    else:
        mode += f"; UML on CPU {pin[1]}, its backend on CPU {pin[0]}"
    print(f"fio, libaio, O_DIRECT, time based ({mode}); MiB/s for 1m, IOPS for 4k")
    print(f"{'guest':<9}{'backend':<9}" + "".join(f"{p:>18}" for p in PHASES))
    rows = [(kind, backend, row) for (kind, backend), row in table.items()]
    rows += [("uml", f"{backend}/nbd", row) for backend, row in nbd.items()]
    for kind, backend, row in rows:
        if isinstance(row, str):
            cells = f"  skipped: {row}"
        else:
            cells = "".join(f"{row[p]:>18.1f}" if p in row else f"{'-':>18}" for p in PHASES)
        print(f"{kind:<9}{backend:<9}{cells}")
    print(f"nbd: nbdkit file plugin with the delay filter, rdelay={NBD_DELAY}")
    print(f"backend CPU per 4 KiB request: emu {cpu['emu']:.1f} us, qsd {cpu['qsd']:.1f} us")
    print()
    for (kind, backend), row in table.items():
        for p in PHASES:
            print(f"{kind}_{backend}_{p} {row[p]:.1f} {'MiB/s' if p.startswith('seq') else 'IOPS'}")
    for backend, us in cpu.items():
        print(f"backend_cpu_per_4k_req_{backend} {us:.1f} us")
    ratios = [
        ("uml_blk_seq_read_emu_over_qsd", "uml", "qsd", "seq_read_1m"),
        ("uml_blk_4k_read_emu_over_qsd", "uml", "qsd", "randread_4k_qd1"),
        ("uml_blk_randread_qd32_emu_over_qsd", "uml", "qsd", "randread_4k_qd32"),
        ("microvm_blk_seq_read_emu_over_qemu", "microvm", "qemu", "seq_read_1m"),
        ("microvm_blk_4k_read_emu_over_qemu", "microvm", "qemu", "randread_4k_qd1"),
        ("microvm_blk_randread_qd32_emu_over_qemu", "microvm", "qemu", "randread_4k_qd32"),
    ]
    for name, kind, peer, phase in ratios:
        if (kind, peer) in table:
            print(f"{name} {_ratio(table[(kind, 'emu')][phase], table[(kind, peer)][phase])} x")
    print(f"backend_cpu_per_4k_req_emu_over_qsd {_ratio(cpu['emu'], cpu['qsd'])} x")
    for backend, row in nbd.items():
        name = f"nbd_delay{NBD_DELAY}_randread_qd32_over_qd1_{backend}"
        if isinstance(row, dict):
            print(f"{name} {_ratio(row['randread_4k_qd32'], row['randread_4k_qd1'])} x")
        else:
            print(f"skipped: {name}: {row}")


if __name__ == "__main__":
    main()
