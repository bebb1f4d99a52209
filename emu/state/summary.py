"""``emu state show``: a state file in a screenful, for people.

What a reader of a snapshot asks first: which device, what the driver negotiated (in
words), the status bits, where each queue stands (size, ring format, next avail and used
index, the chains in flight by head), the device's own state in a line or a few (a
disk's capacity, a file system's nodes and open handles, a vsock's connections, a
balloon's pages), and what the file is made of (format version, parts and their bytes).
``--json`` prints everything; ``--breakdown`` every part and field with its bytes.

The device lines are keyed by virtio device id, as the spec numbers them (the state
layer does not import the devices); a device type without its own lines, or whose part
has a shape they do not expect, gets its fields listed generically.
"""

from __future__ import annotations

import base64
import binascii
import json
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from emu.state.breakdown import DIGEST_BYTES, HEADER_BYTES
from emu.state.format import FORMAT_VERSION
from emu.state.names import feature_words, status_words
from emu.state.text import cut, printable
from emu.state.view import PartInfo, Queue, View

WIDTH = 100
_LABEL = 11
#: in-flight heads listed per queue before the rest is counted
_HEADS = 16
#: connections, ports listed before the rest is counted
_ROWS = 8
#: a value from a part without a schema is cut to this many characters
_CELL = 40
#: a name or path (port name, socket path, tag) is cut to this many characters
_NAME = 100
#: virtio-blk capacity and balloon page counts are in these units, whatever the device
SECTOR = 512
BALLOON_PAGE = 4096


def summary(v: View, device_names: Mapping[int, str] | None = None) -> list[str]:
    """The lines ``emu state show`` prints; ``device_names``: virtio id -> emu's name."""
    name = (device_names or {}).get(v.device_type)
    what = f"{name} device" if name else "device"
    out = [
        f"{what} (virtio device type {v.device_type}), state format {FORMAT_VERSION}, "
        f"{v.size} bytes in {len(v.parts)} parts"
    ]
    out += _features(v)
    if v.status is not None:
        words = " ".join(status_words(v.status)) or "(no bits set)"
        out += _row("status", f"{v.status:#04x} {words}")
    if isinstance(v.transport, dict):
        out += _row("transport", _transport(v.transport))
    out += _queues(v)
    if v.device is not None:
        out += _device(v.device_type, v.device)
    out += _parts(v.parts)
    return out


def _row(label: str, text: str) -> list[str]:
    return textwrap.wrap(
        printable(text),
        WIDTH,
        initial_indent=f"{label:<{_LABEL}}",
        subsequent_indent=" " * (_LABEL + 2),
        break_on_hyphens=False,
    ) or [label]


def _size(n: int) -> str:
    """Bytes in binary units, as people say them (64 KiB, 1.5 GiB)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


def _plural(n: int, word: str, words: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def _features(v: View) -> list[str]:
    if v.acked is not None:
        out = _row(
            "features",
            f"negotiated {v.acked:#x}: {' '.join(feature_words(v.acked, v.device_type)) or '-'}",
        )
        if v.offered is not None and v.offered & ~v.acked:
            spare = feature_words(v.offered & ~v.acked, v.device_type)
            out += _row("", f"offered, not taken: {' '.join(spare)}")
        return out
    if v.offered is not None:
        words = " ".join(feature_words(v.offered, v.device_type)) or "-"
        return _row("features", f"offered {v.offered:#x}: {words} (no driver features)")
    return []


def _short(value: Any) -> str:
    """A value from a part no schema checked (TRANSPORT, an unknown device): any JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _CELL else f"{text[: _CELL - 3]}..."


def _quoted(text: str) -> str:
    """A name or path from the file, quoted and cut: a schema lets some be 64 KiB long."""
    return cut(repr(text), _NAME)


