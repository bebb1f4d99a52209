"""The report's PNG plots, drawn by matplotlib without a display (the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def stop_by_depth(rows: list[dict], path: Path) -> str:
    """(a) p50 stop latency against depth, one line per interface and policy."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    series = sorted({(r["interface"], r["policy"]) for r in rows})
    colours = {i: f"C{n}" for n, i in enumerate(sorted({i for i, _ in series}))}
    for iface, policy in series:
        pts = sorted(
            (r["depth"], r["p50_us"])
            for r in rows
            if (r["interface"], r["policy"]) == (iface, policy)
        )
        style = "-" if policy == "report" else "--"
        ax.plot(
            [d for d, _ in pts],
            [v for _, v in pts],
            style,
            color=colours[iface],
            marker="o",
            label=f"{iface}, {policy}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("requests outstanding at the stop (queue depth)")
    ax.set_ylabel("stop latency p50 (us, log)")
    backend = rows[0]["backend"] if rows else ""
    ax.set_title(f"(a) stop latency by interface, reads on {backend}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def drain_vs_report(rows: list[dict], interface: str, path: Path) -> str:
    """(b) p50 stop latency against the NBD backend's latency, reads and writes apart."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    nbd = [r for r in rows if r["backend"].startswith("nbd") and r["interface"] == interface]
    for ax, op in zip(axes, ("read", "write"), strict=True):
        for policy, style in (("drain", "--"), ("report", "-")):
            pts = sorted(
                (r["latency_ms"], r["p50_us"])
                for r in nbd
                if (r["op"], r["policy"]) == (op, policy)
            )
            ax.plot(
                [x for x, _ in pts], [y / 1000 for _, y in pts], style, marker="o", label=policy
            )
        ax.set_title(f"{op}s outstanding")
        ax.set_xlabel("NBD backend latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("stop latency p50 (ms)")
    fig.suptitle(f"(b) drain vs report, {interface} stop")
    return _save(fig, path)


def downtime(rows: list[dict], interface: str, path: Path) -> str:
    """(b) the device's share of a migration's downtime (model) against latency."""
    fig, ax = plt.subplots(figsize=(8, 4.4))
    nbd = [r for r in rows if r["backend"].startswith("nbd") and r["interface"] == interface]
    for op, marker in (("read", "o"), ("write", "s")):
        for policy, style in (("drain", "--"), ("report", "-")):
            pts = sorted((r["latency_ms"], r[f"{policy}_us"]) for r in nbd if r["op"] == op)
            ax.plot(
                [x for x, _ in pts],
                [y / 1000 for _, y in pts],
                style,
                marker=marker,
                label=f"{op}s, {policy}",
            )
    ax.set_xlabel("NBD backend latency (ms)")
    ax.set_ylabel("modelled device downtime (ms)")
    ax.set_title("(b) MODEL: stop + save + restore of one blk device")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def state_bytes(devices: list[dict], categories: list[str], path: Path) -> str:
    """(c) bytes of each device's state by category, stacked."""
    fig, ax = plt.subplots(figsize=(9, 6))
    names = [d["device"] for d in devices]
    left = [0] * len(devices)
    for cat in categories:
        vals = [d["bytes"][cat] for d in devices]
        if any(vals):
            ax.barh(names, vals, left=left, label=cat)
            left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("bytes in the state file")
    ax.set_title("(c) device state by what carries it")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    return _save(fig, path)
