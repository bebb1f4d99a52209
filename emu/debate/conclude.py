"""The conclusion of each question, written from the measured figures.

Nothing here is a fixed claim: every sentence takes its numbers, and the words that
compare them ("less", "more", "about the same"), from the results, so a run where the
figures turn the other way says so.
"""

from __future__ import annotations

from emu.debate import state as st

#: two figures within this factor of each other are "about the same"
SAME = 1.5


def us(x: float) -> str:
    """A duration in microseconds, in the unit that reads best."""
    if abs(x) >= 1000:
        return f"{x / 1000:.1f} ms"
    return f"{x:.0f} us"


def compare(a: float, b: float) -> str:
    """How duration ``a`` stands to ``b``: "N times faster than", "N times slower than"
    or "about as fast as"."""
    if a <= 0 or b <= 0 or max(a, b) / min(a, b) < SAME:
        return "about as fast as"
    ratio = max(a, b) / min(a, b)
    times = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
    return f"{times} times {'faster' if a < b else 'slower'} than"


def _cell(rows: list[dict], **match: object) -> dict:
    for r in rows:
        if all(r[k] == v for k, v in match.items()):
            return r
    raise KeyError(match)


def stops(a: dict) -> list[str]:
    rows = a["by_depth"]
    depth = max(r["depth"] for r in rows)
    backend = rows[0]["backend"]

    def p50(iface: str, policy: str, d: int = depth) -> float:
        return _cell(rows, interface=iface, policy=policy, depth=d)["p50_us"]

    bit_report = us(p50("stop-bit", "report"))
    out = [
        f"With {depth} reads outstanding on {backend}, a report stop took {bit_report}"
        f" through the STOP bit, {us(p50('vmm', 'report'))} as a VMM stop and "
        f"{us(p50('vhost-user', 'report'))} through vhost-user GET_VRING_BASE; a drain stop took "
        f"{us(p50('stop-bit', 'drain'))}, {us(p50('vmm', 'drain'))} and "
        f"{us(p50('vhost-user', 'drain'))}, and SUSPEND (which always drains) "
        f"{us(p50('suspend', 'drain'))} (medians)."
    ]
    ifaces = ("stop-bit", "vmm", "vhost-user")
    gaps = [p50(i, "drain") / p50(i, "report") for i in ifaces]
    spread = {
        policy: max(p50(i, policy) for i in ifaces) / min(p50(i, policy) for i in ifaces)
        for policy in ("report", "drain")
    }
    slowest = max(ifaces, key=lambda i: p50(i, "report"))
    verdict = (
        "the policy decides more than the interface"
        if min(gaps) > max(spread.values())
        else f"the interface decides as much as the policy (slowest report stop: {slowest})"
    )
    out.append(
        f"At depth {depth}, within one interface a drain stop took {min(gaps):.1f} to "
        f"{max(gaps):.1f} times as long as a report stop; within one policy the interfaces "
        f"differ by up to {spread['report']:.1f} times (report) and {spread['drain']:.1f} "
        f"times (drain): {verdict}."
    )
    bit0, vmm0 = p50("stop-bit", "report", 0), p50("vmm", "report", 0)
    verdict = (
        "the register interface and its polling add little of their own"
        if compare(bit0, vmm0).startswith("about")
        else f"the STOP bit and its polling were {compare(bit0, vmm0)} the VMM stop"
    )
    out.append(
        f"With nothing outstanding the STOP bit took {us(bit0)} and the VMM stop {us(vmm0)}: "
        f"{verdict}."
    )
    out.append(
        f"SUSPEND was {compare(p50('suspend', 'drain'), p50('stop-bit', 'drain'))} the STOP "
        f"bit under drain at depth {depth} ({us(p50('suspend', 'drain'))} against "
        f"{us(p50('stop-bit', 'drain'))}); both wait for the same requests."
    )
    for policy in ("drain", "report"):
        seq = _cell(a["many_devices"], policy=policy, order="one after another")
        tog = _cell(a["many_devices"], policy=policy, order="all at once")
        ratio = seq["p50_us"] / tog["p50_us"]
        how = compare(seq["p50_us"], tog["p50_us"])
        if ratio >= SAME:
            verdict = "stopping them in turn stretched the stop"
        elif not how.startswith("about"):  # in turn was the faster: say so, not "as much"
            verdict = f"stopping them in turn was {how} all at once"
        elif policy == "drain":
            verdict = (
                "stopping them in turn cost about as much as all at once: their requests were "
                "outstanding at every device already, so the drains overlapped"
            )
        else:
            verdict = "stopping them in turn cost about as much as all at once"
        out.append(
            f"{seq['devices']} devices with {seq['depth']} requests each, {policy}: one after "
            f"another {us(seq['p50_us'])}, all at once {us(tog['p50_us'])} ({ratio:.1f}x); "
            f"{verdict}."
        )
    return out


