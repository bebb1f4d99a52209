"""virtio-balloon (traditional memory balloon, device id 5): the host asks the guest for
memory, and what the guest gives up is really given back to the host.

Queues (the spec numbers them 0 inflateq, 1 deflateq, 2 statsq, 3 free_page_vq,
4 reporting_vq). FREE_PAGE_HINT is not offered, so queue 3 never exists in the spec's
layout. Linux before 6.11 (UML 6.1 here) numbers the queues it uses consecutively
instead, skipping absent ones: with STATS_VQ its reporting queue is 3, without it 2. The
two layouts never disagree about an index in use, so each queue's role follows from its
index and the negotiated features (``queue_roles``): 0 inflate, 1 deflate, 2 stats
(reporting without STATS_VQ), 3 reporting with STATS_VQ, 4 reporting.

* inflateq / deflateq: each chain is an array of le32 page frame numbers, 4 KiB pages
  whatever the guest's page size. Inflated pages are punched out of guest RAM's backing
  (``GuestMemory.discard``: MADV_REMOVE, a hole in the memfd or file, also the
  frontend's memfd or file over vhost-user), so both emu and the VMM lose them and the
  host gets the memory back; they read as zeros until written again. Deflate needs
  nothing: the guest's next touch faults a fresh page in. Runs of consecutive PFNs are
  punched with one call each. MUST_TELL_HOST is not offered.
* statsq: the driver keeps one buffer of (le16 tag, le64 value) entries in the queue.
  The device reads it and holds the chain; the host asks for fresh figures
  (``request_stats`` / ``stats(refresh=True)``) by giving the chain back, and the driver
  answers with a new buffer. Unknown tags are ignored, as the spec says.
* reporting_vq (PAGE_REPORTING): each chain lists free guest ranges as device-writable
  buffers (Linux adds them as "in" buffers); every whole host page inside them is punched,
  and the chain is used (length 0) so the guest takes the pages back.
* DEFLATE_ON_OOM is offered: the guest may deflate on its own under memory pressure,
  which needs nothing from the device either.

Config: le32 num_pages (the target: the balloon's size in 4 KiB pages, set by the host
through ``set_target``, read-only for the guest) and le32 actual (written by the guest).
A change of the target raises a configuration change notification.

Hostile guests (documented policy, tests/test_balloon_hostile.py):

* needs a reset (DEVICE_NEEDS_RESET): a chain that cannot be read as the spec lays it
  out: inflate / deflate / stats chains with device-writable buffers, reporting chains
  with device-readable ones, a PFN array whose length is not a multiple of 4 or holds
  more than ``MAX_PFNS`` entries, a chain on a queue that has no role (setting one
  up is harmless: QueueNumMax shows all five);
* ignored, with a rate-limited log line and a counter in ``info``: PFNs outside guest
  RAM, duplicate PFNs (punched once), the parts of a reported range outside guest RAM or
  only partly covering a host page, stats entries with unknown tags and bytes past the
  last whole entry or past ``MAX_STATS`` entries. The chain completes as usual.

Nothing is ever punched outside guest RAM: every range goes through
``GuestMemory.discard``, which only releases pages inside a region.

Stop and snapshot: inflate, deflate and reporting chains are idempotent, so a chain a
report stop leaves in flight is simply done again after resume or restore. The held stats
chain stays in flight too and is read again. The snapshot keeps the target, actual and
the last stats (features and rings are the snapshot's standard parts); the counters in
``info`` start again from zero.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from typing import Any

import numpy as np

from emu.devices._chain import Chain, ChainReader, abandoning, chains
from emu.devices.base import DeviceError, VirtioDevice
from emu.devices.registry import Build, DeviceType, Spec, SpecError, register, spec_number
from emu.memory import PAGE_SHIFT, PAGE_SIZE
from emu.queue import Virtqueue
from emu.ringdefs import F_VERSION_1
from emu.state.format import StateError
from emu.state.schema import Int, List, Schema

log = logging.getLogger(__name__)

F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_REPORTING = 5
FEATURES = 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING

INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"
NUM_QUEUES = 5

CONFIG = struct.Struct("<II")  # num_pages, actual
ACTUAL_OFFSET = 4
STAT = struct.Struct("<HQ")  # tag, value
#: stats tags (the spec's 0-9, Linux's 10-15) -> names as Linux prints them
STAT_NAMES = {
    0: "swap-in",
    1: "swap-out",
    2: "major-faults",
    3: "minor-faults",
    4: "free-memory",
    5: "total-memory",
    6: "available-memory",
    7: "disk-caches",
    8: "hugetlb-allocations",
    9: "hugetlb-failures",
    10: "oom-kills",
    11: "alloc-stalls",
    12: "async-scans",
    13: "direct-scans",
    14: "async-reclaims",
    15: "direct-reclaims",
}
#: stats entries read from one buffer at most (Linux 6.1 sends 10)
MAX_STATS = 64
#: PFNs in one inflate / deflate chain at most (16 MiB of pages; Linux sends 256): bounds
#: the work one chain makes the device thread do
MAX_PFNS = 4096
BATCH = 16
U32_MAX = 0xFFFFFFFF


def queue_roles(features: int) -> dict[int, str]:
    """Queue index -> role for a driver that negotiated ``features`` (module docstring:
    the spec's fixed indexes and Linux's consecutive ones, told apart by index)."""
    stats = bool(features >> F_STATS_VQ & 1)
    reporting = bool(features >> F_REPORTING & 1)
    roles = {0: INFLATE, 1: DEFLATE}
    if stats:
        roles[2] = STATS
    if reporting:
        roles[3 if stats else 2] = REPORTING  # consecutive (Linux before 6.11)
        roles[4] = REPORTING  # the spec's index
    return roles


class _Complaints:
    """At most one log line a second about ignored guest input, so a hostile guest cannot
    flood the log; what is held back is counted in the next line."""

    def __init__(self) -> None:
        self._last = -math.inf
        self._held = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._held += 1
            return
        more = f" ({self._held} more ignored since the last line)" if self._held else ""
        log.warning("balloon: " + msg + more, *args)
        self._last, self._held = now, 0


STATE = Schema(
    "balloon state",
    1,
    0,
    {
        "target": Int(0, U32_MAX),
        "actual": Int(0, U32_MAX),
        "stats": List(List(Int(0, (1 << 64) - 1), 2), MAX_STATS),
    },
)


class BalloonDevice(VirtioDevice):
    device_id = 5
    name = "balloon"
    state_schema = STATE

    def __init__(
        self, *, target_pages: int = 0, control: Any = None, queue_max_size: int | None = None
    ) -> None:
        """``control``: a host control (emu.backends.balloon_control) closed with the
        device; it is given the device once made."""
        super().__init__(NUM_QUEUES, FEATURES, queue_max_size)
        self._check_target(target_pages)
        self.num_pages = target_pages
        self.actual = 0
        self._roles: dict[int, str] = {}
        self._complain = _Complaints()
        # stats: the held chain, the host's wish for fresh figures, the last figures
        self._stats_head: int | None = None
        self._stats_wanted = False
        self._stats_skip_first = False
        self._stats: dict[int, int] = {}
        self._stats_time: float | None = None  # monotonic, when the last figures came
        self._stats_seq = 0
        #: guards the figures and ``actual`` for other threads; waiters sleep on it
        self._news = threading.Condition()
        self.counters = dict.fromkeys(
            (
                "inflated_pages",
                "deflated_pages",
                "reported_bytes",
                "released_bytes",
                "ignored_pfns",
                "ignored_bytes",
                "release_errors",
            ),
            0,
        )
        self.control = control
        if control is not None:
            control.attach(self)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        super().close()

    # -- config space --

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``actual`` is writable; byte-wise writes (the legacy way) merge into it."""
        if offset < ACTUAL_OFFSET or offset + size > CONFIG.size:
            super().write_config(offset, size, value)
            return
        shift = 8 * (offset - ACTUAL_OFFSET)
        mask = ((1 << 8 * size) - 1) << shift
        with self._news:
            self.actual = self.actual & ~mask | (value << shift) & mask
            self._news.notify_all()

    # -- the host's side (any thread) --

    def _check_target(self, pages: int) -> None:
        if not 0 <= pages <= U32_MAX:
            raise ValueError(f"balloon target {pages} pages is outside 0..{U32_MAX}")
        ram = self.ram_pages
        if ram is not None and pages > ram:
            raise ValueError(
                f"balloon target {pages} pages is more than the guest's RAM ({ram} pages)"
            )

    @property
    def ram_pages(self) -> int | None:
        """The guest's RAM in 4 KiB pages, once a driver has shared it."""
        mem = self.mem
        return None if mem is None or not mem.regions else mem.size >> PAGE_SHIFT

    def set_target(self, pages: int) -> None:
        """Ask for a balloon of ``pages`` 4 KiB pages (0: give everything back)."""
        self._check_target(pages)
        if pages != self.num_pages:
            self.num_pages = pages
            self.on_config_change()

    def request_stats(self) -> None:
        """Give the held stats buffer back so the driver sends fresh figures."""
        self._stats_wanted = True
        self.wake()

    def stats(self, refresh: bool = False, timeout: float = 1.0) -> dict[str, Any]:
        """The last figures the guest sent, by name; ``refresh`` asks for fresh ones and
        waits up to ``timeout`` for them (``fresh`` says whether they came)."""
        with self._news:
            seq = self._stats_seq
        refresh = refresh and self.has(F_STATS_VQ)
        if refresh:
            self.request_stats()
        with self._news:
            fresh = self._news.wait_for(lambda: self._stats_seq > seq, timeout if refresh else 0)
            named = {STAT_NAMES[t]: v for t, v in sorted(self._stats.items())}
            when = self._stats_time
        age = None if when is None else round(time.monotonic() - when, 3)
        return {"stats": named, "age_s": age, "fresh": bool(fresh)}

    def wait_actual(self, pages: int, timeout: float) -> bool:
        """Wait until the guest reports ``actual == pages`` (tests, bench, demo)."""
        with self._news:
            return self._news.wait_for(lambda: self.actual == pages, timeout)

    def info(self) -> dict[str, Any]:
        mem = self.mem
        try:
            allocated = None if mem is None else mem.allocated()
        except OSError:  # a vhost-user memory table changing under us
            allocated = None
        return {
            "target_pages": self.num_pages,
            "actual_pages": self.actual,
            "ram_pages": self.ram_pages,
            "features": sorted(self._feature_names()),
            "backing_allocated_bytes": allocated,
            **self.counters,
        }

    def _feature_names(self) -> list[str]:
        names = {
            F_STATS_VQ: "stats_vq",
            F_DEFLATE_ON_OOM: "deflate_on_oom",
            F_REPORTING: "page_reporting",
        }
        return [n for bit, n in names.items() if self.has(bit)]

    # -- lifecycle (device thread) --

    def on_activate(self, features: int) -> None:
        self._roles = queue_roles(features)
        self._stats_head = None
        # legacy drivers sent garbage in their first stats buffer (spec: ignore it)
        self._stats_skip_first = not features >> F_VERSION_1 & 1

    def on_reset(self) -> None:
        self._roles = {}
        self._stats_head = None
        self._stats_wanted = False
        with self._news:
            self.actual = 0
            self._news.notify_all()

    def forget_inflight(self, queues: set[int]) -> None:
        """The held stats chain stays in flight; it is handed out (and read) again."""
        if self._stats_head is not None and self._role_index(STATS) in queues:
            self._stats_head = None

    def _role_index(self, role: str) -> int | None:
        return next((i for i, r in self._roles.items() if r == role), None)

    def wants_poll(self, q: Virtqueue) -> bool:
        return (
            self._stats_wanted
            and self._stats_head is not None
            and self._roles.get(q.index) == STATS
        )

    def handle_queue(self, q: Virtqueue) -> None:
        role = self._roles.get(q.index)
        if role is None:
            # set up is harmless (QueueNumMax shows all five); a chain on it is not
            if len(q.pop(1)):
                raise DeviceError(
                    f"balloon: queue {q.index} has no role with the features negotiated"
                )
            return
        serve = {INFLATE: self._inflate, DEFLATE: self._deflate, REPORTING: self._report}
        if role == STATS:
            self._serve_stats(q)
            return
        while True:
            q.set_kicks(False)
            while len(batch := q.pop(BATCH)):
                done = 0
                for c in chains(batch):
                    if abandoning(q):  # report stop: the rest stays in flight, done later
                        break
                    serve[role](c)
                    done += 1
                q.push(batch.heads[:done], [0] * done)
            if not q.set_kicks(True):
                return

    # -- inflate / deflate / reporting --

    def _pfns(self, c: Chain, what: str) -> np.ndarray:
        """The chain's PFNs inside guest RAM, sorted, each once."""
        if c.writable:
            raise DeviceError(f"balloon: {what} chain {c.head} has a device-writable buffer")
        size = c.out_len
        if size % 4 or size > 4 * MAX_PFNS:
            raise DeviceError(
                f"balloon: {what} chain {c.head} holds {size} bytes "
                f"(a multiple of 4, at most {4 * MAX_PFNS})"
            )
        raw = np.frombuffer(ChainReader(self.mem, c).read(size), "<u4")
        pfns = np.unique(raw)
        inside = np.zeros(len(pfns), bool)
        for r in self.mem.regions:
            inside |= (pfns >= -(-r.gpa >> PAGE_SHIFT)) & (pfns < r.end >> PAGE_SHIFT)
        if not inside.all() or len(pfns) < len(raw):
            outside = int(np.count_nonzero(~inside))
            self.counters["ignored_pfns"] += len(raw) - len(pfns) + outside
            self._complain(
                "%s chain %d: %d PFNs outside guest RAM and %d duplicates ignored",
                what,
                c.head,
                outside,
                len(raw) - len(pfns),
            )
        return pfns[inside]

    def _inflate(self, c: Chain) -> None:
        pfns = self._pfns(c, INFLATE)
        self.counters["inflated_pages"] += len(pfns)
        if not len(pfns):
            return
        # runs of consecutive frames: one discard each
        cuts = np.flatnonzero(np.diff(pfns) != 1) + 1
        starts = pfns[np.concatenate(([0], cuts))].tolist()
        ends = pfns[np.concatenate((cuts - 1, [len(pfns) - 1]))].tolist()
        for first, last in zip(starts, ends, strict=True):
            self._release(first << PAGE_SHIFT, (last - first + 1) * PAGE_SIZE)

    def _deflate(self, c: Chain) -> None:
        self.counters["deflated_pages"] += len(self._pfns(c, DEFLATE))

    def _report(self, c: Chain) -> None:
        if c.readable:
            raise DeviceError(f"balloon: reporting chain {c.head} has a device-readable buffer")
        for gpa, size in c.writable:
            self.counters["reported_bytes"] += size
            given = self._release(gpa, size)
            if given < size:
                self.counters["ignored_bytes"] += size - given
                self._complain(
                    "reported range %#x+%#x: %d bytes outside guest RAM or not whole host "
                    "pages ignored",
                    gpa,
                    size,
                    size - given,
                )

    def _release(self, gpa: int, size: int) -> int:
        """Punch [gpa, gpa + size) out of guest RAM's backing; the bytes given back."""
        try:
            given = self.mem.discard(gpa, size)
        except OSError as e:
            self.counters["release_errors"] += 1
            self._complain("cannot give %#x+%#x back to the host: %s", gpa, size, e)
            return 0
        self.counters["released_bytes"] += given
        return given

    # -- stats --

    def _serve_stats(self, q: Virtqueue) -> None:
        while True:
            q.set_kicks(False)
            while len(batch := q.pop(BATCH)):
                for c in chains(batch):
                    if self._stats_head is not None:  # more than one buffer: the older goes
                        self._complain("stats: a second buffer while one is held")
                        q.push([self._stats_head], [0])
                    self._stats_head = c.head
                    self._read_stats(c)
            if self._stats_wanted and self._stats_head is not None and q.open:
                self._stats_wanted = False
                head, self._stats_head = self._stats_head, None
                q.push([head], [0])
            if not q.set_kicks(True):
                return

    def _read_stats(self, c: Chain) -> None:
        if c.writable:
            raise DeviceError(f"balloon: stats chain {c.head} has a device-writable buffer")
        size = min(c.out_len, MAX_STATS * STAT.size)
        if size != c.out_len or size % STAT.size:
            self._complain("stats: %d bytes, not whole entries; the rest ignored", c.out_len)
        data = ChainReader(self.mem, c).read(size - size % STAT.size)
        if self._stats_skip_first:
            self._stats_skip_first = False
            return
        figures = {}
        for tag, value in STAT.iter_unpack(data):
            if tag in STAT_NAMES:
                figures[tag] = value
        with self._news:
            self._stats = figures
            self._stats_time = time.monotonic()
            self._stats_seq += 1
            self._news.notify_all()

    # -- snapshot --

    def save_state(self) -> dict:
        return {
            "target": self.num_pages,
            "actual": self.actual,
            "stats": [[t, v] for t, v in sorted(self._stats.items())],
        }

    def load_state(self, state: dict) -> None:
        s = STATE.check(state)
        figures = {}
        for pair in s["stats"]:
            if len(pair) != 2 or pair[0] not in STAT_NAMES:
                raise StateError(f"balloon state: stats entry {pair!r} is not (known tag, value)")
            figures[pair[0]] = pair[1]
        self.num_pages, self.actual = s["target"], s["actual"]
        with self._news:
            self._stats = figures
            self._stats_time = None  # their age is unknown


