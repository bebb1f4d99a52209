"""What the host reads from a guest console: the markers /init prints (init_script.py).

Markers are searched anywhere in a line because kernel messages on a serial console can
land in front of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MARKER = re.compile(r"EMU-(INIT-START|STEP|RESULT|DEV|BENCH|WARN|DONE)\b ?(.*)")


@dataclass
class ConsoleLog:
    """Everything the markers said so far; `feed` one console line at a time."""

    started: bool = False
    rc: int | None = None  # from EMU-DONE; None until /init finished
    steps: list[str] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    bench: dict[str, tuple[float, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        """Records the line's marker, if any, and returns its kind (e.g. "DONE")."""
        m = _MARKER.search(line.rstrip("\r\n"))
        if not m:
            return None
        kind, rest = m.group(1), m.group(2).strip()
        if kind == "INIT-START":
            self.started = True
        elif kind == "STEP":
            self.steps.append(rest)
        elif kind == "RESULT":
            key, _, value = rest.partition(" ")
            self.results[key] = value
        elif kind == "DEV":
            name, *pairs = rest.split()
            self.devices[name] = dict(p.split("=", 1) for p in pairs if "=" in p)
        elif kind == "BENCH":
            name, value, unit = rest.split(maxsplit=2)
            self.bench[name] = (float(value), unit)
        elif kind == "WARN":
            self.warnings.append(rest)
        elif kind == "DONE":
            self.rc = int(rest.removeprefix("rc="))
        return kind
