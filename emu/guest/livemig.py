"""The host's side of the ``livemig`` workload (init_script.py): the disk, the flag, one
live migration of a QEMU microvm guest, and the check of the disk afterwards.

The guest writes sequence-numbered 4 KiB blocks with O_DIRECT into ``SLOTS`` slots at
the start of the disk and keeps starting short-lived processes; the host raises
``EMU-FILL`` in the disk's last 4 KiB once QEMU's first pass over RAM is done, and the
guest then reads the region at ``CACHE_AT_MIB`` into its page cache: those pages are
written by the disk backend (its DMA) after QEMU copied them, so only the backend's
dirty log can make QEMU send them again. ``EMU-STOP`` ends the workload, which then
checks every acknowledged block and the cached region (EMU-RESULT livemig.*).

The guest kernel runs with ``init_on_alloc=0``: Debian's kernel zeroes every page it
allocates, a CPU write QEMU tracks itself, which would make it resend a page-cache page
the backend fills right after whether the backend logged it or not (a negative control
with the log hidden passes then).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from emu import progress
from emu.guest.devices import Device
from emu.guest.images import GuestImage
from emu.guest.run import kernel_args
from emu.guest.vm import Vm, qemu_command, wait_until

DISK_MIB = 64
SLOTS = 256
CACHE_AT_MIB = 16
CACHE_MIB = 8
MEM_MIB = 256
BLOCK = 4096
KNOBS = {"livemig.slots": SLOTS, "livemig.cache_at": CACHE_AT_MIB, "livemig.cache_mib": CACHE_MIB}
KERNEL_ARGS = [*kernel_args(["livemig"], KNOBS, True), "init_on_alloc=0"]
#: QEMU's default downtime limit, for the end; 1 ms before, so that it cannot converge
#: until the host is done with it
DOWNTIME_MS = 300
#: bandwidth while the guest fills its cache: far below the guest's dirty rate, so that
#: QEMU cannot converge then either
HOLD_BANDWIDTH = 64 << 10


def region() -> bytes:
    """What the host puts in the cached region: 4 KiB blocks that all differ."""
    return b"".join(
        hashlib.sha256(b"region %d" % i).digest() * (BLOCK // 32)
        for i in range((CACHE_MIB << 20) // BLOCK)
    )


def make_disk(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)
        f.seek(CACHE_AT_MIB << 20)
        f.write(region())


def raise_flag(disk: Path, word: bytes) -> None:
    """EMU-FILL / EMU-STOP into the disk's last 4 KiB, which the guest polls (O_DIRECT)."""
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, word.ljust(BLOCK, b"\0"), (DISK_MIB << 20) - BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


class Side:
    """One end of a migration: a directory of its own with the backend's socket, named
    blk.sock on both ends (emu serve's state file is named after it), and QMP's."""

    def __init__(self, directory: Path, image: GuestImage) -> None:
        self.dir = directory
        self.dir.mkdir()
        self.image = image
        self.sock, self.qmp = self.dir / "blk.sock", self.dir / "qmp.sock"
        self.trace = self.dir / "qemu.trace"

    def guest(self, transcript: list[str], incoming: str | None = None, trace: bool = False) -> Vm:
        """QEMU with the livemig workload on this side's backend (``incoming``: the
        destination's -incoming URI); ``transcript`` is shared by both ends' consoles.
        ``trace``: QEMU logs its vhost-user messages to ``self.trace`` (``stop_us``)."""
        cmd = qemu_command(
            self.image,
            [Device("blk", str(self.sock))],
            self.qmp,
            KERNEL_ARGS,
            MEM_MIB,
            incoming=incoming,
            trace=("vhost_user_*", self.trace) if trace else None,
        )
        return Vm(cmd, self.qmp, transcript)


#: vhost-user requests of a stop: SET_STATUS (0, QEMU 7.2 with STATUS), SET_VRING_ENABLE,
#: GET_VRING_BASE
_STOP_REQUESTS = {39, 18, 11}
_TRACED = re.compile(r"@(\d+\.\d+):vhost_user_(write|read) req:(\d+)")


