"""Guest-side virtio-balloon: what Linux's virtio_balloon does, over the reference driver
(virtio-mmio in-process, or vhost-user through ``VhostUserDriver``).

``BalloonDriver`` inflates and deflates PFN lists, keeps a stats buffer in the stats
queue and answers the device's requests for fresh figures, reports free ranges, and
``balance`` follows the host's target the way Linux's update_balloon_size_func does
(inflate or deflate from a pool of free pages, then write ``actual``). ``layout``
chooses the queue numbering: the spec's fixed indexes, or Linux-before-6.11's
consecutive ones (emu.devices.balloon explains both).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from emu.devices.balloon import (
    ACTUAL_OFFSET,
    F_REPORTING,
    F_STATS_VQ,
    STAT,
    BalloonDevice,
)
from emu.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import rings
from emu.transport.mmio import MmioTransport

#: PFNs per inflate / deflate chain, as Linux (VIRTIO_BALLOON_ARRAY_PFNS_MAX)
PFNS_PER_CHAIN = 256
#: Linux 6.1's stats: swap in/out, faults, free, total, available, caches, hugetlb
DEFAULT_STATS = {0: 0, 1: 0, 2: 12, 3: 3456, 4: 200 << 20, 5: 256 << 20, 6: 220 << 20, 7: 8 << 20}


def queue_indexes(stats: bool, reporting: bool, layout: str = "spec") -> dict[str, int]:
    """Role -> queue index as a driver numbers them (``layout`` "spec" or "linux")."""
    if layout == "spec":
        out = {"inflate": 0, "deflate": 1}
        if stats:
            out["stats"] = 2
        if reporting:
            out["reporting"] = 4
        return out
    if layout != "linux":
        raise ValueError(f"layout {layout!r} (spec or linux)")
    names = ["inflate", "deflate"] + ["stats"] * stats + ["reporting"] * reporting
    return {n: i for i, n in enumerate(names)}


def pack_stats(values: dict[int, int]) -> bytes:
    return b"".join(STAT.pack(tag, value) for tag, value in values.items())


class BalloonDriver:
    def __init__(self, drv: Any, queues: dict[str, int]) -> None:
        self.drv = drv
        self.q = queues
        self.pool: list[int] = []  # free PFNs the guest can give (``balance``)
        self.ballooned: list[int] = []  # PFNs in the balloon, last in first out

    @classmethod
    def open(
        cls,
        drv: Any,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = None,
        stats: bool = True,
        reporting: bool = True,
        layout: str = "spec",
        initial_stats: dict[int, int] | None = None,
    ) -> BalloonDriver:
        """Negotiate (STATS_VQ and PAGE_REPORTING as asked), set the queues up, DRIVER_OK,
        then hand the device the first stats buffer, as Linux's probe does."""
        rings_opts = dict(packed=packed, event_idx=event_idx, indirect=indirect)
        features = drv.init(**rings_opts)
        unwanted = (0 if stats else 1 << F_STATS_VQ) | (0 if reporting else 1 << F_REPORTING)
        if features & unwanted:
            features = drv.init(features & ~unwanted, **rings_opts)
        queues = queue_indexes(
            bool(features >> F_STATS_VQ & 1), bool(features >> F_REPORTING & 1), layout
        )
        for index in sorted(queues.values()):
            drv.setup_queue(index, queue_size)
        drv.driver_ok()
        self = cls(drv, queues)
        if "stats" in queues:
            self.send_stats(DEFAULT_STATS if initial_stats is None else initial_stats)
        return self

    # -- config --

    @property
    def target(self) -> int:
        return self.drv.config_read(0, 4)

    @property
    def actual(self) -> int:
        return self.drv.config_read(ACTUAL_OFFSET, 4)

    def set_actual(self, pages: int) -> None:
        self.drv.config_write(ACTUAL_OFFSET, 4, pages)

    # -- pages --

    def take_pages(self, count: int) -> list[int]:
        """PFNs of ``count`` fresh 4 KiB pages of guest RAM no ring or buffer uses."""
        gpa = self.drv.alloc.alloc(count * PAGE_SIZE, PAGE_SIZE)
        return list(range(gpa >> PAGE_SHIFT, (gpa >> PAGE_SHIFT) + count))

    def _submit_all(self, qidx: int, chains: list[list[tuple[int, int, bool]] | bytes]) -> None:
        """Queue every chain (as many at once as the ring takes), wait for all."""
        q = self.drv.queues[qidx]
        waiting = 0
        for chain in chains:
            while q.free_slots() < 2 and waiting:  # an indirect table or one buffer
                self.drv.wait(qidx)
                waiting -= 1
            if isinstance(chain, bytes):
                q.add([chain], [])
            else:
                q.add_segments(chain)
            waiting += 1
            if q.kick_needed():
                self.drv.kick(qidx)
        if waiting:
            self.drv.wait(qidx, waiting)

    def _pfn_chains(self, pfns: Iterable[int], per_chain: int) -> list[bytes]:
        arr = np.asarray(list(pfns), "<u4")
        return [arr[i : i + per_chain].tobytes() for i in range(0, len(arr), per_chain)]

    def inflate(self, pfns: Iterable[int], per_chain: int = PFNS_PER_CHAIN) -> None:
        """Give these pages to the balloon; returns once the device used every chain."""
        self._submit_all(self.q["inflate"], self._pfn_chains(pfns, per_chain))

    def deflate(self, pfns: Iterable[int], per_chain: int = PFNS_PER_CHAIN) -> None:
        self._submit_all(self.q["deflate"], self._pfn_chains(pfns, per_chain))

    def report(self, ranges: list[tuple[int, int]]) -> None:
        """Report free (gpa, length) ranges in one chain of device-writable buffers."""
        self._submit_all(self.q["reporting"], [[(gpa, n, True) for gpa, n in ranges]])

    def submit_raw(self, role: str, segments: list[tuple[int, int, bool]]) -> int:
        """One chain of caller-laid-out buffers on ``role``'s queue, not waited for."""
        qidx = self.q[role]
        token = self.drv.queues[qidx].add_segments(segments)
        self.drv.kick(qidx)
        return token

    # -- stats --

    def send_stats(self, values: dict[int, int]) -> None:
        """Put a buffer of figures in the stats queue (the device holds it)."""
        self.drv.submit(self.q["stats"], [pack_stats(values)], [])

    def answer_stats(self, values: dict[int, int], timeout: float = 5.0) -> None:
        """Wait for the device to give the stats buffer back, then send fresh figures."""
        self.drv.wait(self.q["stats"], timeout=timeout)
        self.send_stats(values)

    def poll_stats(self, values: Callable[[], dict[int, int]]) -> bool:
        """Answer a request for figures if the device made one; True if it did."""
        q = self.drv.queues[self.q["stats"]]
        done = q.poll()
        for _ in done:
            self.send_stats(values())
        return bool(done)

    # -- following the host, as Linux --

    def balance(self) -> int:
        """Inflate from ``pool`` or deflate towards the target, then write ``actual``;
        returns the pages moved (positive: inflated)."""
        want = self.target - len(self.ballooned)
        if want > 0:
            take = self.pool[:want]
            del self.pool[: len(take)]
            self.inflate(take)
            self.ballooned += take
            moved = len(take)
        elif want < 0:
            give = self.ballooned[want:]
            del self.ballooned[want:]
            self.deflate(give)
            self.pool += give
            moved = -len(give)
        else:
            return 0
        self.set_actual(len(self.ballooned))
        return moved

    def serve(
        self,
        stop: threading.Event,
        values: Callable[[], dict[int, int]] = lambda: DEFAULT_STATS,
        period: float = 0.005,
    ) -> None:
        """A guest's balloon thread: follow the target, answer stats, until ``stop``.

        The only thread that drives ``drv`` while it runs."""
        while not stop.is_set():
            if "stats" in self.q:
                self.poll_stats(values)
            self.balance()
            self.drv.sleep(self.q["inflate"], period)


