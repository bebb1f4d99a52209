"""Run the four experiments and write the report: report.md, report.html, the PNG plots,
results.json (everything) and one CSV per table, all in one directory."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from emu.debate import conclude, plots, policies, restore, state, stops
from emu.debate import doc as d

EXPERIMENTS: dict[str, Callable[[bool], dict]] = {
    "stops": stops.run,
    "policies": policies.run,
    "state": state.run,
    "restore": restore.run,
}

INTRO = (
    "In July 2021 a virtio-comment thread (shared/seed/) argued over a STOP status bit: a "
    "device that stops with requests still in flight and reports them, against an admin "
    "queue and against draining; and whether device state can be standard or must be "
    "implementation-specific. virtio 1.4 later adopted SUSPEND, which drains, and device "
    "parts that carry features, status and queue configuration. This report answers the "
    "thread's questions with figures measured on emu, which implements all of it."
)


def machine() -> dict:
    """Where the figures come from (they depend on it)."""
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=platform.node(),
        kernel=platform.release(),
        python=platform.python_version(),
        cpus=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )


def collect(quick: bool) -> dict:
    """Every experiment's results, with the machine and each one's runtime."""
    results: dict = dict(quick=quick, machine=machine(), runtime_s={})
    for name, run in EXPERIMENTS.items():
        t0 = time.monotonic()
        results[name] = run(quick)
        results["runtime_s"][name] = round(time.monotonic() - t0, 1)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _csv(path: Path, rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _flat(v) for k, v in r.items()})
    return path.name


def _flat(v: object) -> object:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list | dict):
        return json.dumps(v, sort_keys=True)
    return v


def _state_rows(c: dict) -> list[dict]:
    return [
        dict(device=dev["device"], category=cat, bytes=dev["bytes"][cat], fields=dev["fields"][cat])
        for dev in c["devices"]
        for cat in c["categories"]
        if dev["bytes"][cat]
    ]


def write(results: dict, out: Path) -> dict[str, Path]:
    """Every file of the report in ``out``; their paths by role."""
    out.mkdir(parents=True, exist_ok=True)
    a, b, c, dd = (results[k] for k in EXPERIMENTS)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    tables = {
        "a_stop_by_depth.csv": a["by_depth"],
        "a_many_devices.csv": a["many_devices"],
        "b_stops.csv": b["stops"],
        "b_write_fence.csv": b["fence"],
        "b_downtime_model.csv": b["downtime"],
        "c_state.csv": _state_rows(c),
        "d_restore.csv": dd["checks"],
    }
    csvs = [_csv(out / name, rows) for name, rows in tables.items()]
    pngs = {
        "a": plots.stop_by_depth(a["by_depth"], out / "a_stop_by_depth.png"),
        "b": plots.drain_vs_report(b["stops"], "vmm", out / "b_drain_vs_report.png"),
        "b_down": plots.downtime(b["downtime"], "vmm", out / "b_downtime_model.png"),
        "c": plots.state_bytes(c["devices"], c["categories"], out / "c_state_bytes.png"),
    }
    blocks = _blocks(results, pngs, csvs)
    (out / "report.md").write_text(d.markdown(blocks))
    (out / "report.html").write_text(d.page("emu bench debate", blocks))
    return {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "json": out / "results.json",
        **{name: out / png for name, png in pngs.items()},
    }


def _question(module: object) -> str:
    """The paragraph of an experiment's docstring that says which question it answers."""
    paragraphs = (getattr(module, "__doc__", None) or "").split("\n\n")
    return paragraphs[1].replace("\n", " ") if len(paragraphs) > 1 else ""


def _us(x: float) -> str:
    return f"{x:.0f}"