def _hex(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return cut(f"{value:#x}", _CELL)
    return _short(value)


def _transport(t: dict) -> str:
    text = f"{_short(t.get('transport', '?'))} version {_short(t.get('version', '?'))}"
    if t.get("vmm_stopped") is True:
        text += ", stopped by the VMM"
    if t.get("guest_stop_pending") is True:
        text += ", a guest stop pending"
    if "interrupt_status" in t:
        text += f", interrupt status {_hex(t['interrupt_status'])}"
    if "config_generation" in t:
        text += f", config generation {_short(t['config_generation'])}"
    if "features" in t:  # vhost-user: what the frontend negotiated on the socket
        text += f", vhost-user features {_hex(t['features'])}, protocol {_hex(t.get('protocol'))}"
    if isinstance(t.get("bases"), dict):
        text += f", ring bases of {_plural(len(t['bases']), 'queue')}"
    return text


def _queues(v: View) -> list[str]:
    if not v.queues:
        return _row("queues", "none set up")
    out = _row("queues", f"{len(v.queues)}, {'packed' if v.packed else 'split'} ring format")
    for q in v.queues.values():
        out += _row("", f"{q.index}: {_queue(q, v.packed)}")
    return out


def _queue(q: Queue, packed: bool) -> str:
    bits = []
    if q.config is not None:
        state = "enabled" if q.config["enabled"] else "disabled"
        bits.append(f"size {q.config['size']}, {state}")
    if q.ring is None:
        bits.append("not running (no ring state)")
    else:
        r = q.ring
        if packed:
            pos = (
                f"next avail {r['next_avail']} (wrap {int(r['avail_wrap'])}), "
                f"used {r['next_used']} (wrap {int(r['used_wrap'])})"
            )
        else:
            pos = f"next avail {r['next_avail']}, used {r['next_used']}"
        bits.append(f"{pos}, signalled {r['signalled_used']}")
    if q.inflight is not None:
        heads = [str(c["head"]) for c in q.inflight]
        if not heads:
            bits.append("nothing in flight")
        else:
            more = f" (+{len(heads) - _HEADS} more)" if len(heads) > _HEADS else ""
            bits.append(f"{len(heads)} in flight: heads {' '.join(heads[:_HEADS])}{more}")
    return "; ".join(bits)


def _device(device_type: int, d: Any) -> list[str]:
    lines = None
    describe = _DEVICES.get(device_type)
    if describe is not None and isinstance(d, dict):
        try:
            lines = describe(d)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            lines = None  # a shape these lines do not know: list the fields instead
    if lines is None:
        lines = [_generic(d)]
    out = _row("device", lines[0])
    for line in lines[1:]:
        out += _row("", line)
    return out


def _generic(d: Any) -> str:
    if not isinstance(d, dict):
        return f"{type(d).__name__} value"
    if not d:
        return "no device state"
    bits = []
    for k, v in d.items():
        if isinstance(v, list):
            bits.append(f"{k}: {_plural(len(v), 'entry', 'entries')}")
        elif isinstance(v, dict):
            bits.append(f"{k}: {_plural(len(v), 'field')}")
        else:
            bits.append(f"{k} {_short(v)}")
    return ", ".join(bits)


def _blk(d: dict) -> list[str]:
    serial = bytes.fromhex(d["serial"]).rstrip(b"\0").decode("ascii", "replace")
    return [
        f"capacity {d['capacity']} sectors ({_size(d['capacity'] * SECTOR)}), block size "
        f"{d['block_size']}, {'read-only' if d['readonly'] else 'read-write'}, "
        f"{_plural(d['num_queues'], 'queue')}, seg_max {d['seg_max']}, serial {_quoted(serial)}, "
        f"{'write-back' if d['writeback'] else 'write-through'} cache"
    ]


def _net(d: dict) -> list[str]:
    mac = ":".join(_short(d["mac"][i : i + 2]) for i in range(0, 12, 2))
    modes = [k for k, on in d["rx_mode"].items() if on] or ["default"]
    vlans = "no VLAN filter" if d["vlans"] is None else f"{_plural(len(d['vlans']), 'VLAN')}"
    waiting = sum(len(frames) for frames in d["backlog"])
    stats = d["stats"]
    return [
        f"mac {mac}, link {'up' if d['status'] & 1 else 'down'}, "
        f"{d['active_pairs']} queue pair(s) active, rx mode {' '.join(modes)}, "
        f"{len(d['uni'])} unicast and {len(d['multi'])} multicast filter entries, {vlans}",
        f"frames waiting for the guest {waiting}, in the inbox {len(d['inbox'])}; "
        f"so far tx {stats['tx_frames']} rx {stats['rx_frames']} frames",
    ]


def _console(d: dict) -> list[str]:
    ports = d["ports"]
    out = [
        f"{d['cols']}x{d['rows']}, {len(ports)} of {d['max_ports']} ports, "
        f"{len(d['ctrl_out'])} control messages waiting"
    ]
    return out + _rows(ports, _port, "ports")


def _port(p: dict) -> str:
    name = f" {_quoted(p['name'])}" if p["name"] else ""
    return (
        f"port {p['id']}{name}: {'open' if p['guest_open'] else 'closed'} in the guest, "
        f"{'open' if p['host_open'] else 'closed'} on the host, "
        f"{len(base64.b64decode(p['input']))} bytes of input waiting"
    )


def _rows(items: list[dict], line: Callable[[dict], str], what: str) -> list[str]:
    """A line per item, the first ``_ROWS`` of them: a summary stays a screen long."""
    out = [line(x) for x in items[:_ROWS]]
    if len(items) > _ROWS:
        out.append(f"(+{len(items) - _ROWS} more {what})")
    return out


def _balloon(d: dict) -> list[str]:
    return [
        f"target {d['target']} pages ({_size(d['target'] * BALLOON_PAGE)}), actual "
        f"{d['actual']} pages ({_size(d['actual'] * BALLOON_PAGE)}), "
        f"{_plural(len(d['stats']), 'statistic')} from the guest"
    ]


def _vsock(d: dict) -> list[str]:
    conns = d["dropped"]
    out = [
        f"guest cid {d['guest_cid']}, host sockets {_quoted(d['uds'])}, buffer {d['buf_alloc']} "
        f"bytes; {_plural(len(conns), 'connection')} at the save"
        + (" (they do not move: the guest sees them reset)" if conns else "")
    ]
    return out + _rows(conns, _conn, "connections")


def _conn(c: dict) -> str:
    return (
        f"{_short(c['type'])} port {c['local_port']} <-> {c['peer_port']}, "
        f"{_short(c['state'])}, opened by the {'guest' if c['by_guest'] else 'host'}, "
        f"{c['held_bytes']} bytes held"
    )


def _fs(d: dict) -> list[str]:
    s = d["session"]
    session = (
        "no FUSE session yet"
        if s is None
        else f"FUSE 7.{s['minor']} session, max write {_size(s['max_write'])}"
    )
    directory = d["dir"]
    withheld = sum(len(v) for v in d["replied"].values())
    return [
        f"tag {_quoted(d['tag'])}, {_plural(d['num_request_queues'], 'request queue')}, "
        f"{'read-only' if d['readonly'] else 'read-write'}, {session}",
        f"{_plural(len(directory.get('nodes', [])), 'node')}, "
        f"{_plural(len(directory.get('handles', [])), 'open handle')}, "
        f"{_plural(withheld, 'answer')} withheld by the stop",
    ]


def _rng(d: dict) -> list[str]:
    return [_generic(d)]


#: virtio device id -> its lines
_DEVICES: dict[int, Callable[[dict], list[str]]] = {
    1: _net,
    2: _blk,
    3: _console,
    4: _rng,
    5: _balloon,
    19: _vsock,
    26: _fs,
}


def _parts(infos: list[PartInfo]) -> list[str]:
    out: list[str] = []
    for standard, label in ((True, "virtio 1.4"), (False, "emu extension")):
        group = [p for p in infos if p.standard == standard]
        if not group:
            continue
        entries: dict[str, list[PartInfo]] = {}
        for p in group:
            key = p.name + (f" {p.version}" if p.version else "") + ("?" if p.optional else "")
            key += "" if p.understood else " (skipped)"
            entries.setdefault(key, []).append(p)
        text = ", ".join(
            f"{key}{f' x{len(ps)}' if len(ps) > 1 else ''} {sum(p.size for p in ps)}"
            for key, ps in entries.items()
        )
        total = sum(p.size for p in group)
        out += _row("parts" if not out else "", f"{label}: {text} ({total} bytes)")
    out += _row(
        "" if out else "parts",
        f"container {HEADER_BYTES + DIGEST_BYTES} (header, sha256); a part's bytes include "
        "its 16-byte header; ? marks an optional part",
    )
    return out
