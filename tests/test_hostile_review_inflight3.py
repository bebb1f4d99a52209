"""Hostile review of the ring holding in-flight segments, blk's Batch-less native pass,
the engine's eventfd elision and the Cython call/err Notifier.

Defects found in review (each test failed on the reviewed commit):

* A vhost-user frontend that gives a blocking call eventfd and fills its counter froze the
  whole process: ``Notifier.signal`` writes it holding the GIL, so once the write blocks
  no other thread runs again (every device, every session, the main thread). The Python
  Notifier it replaced blocked only the device thread (os.eventfd_write releases the GIL).
* ``emu._ring``'s ``remember`` copied a restored chain's segments through the pop's
  scratch arrays and refused a chain longer than those (``max(256, 2 * size)``), where
  ``emu.pyring`` takes any length: a snapshot the validator accepts restored on the
  Python core and left the device needing a reset on the Cython one. Fixed: ``remember``
  now holds the segments in a buffer of their own.

The rest are attacks that found nothing, kept because they can fail: a model of the
queue against which ``Virtqueue.inflight()`` must report exactly the segments popped
(heads reused, packed used entries overwriting in-flight descriptors, descriptors and
indirect tables scribbled after the pop, chains handed out again after a stop, restores
into fresh queues, again and again) on both cores; report stops with requests at a slow
NBD server through blk's native plane, after a resume and after two restores; requests
finished inside ``submit`` on tmpfs (no eventfd write) mixed with ring requests and
multi-stage discard / write-zeroes under a small engine, with a report stop in the middle;
and ``set`` / ``close`` racing ``signal`` on another thread never writing a reused fd.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from golden_state import GOLDEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import blk_native, wait_until
from ringbuilder import BUF, RAM1, PackedBuilder, SplitBuilder, make_memory

from emu import pyring
from emu.devices.base import RunState
from emu.devices.blk import T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES, BlkDevice
from emu.memory import GuestMemory
from emu.queue import Virtqueue, _cring
from emu.ringdefs import (
    DESC_F_INDIRECT,
    DESC_F_WRITE,
    F_INDIRECT_DESC,
    F_RING_PACKED,
    RingError,
    RingState,
)
from emu.state import parts
from emu.state.file import load
from emu.state.format import DeviceState, decode, encode
from emu.testing import driver_queue
from emu.testing.blk import BlkDriver, dwz_payload, status_of
from emu.testing.driver import VirtioMmioDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

ROOT = Path(__file__).resolve().parents[1]
CORES = [
    "python",
    pytest.param("cython", marks=pytest.mark.skipif(_cring is None, reason="emu._ring not built")),
]
needs_cring = pytest.mark.skipif(_cring is None, reason="emu._ring is not built")
needs_plane = pytest.mark.skipif(blk_native is None, reason="emu.devices._blkplane is not built")


def run_child(script: str, timeout: float = 15.0) -> str:
    """``script`` in a child process (what it tests can freeze the whole interpreter): its
    output, or what it printed before it was killed."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    try:
        done = subprocess.run(
            [sys.executable, f.name], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return out + "\n<killed: timed out>"
    finally:
        os.unlink(f.name)
    return done.stdout + done.stderr


# -- defects --


def test_a_full_blocking_call_eventfd_does_not_freeze_the_process() -> None:
    """A frontend's call eventfd without O_NONBLOCK whose counter it set to the maximum:
    the device's next interrupt write blocks. It may cost that device its thread (as the
    Python Notifier did), never the process: the main thread must go on."""
    out = run_child(
        """
        import os, tempfile, time
        from conftest import EchoDevice
        from emu.testing.vhost_user import VhostUserDriver
        from emu.vhost_user.backend import VhostUserServer

        dev = EchoDevice(queue_max_size=64)
        srv = VhostUserServer(dev, os.path.join(tempfile.mkdtemp(), "echo.sock")).start()
        fe = VhostUserDriver(srv.path)
        call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking: the frontend's choice
        fe._calls[0] = call
        fe.init()
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        fe.driver_ok()
        fe.submit(0, [b"x"], [1])
        assert fe.wait(0)[0].data == b"x"
        print("served", flush=True)
        # the counter at its maximum; the first request's interrupt may land after its
        # used entry was seen, so take that one first (non-blocking: this thread must
        # not be the one that waits), then make the fd blocking again
        os.set_blocking(call, False)
        while True:
            try:
                os.eventfd_write(call, 0xFFFFFFFFFFFFFFFE)
                break
            except BlockingIOError:
                os.eventfd_read(call)
        os.set_blocking(call, True)
        fe.submit(0, [b"y"], [1])  # this interrupt cannot be added: the write blocks
        time.sleep(0.5)
        print("alive", flush=True)
        os._exit(0)
        """
    )
    assert "served" in out, out
    assert "alive" in out, f"the process froze on the call eventfd write:\n{out}"


@needs_cring
def test_both_ring_cores_remember_a_restored_chain_of_any_length() -> None:
    """``remember`` on emu._ring refused more segments than its pop scratch holds
    (``max(256, 2 * size)``); emu.pyring, the reference, takes them."""
    segs = [(BUF + 16 * k, 16, int(k >= 290)) for k in range(300)]
    got = {}
    for mod in (pyring, _cring):
        mem = make_memory()
        try:
            ring = mod.SplitRing(mem, 16, *SplitBuilder(mem, 16).areas(), 0)
            ring.set_state(RingState(1, 0, True, True, 0, [(3, 1)]))
            try:
                ring.remember(3, list(segs))
                got[mod.__name__] = ring.segments(3)
            except ValueError as e:
                got[mod.__name__] = repr(e)
        finally:
            mem.close()
    assert got["emu._ring"] == got["emu.pyring"] == segs, got


def _long_chain_state() -> tuple[DeviceState, dict]:
    """The golden blk-split snapshot with its first in-flight chain's buffers cut into
    273 pieces (the same bytes): a state the validator accepts."""
    case = GOLDEN / "v1"
    meta = json.loads((case / "blk-split.json").read_text())
    state = load(case / "blk-split.state")
    out = []
    for p in state.parts:
        if p.type == parts.INFLIGHT and p.selector == parts.vq_selector(0):
            ((_, chains),) = parts.parse(DeviceState(state.device_type, [p], state.flags))
            (ha, hn, _), (da, dn, _), (sa, sn, sw) = chains[0]["segments"]
            assert hn == 16 and dn % 16 == 0
            segs = [(ha + k, 1, False) for k in range(16)]
            segs += [(da + 16 * k, 16, False) for k in range(dn // 16)]
            chains[0] = dict(chains[0], segments=[*segs, (sa, sn, sw)])
            p = parts.make(parts.INFLIGHT, chains, vq=0)
        out.append(p)
    return DeviceState(state.device_type, out, state.flags), meta


@needs_cring
def test_a_snapshot_with_a_long_in_flight_chain_restores_alike_on_both_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restored device ran on the Python core and needed a reset on the Cython one
    ("chain at head 0 has more segments than a pop holds")."""
    state, meta = _long_chain_state()
    q0 = meta["queues"]["0"]
    want_used = q0["next_used"] + len(q0["inflight"])
    outcome = {}
    for impl in ("python", "cython"):
        monkeypatch.setenv("EMU_RING", impl)
        mem = GuestMemory.create(meta["ram"])
        mem.write(0, gzip.decompress((GOLDEN / "v1" / "blk-split.ram.gz").read_bytes()))
        img = tmp_path / f"{impl}.img"
        img.write_bytes(gzip.decompress((GOLDEN / "v1" / "blk-split.disk.gz").read_bytes()))
        dev = BlkDevice(img)
        try:
            MmioTransport(dev, mem, stop_feature_bit=mmio_regs.F_EMU_STOP).restore(state)
            used = q0["device"] + 2

            def settled(dev: BlkDevice = dev, mem: GuestMemory = mem, used: int = used) -> bool:
                return dev.run_state is RunState.BROKEN or mem.read_int(used, 2) == want_used

            wait_until(settled, 10)
            n = mem.read_int(used, 2)
            entries = [mem.read(q0["device"] + 4 + 8 * i, 8) for i in range(n)]
            outcome[impl] = (dev.run_state, dev.broken, n, entries)
        finally:
            dev.close()
            mem.close()
    assert outcome["cython"][:3] == (RunState.RUNNING, None, want_used), outcome["cython"][:3]
    assert outcome["cython"] == outcome["python"]


# -- attacks that found nothing --


TABLES = 0x10000  # one indirect table of 0x200 bytes per head / buffer id (ringbuilder RAM0)


def _norm(segs) -> list[tuple[int, int, bool]]:
    return [(int(a), int(n), bool(w)) for a, n, w in segs]


class QueueModel:
    """A Virtqueue over ringbuilder memory, the driver side, and what must be in flight:
    every chain popped and not pushed, with the segments the driver made available, in
    fetch order."""

    def __init__(self, impl: str, packed: bool, size: int) -> None:
        self.impl, self.packed, self.size = impl, packed, size
        self.mem = make_memory()
        self.drv = (PackedBuilder if packed else SplitBuilder)(self.mem, size)
        self.features = 1 << F_INDIRECT_DESC | (1 << F_RING_PACKED if packed else 0)
        self.q = self._queue()
        self.q.start(self.mem, self.features)
        self.offered: dict[int, list[tuple[int, int, bool]]] = {}  # not popped yet
        self.inflight: dict[int, list[tuple[int, int, bool]]] = {}  # fetch order
        self.held: set[int] = set()  # chains the device has now (may push)
        self.slots_out = 0  # packed: slots made available and not used yet
        self.ndesc: dict[int, int] = {}

    def _queue(self) -> Virtqueue:
        q = Virtqueue(0, self.size)
        q.impl = self.impl
        q.size = self.size
        q.desc, q.driver, q.device = self.drv.areas()
        q.ready = True
        return q

    def close(self) -> None:
        self.q.close()
        self.mem.close()

    def free(self) -> list[int]:
        return [h for h in range(self.size) if h not in self.offered and h not in self.inflight]

    def offer(self, head: int, segs: list[tuple[int, int, bool]], indirect: bool) -> None:
        flags = [DESC_F_WRITE if w else 0 for _, _, w in segs]
        if self.packed:
            descs = [(a, n, f) for (a, n, _), f in zip(segs, flags, strict=True)]
            if indirect:
                self.drv.table(TABLES + 0x200 * head, descs)
                descs = [(TABLES + 0x200 * head, 16 * len(descs), DESC_F_INDIRECT)]
            if self.slots_out + len(descs) > self.size:
                return
            self.drv.offer(head, descs)
            self.slots_out += len(descs)
            self.ndesc[head] = len(descs)
        else:  # one descriptor per head: direct, or an indirect table of its own
            if len(segs) > 1 or indirect:
                last = len(segs) - 1
                entries = [
                    (a, n, f | (1 if k < last else 0), k + 1)
                    for k, ((a, n, _), f) in enumerate(zip(segs, flags, strict=True))
                ]
                self.drv.table(TABLES + 0x200 * head, entries)
                self.drv.chain(head, [(TABLES + 0x200 * head, 16 * len(segs), DESC_F_INDIRECT)])
            else:
                self.drv.chain(head, [(segs[0][0], segs[0][1], flags[0])])
            self.drv.offer(head)
        self.offered[head] = segs

    def pop(self, n: int) -> None:
        self.q.begin_pass()
        batch = self.q.pop(n)
        for i, head in enumerate(batch.heads.tolist()):
            addrs, lens, wr = batch.segments(i)
            segs = _norm(zip(addrs.tolist(), lens.tolist(), wr.tolist(), strict=True))
            if head in self.inflight:  # handed out again after a stop or restore
                assert head not in self.held, head
                assert segs == self.inflight[head], (head, segs, self.inflight[head])
            else:
                assert segs == self.offered.pop(head), head
                self.inflight[head] = segs
            self.held.add(head)

    def push(self, heads: list[int]) -> None:
        self.q.push(heads, [7] * len(heads))
        for h in heads:
            del self.inflight[h]
            self.held.discard(h)
            self.slots_out -= self.ndesc.pop(h, 0)

    def scribble(self, rng: random.Random) -> None:
        """A hostile guest rewrites the descriptors and tables of chains in flight."""
        for h in self.inflight:
            self.mem.write(TABLES + 0x200 * h, rng.randbytes(0x200))
            if not self.packed:
                self.mem.write(self.drv.desc_addr + 16 * h, rng.randbytes(16))

    def stop(self) -> None:
        """A report stop and resume: the device forgets what it held; the queue hands
        every chain in flight out again."""
        self.check()
        self.held.clear()
        self.q.requeue_inflight()

    def restore(self) -> None:
        """The queue's state and in-flight list into a fresh queue (a fresh device)."""
        self.check()
        state, chains = self.q.state(), self.q.inflight()
        self.q.close()  # its kick eventfd
        self.q = self._queue()
        self.q.start(self.mem, self.features, state, chains)
        self.held.clear()

    def check(self) -> None:
        got = [(c.head, _norm(c.segments)) for c in self.q.inflight()]
        assert got == list(self.inflight.items())
        assert [h for h, _ in self.q.state().inflight] == list(self.inflight)


@st.composite
def chain_segments(draw, most: int) -> list[tuple[int, int, bool]]:
    """Readable buffers, then writable ones: at most ``most`` (an indirect table holds
    at most a queue size of them)."""
    n_read = draw(st.integers(0, min(3, most - 1)))
    n_write = draw(st.integers(0 if n_read else 1, min(3, most - n_read)))
    return [
        (BUF + draw(st.integers(0, RAM1[1] - 0x400)), draw(st.integers(1, 0x400)), k >= n_read)
        for k in range(n_read + n_write)
    ]


@pytest.mark.parametrize("impl", CORES)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_inflight_reports_exactly_the_segments_popped(impl: str, packed: bool, data) -> None:
    size = data.draw(st.integers(2, 12) if packed else st.sampled_from([2, 4, 8, 16]))
    m = QueueModel(impl, packed, size)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    try:
        for _ in range(data.draw(st.integers(20, 80))):
            op = data.draw(
                st.sampled_from(["offer", "offer", "offer", "pop", "pop", "push", "push"]
                                + ["scribble", "stop", "restore"])
            )  # fmt: skip
            if op == "offer" and m.free():
                m.offer(
                    data.draw(st.sampled_from(m.free())),
                    data.draw(chain_segments(size)),
                    data.draw(st.booleans()),
                )
            elif op == "pop":
                m.pop(data.draw(st.integers(1, size)))
            elif op == "push" and m.held:
                held = sorted(m.held)
                rng.shuffle(held)
                m.push(held[: data.draw(st.integers(1, len(held)))])
            elif op == "scribble":
                m.scribble(rng)
            elif op == "stop":
                m.stop()
            elif op == "restore":
                m.restore()
            m.check()
    finally:
        m.close()


@pytest.mark.parametrize("impl", CORES)
def test_a_pop_failing_after_good_chains_leaves_them_in_flight_with_their_segments(
    impl: str,
) -> None:
    """Two good chains then one whose buffer is outside RAM in the same pop: the pop
    raises, and a stop right after reports the two good chains, segments and all (the
    ring walked them; the device never saw them)."""
    m = QueueModel(impl, False, 8)
    try:
        m.offer(0, [(BUF, 16, False), (BUF + 0x100, 1, True)], False)
        m.offer(1, [(BUF + 0x200, 32, True)], True)
        m.drv.chain(2, [(0x50000, 8, 0)])  # the gap between the RAM regions
        m.drv.offer(2)
        m.q.begin_pass()
        with pytest.raises(RingError):
            m.q.pop(8)
        got = [(c.head, _norm(c.segments)) for c in m.q.inflight()]
        assert got == [(0, m.offered[0]), (1, m.offered[1])]
    finally:
        m.close()


def _recording(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], list]:
    """(id(driver queue), token) -> the chain's segments as the driver made them."""
    made: dict[tuple[int, int], list] = {}
    offer = driver_queue.DriverQueue._offer

    def recorded(self, req, segs):
        made[(id(self), req.token)] = [(g, n, bool(f & DESC_F_WRITE)) for g, n, f in segs]
        return offer(self, req, segs)

    monkeypatch.setattr(driver_queue.DriverQueue, "_offer", recorded)
    return made


@needs_plane
@pytest.mark.parametrize("impl", CORES)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_report_stops_through_the_native_plane_report_the_segments_popped(
    nbd_server, monkeypatch, impl: str, packed: bool
) -> None:
    """Requests at a slow NBD server (heads reused many times before) stopped with the
    ``report`` policy: in flight with exactly their segments, after a resume (handed out
    again), after a restore into a fresh device and after a second restore that is
    stopped before they are handed out; then each completes exactly once."""
    made = _recording(monkeypatch)
    uri = nbd_server(filters=["delay"], params=["rdelay=300ms", "wdelay=300ms"]).uri
    mem = GuestMemory.create(8 << 20)
    devs = []

    def device() -> tuple[BlkDevice, MmioTransport]:
        dev = BlkDevice(uri, plane="native")
        for q in dev.queues:
            q.impl = impl
        devs.append(dev)
        return dev, MmioTransport(dev, mem)

    def check(dev, dq, first, what) -> None:
        got = {c.head: _norm(c.segments) for c in dev.queues[0].inflight()}
        want = {h: made[(id(first), r.token)] for h, r in dq._inflight.items()}
        assert got == want, what

    def at_engine(dev, n) -> None:
        wait_until(lambda: dev.queues[0].deferred.count() >= n, 5)

    try:
        dev, tr = device()
        b = BlkDriver.open(VirtioMmioDriver(tr, mem), packed=packed, queue_size=32)
        first = b.drv.queues[0]
        for i in range(5):  # every head used a few times already
            used = [b.submit(T_OUT, 8 * k, bytes([i]) * 4096) for k in range(8)]
            assert {status_of(c) for c in b.wait(0, len(used))} == {0}
        tokens = [
            b.submit(T_IN, 8 * i, in_size=4096 * (1 + i % 3))
            if i % 2
            else b.submit(T_OUT, 8 * i, bytes([i]) * 512 * (1 + i))
            for i in range(6)
        ]
        at_engine(dev, 6)
        tr.vmm_stop("report")
        check(dev, first, first, "first stop")
        tr.vmm_resume()
        at_engine(dev, 6)
        tr.vmm_stop("report")
        check(dev, first, first, "stop after the resume")
        drv = b.drv
        for n in range(2):
            state, saved = decode(encode(tr.save())), drv.save()
            dev, tr = device()
            drv = VirtioMmioDriver.load(tr, mem, saved)  # the same requests and tokens
            tr.restore(state)
            if n == 0:
                at_engine(dev, 6)
            tr.vmm_stop("report")
            check(dev, drv.queues[0], first, f"stop after restore {n + 1}")
        tr.vmm_resume()
        done = drv.wait(0, 6)
        assert sorted(c.token for c in done) == sorted(tokens)
        assert {status_of(c) for c in done} == {0}
        time.sleep(0.4)  # the source devices' requests, had any survived, land by now
        assert drv.queues[0].poll() == []
    finally:
        for d in devs:
            d.close()
        mem.close()


@needs_plane
@pytest.mark.parametrize("where", ["shm", "ext4"])
def test_requests_done_in_submit_are_never_left_behind(tmp_path: Path, where: str) -> None:
    """On tmpfs reads and writes finish inside ``submit`` and write no eventfd; flushes,
    discards and write-zeroes (multi-stage there: no ZERO_RANGE) go through the ring.
    Mixed, under an engine of 4 (a backlog), with a report stop in the middle: every
    request completes once with the right data, and afterwards the engine fd is quiet
    (a readable one would keep the device thread's poll returning)."""
    if where == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        path = Path(tempfile.mkstemp(dir="/dev/shm", prefix="emu-review3-")[1])
    else:
        path = tmp_path / "disk.img"
    mem = GuestMemory.create(16 << 20)
    dev = None
    try:
        path.write_bytes(bytes(4 << 20))
        dev = BlkDevice(path, plane="native", iodepth=4)
        tr = MmioTransport(dev, mem)
        b = BlkDriver.open(VirtioMmioDriver(tr, mem), queue_size=128)
        rng = random.Random(5)
        image = bytearray(4 << 20)
        for rnd in range(60):
            tokens, reads = [], {}
            sectors = rng.sample(range(0, 8000, 8), 40)
            for s in sectors:
                kind = rng.randrange(5)
                if kind == 0:
                    tokens.append(b.submit(T_IN, s, in_size=4096))
                    reads[tokens[-1]] = s
                elif kind == 1:
                    data = rng.randbytes(4096)
                    image[s * 512 : s * 512 + 4096] = data
                    tokens.append(b.submit(T_OUT, s, data))
                elif kind == 2:
                    tokens.append(b.submit(T_FLUSH))
                else:
                    image[s * 512 : s * 512 + 4096] = bytes(4096)
                    op = T_DISCARD if kind == 3 else T_WRITE_ZEROES
                    flags = 0 if kind == 3 else rng.randrange(2)
                    tokens.append(b.submit(op, 0, dwz_payload([(s, 8, flags)])))
            if rnd % 10 == 5:
                tr.vmm_stop("report")
                tr.vmm_resume()
            done = b.wait(0, len(tokens))
            assert sorted(c.token for c in done) == sorted(tokens)
            assert {status_of(c) for c in done} == {0}
            for c in done:
                if c.token in reads:
                    s = reads[c.token]
                    assert c.data[:-1] == bytes(image[s * 512 : s * 512 + 4096])
        assert path.read_bytes() == bytes(image)
        time.sleep(0.2)
        assert b.drv.queues[0].poll() == []
        engine_fd = select.poll()
        engine_fd.register(dev.queues[0].deferred.fd, select.POLLIN)
        assert engine_fd.poll(0) == [], "the engine fd stays readable with nothing to reap"
    finally:
        if dev is not None:
            dev.close()
        mem.close()
        if where == "shm":
            path.unlink()


def test_set_and_close_racing_signal_never_write_a_reused_fd() -> None:
    """The connection thread replaces and closes the call fd while the device thread
    signals it; a socket pair made right after each close takes the freed number. Nothing
    may ever arrive on it."""
    from emu.vhost_user.vring import Notifier

    n = Notifier("call")
    stop = threading.Event()
    leaked = []

    def signaller() -> None:
        while not stop.is_set():
            n.signal()

    t = threading.Thread(target=signaller, daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as the interpreter can
    t.start()
    try:
        for _ in range(2000):
            n.set(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            n.close()
            a, b = socket.socketpair()  # one of them takes the freed number
            a.setblocking(False)
            b.setblocking(False)
            time.sleep(0)
            for end in (a, b):
                with contextlib.suppress(BlockingIOError):
                    leaked.append(end.recv(64))
            a.close()
            b.close()
    finally:
        stop.set()
        t.join(5)
        sys.setswitchinterval(switch)
    assert leaked == []