def stop_us(trace: Path) -> float:
    """The backend's part of the last stop (the migration's downtime), from QEMU's trace:
    microseconds from the first message of the stop sequence to the answer to its
    GET_VRING_BASE being read."""
    events = [(float(t), d, int(r)) for t, d, r in _TRACED.findall(trace.read_text())]
    end = max(i for i, (_, d, r) in enumerate(events) if d == "read" and r == 11)
    start = end
    while start > 0 and events[start - 1][1] == "write" and events[start - 1][2] in _STOP_REQUESTS:
        start -= 1
    return (events[end][0] - events[start][0]) * 1e6


def syncs(src: Vm) -> int:
    """QEMU's dirty-bitmap syncs so far: 1 at the start, +1 after each pass."""
    return int(src.migration().get("ram", {}).get("dirty-sync-count", 0))


def migrate(src: Vm, uri: str, disk: Path | None, bandwidth: int) -> dict:
    """Live-migrate ``src`` to ``uri``; the last query-migrate answer.

    QEMU copies all of RAM once at ``bandwidth``; then the migration is held (bandwidth
    and downtime limit too low to converge) while the guest fills its page cache, with
    ``disk``; then the limits go back up and it converges in a few live passes. Without
    ``disk`` it returns while held (to cancel it, or to fail it). Shows its progress
    (MiB of RAM done, the pass, the phase) where progress is wanted (emu.progress).
    """
    with progress.progress("live migration, MiB of RAM done", MEM_MIB) as bar:
        done = 0

        def show(answer: dict) -> None:  # RAM not (or no longer) waiting to be sent
            nonlocal done
            ram = answer.get("ram", {})
            now = max(0, int(ram.get("total", 0)) - int(ram.get("remaining", 0))) >> 20
            if answer.get("status") == "completed":
                now = MEM_MIB
            if now > done:
                item = f"pass {ram.get('dirty-sync-count', '?')}, {answer.get('status')}"
                bar.update(now - done, item)
                done = now

        src.on_migration = show
        try:
            return _migrate(src, uri, disk, bandwidth)
        finally:
            src.on_migration = None


def _migrate(src: Vm, uri: str, disk: Path | None, bandwidth: int) -> dict:
    qmp = src.qmp
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 1})
    qmp.execute("migrate", uri=uri)
    wait_until(
        lambda: syncs(src) >= 2 or src.migration()["status"] not in ("setup", "active"),
        "first pass",
    )
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": HOLD_BANDWIDTH})
    if disk is None:
        return src.migration()
    raise_flag(disk, b"EMU-FILL")
    wait_until(lambda: src.saw("EMU-FILLED"), "page cache filled")
    assert src.migration()["status"] == "active", src.migration()
    limits = {"max-bandwidth": bandwidth, "downtime-limit": DOWNTIME_MS}
    qmp.execute("migrate-set-parameters", **limits)
    return src.wait_migration("completed", "failed")


def disk_problems(results: dict[str, str], disk: Path) -> list[str]:
    """What the host file says against what the guest reported at the end."""
    data = disk.read_bytes()
    slots = data[: SLOTS * BLOCK]
    problems = []
    if results.get("livemig.slots_sha256") != hashlib.sha256(slots).hexdigest():
        problems.append("the slots on the host file are not what the guest read")
    for s in range(SLOTS):
        head = slots[s * BLOCK : s * BLOCK + 21]
        if head != bytes(21) and not (head.startswith(b"EMU-SEQ ") and head.endswith(b"%04d" % s)):
            problems.append(f"slot {s} holds {head!r}")
    cached = data[CACHE_AT_MIB << 20 : (CACHE_AT_MIB + CACHE_MIB) << 20]
    if (
        cached != region()
        or results.get("livemig.region_sha256") != hashlib.sha256(cached).hexdigest()
    ):
        problems.append("the cached region changed")
    return problems