def touch(mem: GuestMemory, pfns: Iterable[int], byte: int = 0xA5) -> None:
    """Write every page, as a guest using them (the host allocates them again)."""
    page = bytes([byte]) * PAGE_SIZE
    for pfn in pfns:
        mem.write(pfn << PAGE_SHIFT, page)


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process balloon``: the host asks for 4 MiB, the guest inflates,
    the memfd behind guest RAM shrinks; stats; free page reporting; deflate."""
    mem = GuestMemory.create(32 << 20)
    dev = BalloonDevice()
    try:
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        bd = BalloonDriver.open(drv, **opts)
        pool = bd.take_pages(2048)  # 8 MiB of the guest's free pages
        touch(mem, pool)
        bd.pool = list(pool)
        before = mem.allocated() or 0
        dev.set_target(1024)  # 4 MiB
        bd.balance()
        after = mem.allocated() or 0
        say(
            f"balloon ({rings(drv.features)}): target 4 MiB, guest inflated "
            f"{bd.actual} pages; guest RAM memfd {before >> 20} MiB -> {after >> 20} MiB "
            f"allocated ({(before - after) >> 10} KiB given back)"
        )
        if "stats" in bd.q:
            fresh: dict[str, Any] = {}
            asker = threading.Thread(target=lambda: fresh.update(dev.stats(refresh=True)))
            asker.start()
            bd.answer_stats({**DEFAULT_STATS, 4: 123 << 20})
            asker.join()
            free_mib = fresh.get("stats", {}).get("free-memory", 0) >> 20
            say(f"balloon: stats from the guest: free-memory {free_mib} MiB")
        if "reporting" in bd.q:
            free = bd.pool[:512]
            start = free[0] << PAGE_SHIFT
            bd.report([(start, len(free) * PAGE_SIZE)])
            left = (mem.allocated() or 0) >> 20
            say(f"balloon: free page report of 2 MiB -> {left} MiB allocated")
        dev.set_target(0)
        bd.balance()
        touch(mem, pool)
        say(
            f"balloon: target 0, deflated; after the guest touched its pages again "
            f"{(mem.allocated() or 0) >> 20} MiB allocated"
        )
    finally:
        dev.close()
        mem.close()
