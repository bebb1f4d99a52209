"""Live migration of a real guest, emu against qemu-storage-daemon, side by side in one run.

The guest is QEMU 7.2 microvm under TCG running the ``livemig`` workload (O_DIRECT
sequence-numbered writes, short-lived processes, a region read into its page cache
during the migration: emu/guest/livemig.py). It is migrated live over TCP to a second
QEMU on this machine, exactly as tests/test_guest_live.py does: the first pass over RAM
at ``--bandwidth``, the migration held while the guest fills its cache, then QEMU's
default 300 ms downtime limit until it converges. Backends, each on both ends over one
disk image: ``emu serve --policy drain`` (which needs no state file: nothing is left in
flight), ``emu serve --policy report`` (``--state-dir`` on both ends, the destination with
``--restore-dir``), and qemu-storage-daemon (its vhost-user-blk export).

Per run, from QEMU's query-migrate at completion: ``downtime`` (ms the VM was stopped,
whole milliseconds), the final pass (``downtime-bytes``, RAM sent while the VM was
stopped, in 4 KiB pages), the passes (``dirty-sync-count``) and the total time; and the
backend's part of the downtime, from QEMU's own trace of its vhost-user messages: from
the first message of the stop (SET_STATUS 0 / SET_VRING_ENABLE 0) to the answer to
GET_VRING_BASE (``livemig.stop_us``). A run passes when the migration completed and the
destination guest's data check and the host file check found nothing.
Figures are medians over ``--runs`` runs per backend, run in turns (emu drain, emu
report, qsd, emu drain, ...) so that a slow moment of the machine hits all of them.

    .venv/bin/python bench/migrate.py [--runs 5] [--progress]

Prints a table and ``name value unit`` lines; the headline ratios take the worse of
emu's two policies: ``live_migration_final_pass_pages_emu_over_qsd`` (goal <= 1.0),
``live_migration_downtime_emu_over_qsd`` (goal <= 1.2), ``live_migration_runs_passed_emu``
(goal: all of ``live_migration_runs_emu``). Progress over the runs goes to stderr when it
is a terminal or with ``--progress`` (emu/progress.py); stdout is the same either way.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from emu import progress
from emu.guest import build_image, livemig, qsd, vm
from emu.guest.images import GuestImage

BACKENDS = ("emu-drain", "emu-report", "qsd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def backend(kind: str, side: livemig.Side, disk: Path, state: Path, dest: bool) -> Iterator[None]:
    if kind == "qsd":
        with qsd.blk_export(disk, side.sock):
            yield
        return
    policy = kind.removeprefix("emu-")
    opts = ["--policy", policy]
    if policy == "report":  # the requests in flight travel in the state file
        opts += ["--state-dir", str(state)] + (["--restore-dir", str(state)] if dest else [])
    serve = vm.Serve(side.sock, disk, side.dir / "serve.log", *opts)
    try:
        yield
    finally:
        serve.kill()


def one_run(kind: str, image: GuestImage, tmp: Path, bandwidth: int) -> dict:
    disk, state = tmp / "disk.img", tmp / "state"
    livemig.make_disk(disk)
    state.mkdir()
    src, dst = livemig.Side(tmp / "src", image), livemig.Side(tmp / "dst", image)
    transcript: list[str] = []
    with ExitStack() as stack:
        stack.enter_context(backend(kind, src, disk, state, dest=False))
        guest = src.guest(transcript, trace=True)
        stack.callback(guest.stop)
        guest.progress(2)
        stack.enter_context(backend(kind, dst, disk, state, dest=True))
        uri = f"tcp:127.0.0.1:{free_port()}"
        target = dst.guest(transcript, incoming=uri)
        stack.callback(target.stop)
        info = livemig.migrate(guest, uri, disk, bandwidth)
        ram = info.get("ram", {})
        out = {
            "downtime_ms": float(info.get("downtime", "nan")),
            "final_pass_pages": ram.get("downtime-bytes", 0) / ram.get("page-size", 4096),
            "passes": ram.get("dirty-sync-count", 0),
            "total_s": info.get("total-time", 0) / 1000,
            "stop_us": float("nan"),
            "passed": False,
        }
        if info["status"] != "completed":
            return out
        out["stop_us"] = livemig.stop_us(src.trace)
        guest.quit()
        target.progress(2)
        livemig.raise_flag(disk, b"EMU-STOP")
        results = target.finish(ok=False)
        out["passed"] = results.get("livemig.bad") == "0" and not livemig.disk_problems(
            results, disk
        )
        return out


def median(runs: list[dict], key: str, pick: Callable = statistics.median) -> float:
    return pick([r[key] for r in runs]) if runs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per backend")
    ap.add_argument("--bandwidth", type=int, default=16 << 20, help="bytes/s, first pass")
    progress.add_argument(ap)
    args = ap.parse_args()
    progress.ask(args.progress)
    image = build_image("microvm")
    kinds = BACKENDS if qsd.available() else BACKENDS[:2]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    bar = progress.progress("live migrations", args.runs * len(kinds))
    with bar:
        for i in range(args.runs):
            for kind in kinds:
                bar.update(0, f"{kind} run {i + 1}")
                with tempfile.TemporaryDirectory(prefix="emu-migrate-") as tmp:
                    try:
                        r = one_run(kind, image, Path(tmp), args.bandwidth)
                    except (AssertionError, RuntimeError, TimeoutError) as e:
                        bar.clear()
                        print(f"# {kind} run {i + 1}: {str(e).splitlines()[0]}", flush=True)
                        r = {"downtime_ms": float("nan"), "final_pass_pages": float("nan")}
                        r.update(passes=0, total_s=float("nan"), stop_us=float("nan"))
                        r["passed"] = False
                runs[kind].append(r)
                bar.clear()
                print(
                    f"# {kind} run {i + 1}: downtime {r['downtime_ms']:.0f} ms, final pass "
                    f"{r['final_pass_pages']:.0f} pages, {r['passes']} passes, backend stop "
                    f"{r['stop_us']:.0f} us, "
                    f"{'passed' if r['passed'] else 'FAILED'}",
                    flush=True,
                )
                bar.update(1, f"{kind} run {i + 1}")

    head = f"{'backend':<12} {'downtime ms':>12} {'(mean)':>7} {'final pass pages':>17}"
    print(f"\n{head} {'passes':>7} {'backend stop us':>16} {'total s':>8} {'passed':>7}")
    for kind, rs in runs.items():
        ok = [r for r in rs if r["passed"]]
        print(
            f"{kind:<12} {median(ok, 'downtime_ms'):>12.1f} "
            f"{median(ok, 'downtime_ms', statistics.mean):>7.1f} "
            f"{median(ok, 'final_pass_pages'):>17.0f} {median(ok, 'passes'):>7.0f} "
            f"{median(ok, 'stop_us'):>16.0f} {median(ok, 'total_s'):>8.1f} {len(ok):>4}/{len(rs)}"
        )
    print()
    for kind, rs in runs.items():
        ok = [r for r in rs if r["passed"]]
        name = kind.replace("-", "_")
        print(f"live_migration_downtime_{name} {median(ok, 'downtime_ms'):.1f} ms")
        print(f"live_migration_final_pass_pages_{name} {median(ok, 'final_pass_pages'):.0f} pages")
        print(f"live_migration_backend_stop_{name} {median(ok, 'stop_us'):.0f} us")
    emu = [k for k in kinds if k.startswith("emu")]
    passed = sum(r["passed"] for k in emu for r in runs[k])
    if "qsd" in runs:
        qsd_ok = [r for r in runs["qsd"] if r["passed"]]
        for key, label in (("final_pass_pages", "final_pass_pages"), ("downtime_ms", "downtime")):
            worst = max(median([r for r in runs[k] if r["passed"]], key) for k in emu)
            print(f"live_migration_{label}_emu_over_qsd {worst / median(qsd_ok, key):.2f} ratio")
        print(f"live_migration_runs_passed_qsd {len(qsd_ok)} runs")
    print(f"live_migration_runs_passed_emu {passed} runs")
    print(f"live_migration_runs_emu {sum(len(runs[k]) for k in emu)} runs")


if __name__ == "__main__":
    main()