# -- the device type: ``balloon[,control=PATH][,target=MIB][,stats=off][,reporting=off]``

#: spec options that withhold a feature: name -> bit
FEATURE_OPTIONS = {
    "stats": F_STATS_VQ,
    "reporting": F_REPORTING,
    "deflate_on_oom": F_DEFLATE_ON_OOM,
}


def _from_spec(spec: Spec, build: Build) -> BalloonDevice:
    """``target=MIB`` is the target from the start (a guest inflates as its driver binds);
    ``stats=off`` / ``reporting=off`` / ``deflate_on_oom=off`` withhold a feature (to
    measure inflation alone, without free page reporting releasing memory on its own)."""
    if spec.arg:
        raise SpecError("balloon takes no argument")
    withheld = 0
    for name, bit in FEATURE_OPTIONS.items():
        withheld |= (not spec.switch(name, True)) << bit
    text = spec.options.get("target", "0")
    target = spec_number(text, U32_MAX // 256)
    if target is None:
        raise SpecError(f"target={text[:20]}: a whole number of MiB up to {U32_MAX // 256}")
    control = None
    path = spec.options.get("control")
    if path is not None:
        if not path:
            raise SpecError("control= needs a socket path")
        from emu.backends.balloon_control import ControlServer

        control = ControlServer(path)
        build.say(f"balloon: control socket {path}")
    try:
        dev = BalloonDevice(
            target_pages=target * 256, control=control, queue_max_size=build.queue_max
        )
    except BaseException:
        if control is not None:
            control.close()
        raise
    dev.features &= ~withheld
    return dev


register(
    DeviceType(
        BalloonDevice,
        "balloon[,control=PATH][,target=MIB][,stats=off][,reporting=off][,deflate_on_oom=off]",
        _from_spec,
        "emu.testing.balloon",
        options=("control", "target", *FEATURE_OPTIONS),
    )
)
