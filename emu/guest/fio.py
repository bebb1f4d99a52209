"""fio in a guest: jobs as kernel arguments for /init's `fio` workload, its JSON report back.

The workload (init_script.py) runs Debian's fio on the guest's virtio-blk disk with
O_DIRECT and prints fio's `--output-format=json` report between EMU-FIO-JSON-BEGIN and
EMU-FIO-JSON-END on the console; `run_fio` boots a guest with it and parses that report.
Several jobs run one after another in one boot (fio's stonewall), each reported under its
own name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from emu.guest.run import DeviceSpec, GuestResult, run_guest

BEGIN, END = "EMU-FIO-JSON-BEGIN", "EMU-FIO-JSON-END"
IOENGINES = ("libaio", "io_uring", "psync")
_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")


class FioError(RuntimeError):
    """The guest gave no fio report, or a job in it failed."""


@dataclass(frozen=True)
class FioJob:
    """One fio job; None leaves the workload's default (emu.fio.<knob> or /init's)."""

    name: str
    rw: str | None = None  # read write randread randwrite rw randrw
    bs: str | None = None  # e.g. 4k, 1m
    iodepth: int | None = None
    numjobs: int | None = None
    size: str | None = None  # bytes of the disk each job covers, e.g. 64m
    ioengine: str | None = None  # libaio io_uring psync
    runtime: int | None = None  # seconds, time based; 0: until `size` is done

    def options(self) -> dict[str, str]:
        opts = {
            k: str(v)
            for k, v in vars(self).items()
            if k not in ("name", "runtime") and v is not None
        }
        if self.ioengine is not None and self.ioengine not in IOENGINES:
            raise ValueError(f"fio job {self.name}: ioengine {self.ioengine!r} not in {IOENGINES}")
        if self.runtime:
            opts |= {"time_based": "1", "runtime": str(self.runtime)}
        for key, value in [("name", self.name), *opts.items()]:
            if not _VALUE.fullmatch(value):
                raise ValueError(f"fio job {self.name}: {key}={value!r} cannot be passed")
        return opts


def kernel_params(jobs: Iterable[FioJob], **defaults: object) -> dict[str, str]:
    """run_guest params: `defaults` as emu.fio.<knob> for every job, then the jobs."""
    params = {f"fio.{k}": str(v) for k, v in defaults.items()}
    specs = []
    for job in jobs:
        specs.append(":".join([job.name, *(f"{k}={v}" for k, v in job.options().items())]))
    if specs:
        params["fio.jobs"] = "/".join(specs)
    return params


@dataclass(frozen=True)
class Side:
    """One direction (read or write) of a job's results."""

    io_bytes: int
    ios: int  # requests completed
    iops: float
    bw_bytes: float  # bytes per second
    lat_mean_us: float
    lat_p99_us: float

    @classmethod
    def parse(cls, d: Mapping) -> Side:
        clat = d.get("clat_ns", {})
        p99 = clat.get("percentile", {}).get("99.000000", 0.0)
        return cls(
            io_bytes=int(d["io_bytes"]),
            ios=int(d["total_ios"]),
            iops=float(d["iops"]),
            bw_bytes=float(d["bw_bytes"]),
            lat_mean_us=float(d.get("lat_ns", {}).get("mean", 0.0)) / 1e3,
            lat_p99_us=float(p99) / 1e3,
        )


@dataclass(frozen=True)
class JobResult:
    name: str
    error: int
    read: Side
    write: Side
    runtime_ms: int


@dataclass
class FioResult:
    guest: GuestResult
    report: dict  # fio's JSON, as it printed it
    jobs: dict[str, JobResult] = field(default_factory=dict)


def parse_report(console: str) -> dict:
    """fio's JSON from a guest console (the text between the markers, from the first '{')."""
    lines = console.replace("\r", "").split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.endswith(BEGIN))
        end = next(i for i in range(start, len(lines)) if lines[i].endswith(END))
    except StopIteration:
        raise FioError("no fio report on the console") from None
    text = "\n".join(lines[start + 1 : end])
    brace = text.find("{")
    if brace < 0:
        raise FioError("the fio report is empty")
    try:
        return json.loads(text[brace:])
    except ValueError as e:
        raise FioError(f"the fio report is not JSON ({e})") from None


def jobs_of(report: Mapping) -> dict[str, JobResult]:
    out = {}
    for job in report.get("jobs", []):
        out[job["jobname"]] = JobResult(
            name=job["jobname"],
            error=int(job.get("error", 0)),
            read=Side.parse(job["read"]),
            write=Side.parse(job["write"]),
            runtime_ms=int(job.get("job_runtime", 0)),
        )
    return out


def run_fio(
    kind: str,
    devices: Iterable[DeviceSpec],
    jobs: Iterable[FioJob],
    *,
    timeout: float = 300.0,
    **kwargs,
) -> FioResult:
    """Boots `kind` with `devices` (the disk first), runs `jobs` and returns fio's report.

    kwargs go to run_guest (e.g. mem_mib, image). Raises FioError when the guest gave no
    report or fio or a job failed, with the console's tail.
    """
    params = kernel_params(jobs)
    res = run_guest(kind, devices, ["fio"], params=params, timeout=timeout, **kwargs)
    try:
        report = parse_report(res.console)
    except FioError as e:
        raise FioError(f"{e}; guest rc {res.rc}:\n{res.console[-3000:]}") from None
    result = FioResult(res, report, jobs_of(report))
    failed = [j.name for j in result.jobs.values() if j.error]
    if failed or not res.ok:
        warnings = "\n".join(res.log.warnings[-20:])
        raise FioError(f"fio failed (rc {res.rc}, jobs with errors {failed}):\n{warnings}")
    return result