def _blocks(r: dict, pngs: dict[str, str], csvs: list[str]) -> list[d.Block]:
    a, b, c, dd = (r[k] for k in EXPERIMENTS)
    m = r["machine"]
    run = "quick run (--quick)" if r["quick"] else "full run"
    blocks: list[d.Block] = [
        d.Heading("emu bench debate: the STOP thread, answered with numbers", 1),
        d.Para(INTRO),
        d.Para(
            f"{run.capitalize()} on {m['host']} ({m['cpus']} CPUs, Linux {m['kernel']}, "
            f"Python {m['python']}), {m['date']}; load average {m['load_average'][0]} before, "
            f"{m['load_average_after'][0]} after. Runtime per experiment (s): "
            + ", ".join(f"{k} {v}" for k, v in r["runtime_s"].items())
            + ". Latencies are in microseconds unless marked; p50 is the median, p99 the "
            "nearest-rank 99th percentile (with few samples: the worst). Figures from a "
            "machine shared with other work carry its scheduling delays, mostly in the p99s."
        ),
        d.Heading("(a) Stop latency by interface and queue depth"),
        d.Para(_question(stops)),
        d.Image(pngs["a"], "stop latency against depth"),
        d.Table(
            ["interface", "policy", "depth", "at engine", "p50", "p99", "n"],
            [
                [
                    x["interface"],
                    x["policy"],
                    str(x["depth"]),
                    f"{x['at_engine']:.0f}",
                    _us(x["p50_us"]),
                    _us(x["p99_us"]),
                    str(x["n"]),
                ]
                for x in a["by_depth"]
            ],
        ),
        d.Table(
            ["devices", "depth each", "policy", "order", "p50", "p99"],
            [
                [
                    str(x["devices"]),
                    str(x["depth"]),
                    x["policy"],
                    x["order"],
                    _us(x["p50_us"]),
                    _us(x["p99_us"]),
                ]
                for x in a["many_devices"]
            ],
        ),
        d.Heading("Conclusion (a)", 3),
        d.Bullets(conclude.stops(a)),
        d.Heading("(b) Drain vs report as backend latency grows"),
        d.Para(_question(policies)),
        d.Image(pngs["b"], "drain vs report against backend latency"),
        d.Table(
            ["backend", "interface", "op", "policy", "at engine", "p50", "p99"],
            [
                [
                    x["backend"],
                    x["interface"],
                    x["op"],
                    x["policy"],
                    f"{x['at_engine']:.0f}",
                    _us(x["p50_us"]),
                    _us(x["p99_us"]),
                ]
                for x in b["stops"]
            ],
        ),
        d.Para(
            "The write fence: a report stop's median with writes outstanding minus with reads "
            "outstanding, same backend and depth."
        ),
        d.Table(
            ["backend", "interface", "report, reads", "report, writes", "fence"],
            [
                [
                    x["backend"],
                    x["interface"],
                    _us(x["report_read_p50_us"]),
                    _us(x["report_write_p50_us"]),
                    _us(x["fence_us"]),
                ]
                for x in b["fence"]
            ],
        ),
        d.Para(
            "MODEL (not a measured migration): the device's share of a stop-and-copy "
            f"downtime = measured stop p50 + save ({_us(b['state_cost']['save_us'])} us) + "
            f"restore ({_us(b['state_cost']['restore_us'])} us) of a {b['state_cost']['bytes']}"
            "-byte blk state. The RAM's final pass and the VMM's own work are left out: they "
            "do not depend on the policy."
        ),
        d.Image(pngs["b_down"], "modelled downtime against backend latency"),
        d.Table(
            ["backend", "interface", "op", "drain", "report", "report saves"],
            [
                [
                    x["backend"],
                    x["interface"],
                    x["op"],
                    _us(x["drain_us"]),
                    _us(x["report_us"]),
                    _us(x["saved_us"]),
                ]
                for x in b["downtime"]
            ],
        ),
        d.Heading("Conclusion (b)", 3),
        d.Bullets(conclude.policies(b)),
        d.Heading("(c) What carries each device's state"),
        d.Para(_question(state)),
        d.Image(pngs["c"], "state bytes per device by category"),
        d.Table(
            ["device", "category", "bytes", "parts / fields"],
            [
                [x["device"], x["category"], str(x["bytes"]), ", ".join(x["fields"])]
                for x in _state_rows(c)
            ],
        ),
        d.Table(
            ["device", "total bytes", "chains in flight", "held on the host", "outside the state"],
            [
                [
                    x["device"],
                    str(x["total_bytes"]),
                    str(x["inflight_chains"]),
                    ", ".join(f"{n} {k}" for k, n in x["host"].items()) or "-",
                    x["outside"],
                ]
                for x in c["devices"]
            ],
        ),
        d.Heading("Conclusion (c)", 3),
        d.Bullets(conclude.state(c)),
        d.Heading("(d) Cross-implementation restore"),
        d.Para(_question(restore)),
        d.Table(
            ["check", "ring", "result", "what was checked"],
            [
                [
                    x["check"],
                    x["ring"],
                    "pass" if x["passed"] else "FAIL",
                    x["checked"] + "".join(f" (note: {n})" for n in x["notes"]),
                ]
                for x in dd["checks"]
            ],
        ),
        d.Heading("Conclusion (d)", 3),
        d.Bullets(conclude.restore(dd)),
        d.Heading("Raw figures"),
        d.Para("results.json holds every figure; the tables as CSV: " + ", ".join(csvs) + "."),
    ]
    return blocks