def policies(b: dict) -> list[str]:
    rows, fence, down = b["stops"], b["fence"], b["downtime"]
    iface = "vmm"
    nbd = sorted({r["latency_ms"] for r in rows if r["backend"].startswith("nbd")})
    top = max(nbd)
    name = f"nbd{top:g}ms"

    def p50(backend: str, op: str, policy: str) -> float:
        return _cell(rows, backend=backend, op=op, policy=policy, interface=iface)["p50_us"]

    rr, rd = p50(name, "read", "report"), p50(name, "read", "drain")
    wr, wd = p50(name, "write", "report"), p50(name, "write", "drain")
    f = _cell(fence, backend=name, interface=iface)["fence_us"]
    share = f", {100 * f / (top * 1000):.0f}% of the backend's latency" if top > 0 else ""
    if compare(wr, wd).startswith("about"):
        writes = f"for writes report and drain came out about the same ({us(abs(wr - wd))} apart)."
    elif wr < wd:
        writes = f"for writes report saved {us(wd - wr)}."
    else:
        writes = f"for writes report took {us(wr - wd)} longer than drain."
    out = [
        f"At {top:g} ms backend latency with reads outstanding, a report stop took {us(rr)}: "
        f"{compare(rr, rd)} drain's {us(rd)}.",
        f"With writes outstanding report took {us(wr)} against drain's {us(wd)}: the write "
        f"fence cost {us(f)}{share}, so {writes}",
    ]
    lo = min(nbd)
    low = f"nbd{lo:g}ms"
    out.append(
        _trend("A drain stop with reads outstanding", p50(low, "read", "drain"), rd, lo, top)
        + "; "
        + _trend("a report stop", p50(low, "read", "report"), rr, lo, top)
        + "."
    )
    tr, td = p50("tmpfs", "read", "report"), p50("tmpfs", "read", "drain")
    out.append(
        f"On io_uring over tmpfs (latency near 0) report and drain took {us(tr)} and {us(td)}:"
        f" report was {compare(tr, td)} drain there."
    )
    dr = _cell(down, backend=name, interface=iface, op="read")
    dw = _cell(down, backend=name, interface=iface, op="write")
    cost = b["state_cost"]
    out.append(
        f"MODEL, not a migration: the device's share of the downtime (stop + save + restore) "
        f"at {top:g} ms is {us(dr['drain_us'])} under drain and {us(dr['report_us'])} under "
        f"report with reads in flight, {us(dw['drain_us'])} and {us(dw['report_us'])} with "
        f"writes; saving and restoring the state adds {us(cost['save_us'] + cost['restore_us'])}"
        f" ({cost['bytes']} bytes) either way."
    )
    return out


def _trend(what: str, a: float, b: float, lo: float, top: float) -> str:
    """How ``what`` went from ``a`` at ``lo`` ms of backend latency to ``b`` at ``top``."""
    if b >= a * SAME:
        verb = "grew"
    elif a >= b * SAME:
        verb = "shrank"
    else:
        return f"{what} stayed about the same: {us(a)} at {lo:g} ms, {us(b)} at {top:g} ms"
    return f"{what} {verb} from {us(a)} at {lo:g} ms to {us(b)} at {top:g} ms"


def state(c: dict) -> list[str]:
    devs = c["devices"]
    share = {
        d["device"]: sum(d["bytes"][k] for k in st.STANDARD_CATEGORIES) / d["total_bytes"]
        for d in devs
    }
    lo, hi = min(share, key=share.get), max(share, key=share.get)
    out = [
        f"The virtio 1.4 parts carry {100 * share[lo]:.0f}% ({lo}) to {100 * share[hi]:.0f}% "
        f"({hi}) of a device's state bytes; the rest needs parts of emu's own."
    ]
    vq = [d["bytes"][st.VQ_STATE] for d in devs]
    chains = sum(d["inflight_chains"] for d in devs)
    out.append(
        f"Virtqueue state (ring indexes and the {chains} chains in flight at the report stops) "
        f"took {min(vq)} to {max(vq)} bytes per device; no 1.4 part carries it, because 1.4 "
        "completes every request at the stop instead."
    )
    visible = [d for d in devs if d["bytes"][st.VISIBLE]]
    if visible:
        out.append(
            "Device state the driver sees but no 1.4 part carries: "
            + "; ".join(_fields(d, st.VISIBLE) for d in visible)
            + "."
        )
    for d in devs:
        if d["net_cvq_standard_bytes"] is not None:
            out.append(
                f"{d['device']} is the one device with a 1.4 device part: its filter state in "
                f"the 1.4 encoding (CVQ_CFG parts) takes {d['net_cvq_standard_bytes']} bytes "
                f"against {d['bytes'][st.SPEC_DEVICE]} bytes in emu's JSON."
            )
    impl = sorted((d for d in devs if d["bytes"][st.IMPL]), key=lambda d: -d["bytes"][st.IMPL])
    if impl:
        out.append(
            "Implementation-specific state: " + "; ".join(_fields(d, st.IMPL) for d in impl) + "."
        )
    for d in devs:
        if d["host"]:
            what = ", ".join(f"{k}: {n}" for k, n in d["host"].items())
            out.append(f"{d['device']}: {what}; {d['outside']}.")
    return out


def _fields(dev: dict, category: str) -> str:
    return f"{dev['device']} {dev['bytes'][category]} bytes ({', '.join(dev['fields'][category])})"


def restore(d: dict) -> list[str]:
    checks = d["checks"]
    passed = [c for c in checks if c["passed"]]
    out = [f"{len(passed)} of {len(checks)} cross-implementation restores passed."]
    for c in checks:
        if not c["passed"]:
            out.append(f"Failed: {c['check']} ({c['ring']}): {c['checked']}.")
    notes = sorted({n for c in checks for n in c["notes"]})
    out += [f"Note: {n}." for n in notes]
    return out
