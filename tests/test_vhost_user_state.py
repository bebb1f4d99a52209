"""Device state over vhost-user: blk requests in flight survive a move to a new backend.

The guest is emu's frontend. Requests are executed by the first backend but their used
entries held back (a long completion latency under the ``report`` policy), so the stop
(SET_VRING_ENABLE 0 + GET_VRING_BASE) leaves them in flight. Their state leaves through
DEVICE_STATE (or ``emu serve --state-dir``); a new backend process takes it, the same
frontend reconnects over the same guest memory and restarts the ring, and every request
completes exactly once (the driver refuses a second completion of the same buffer), with
reads returning the data on disk. States that are corrupt, truncated, of another device
or inconsistent are refused by CHECK_DEVICE_STATE, with nothing applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from modes import wait_until

from emu.devices.blk import CONFIG_WRITEBACK, S_OK, SECTOR, T_IN, T_OUT, BlkDevice
from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.state import parts
from emu.state.format import DeviceState, Part, StateError, decode, encode
from emu.testing.blk import BlkDriver, status_of
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport.mmio import MmioTransport
from emu.vhost_user import device_state
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.device_state import StateFiles
from emu.vhost_user.frontend import FrontendError, connect
from emu.vhost_user.protocol import U64, ProtocolError, Req
from emu.vhost_user.snapshot import STATE_FD, StateTransferError

RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
IMAGE = 1 << 20
BLOCK = 4096
WRITES = 12  # in flight at the stop: writes of fresh data ...
READS = 4  # ... and reads of data written before
LATER = 4  # made available while the ring is stopped
HOLD = 60.0  # report: completions are never published before the stop
DRAIN_LATENCY = 0.5  # drain: the stop waits this long for the held completions


def block(i: int) -> bytes:
    return hashlib.sha256(b"block %d" % i).digest() * (BLOCK // 32)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(IMAGE))
    return img


@contextmanager
def in_process(
    dev: BlkDevice | RngDevice, path: Path, files: StateFiles | None = None
) -> Iterator[VhostUserServer]:
    server = VhostUserServer(dev, path, files).start()
    try:
        yield server
    finally:
        server.close()
        dev.close()


@contextmanager
def emu_serve(sock: Path, spec: str, *options: str) -> Iterator[subprocess.Popen]:
    """A backend in a process of its own (``emu serve``)."""
    cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), *options, spec]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None)
        if proc.poll() is not None:
            raise RuntimeError(f"emu serve exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()  # type: ignore[union-attr]


@dataclass
class Stopped:
    """A frontend whose only ring is stopped with requests in flight in the backend."""

    fe: VhostUserDriver
    blk: BlkDriver
    base: int
    state: bytes  # what DEVICE_STATE saved
    expected: dict[int, bytes | None]  # token -> data a read returns (None: a write)
    inflight: int  # chains in flight in the saved state


def stop_with_inflight(
    disk: Path,
    sock: Path,
    packed: bool,
    policy: str = "report",
    status_0: bool = False,
    files: StateFiles | None = None,
) -> Stopped:
    """Runs the first backend in-process (its queue's latency holds completions back).

    ``status_0``: stop as QEMU 7.2 does with STATUS negotiated, SET_STATUS 0 first.
    ``files``: the backend's ``emu serve --state-dir``."""
    dev = BlkDevice(disk, queue_max_size=1024)
    dev.policy = policy
    with in_process(dev, sock, files):
        fe = VhostUserDriver(sock)
        blk = BlkDriver.open(fe, packed=packed, queue_size=64)
        for i in range(READS):  # data the in-flight reads will find
            assert blk.write(8 * (100 + i), block(100 + i)) == S_OK
        q = dev.queues[0]
        hold_completions(q, HOLD if policy == "report" else DRAIN_LATENCY)
        expected: dict[int, bytes | None] = {}
        for i in range(WRITES):
            expected[blk.submit(T_OUT, 8 * i, out=block(i))] = None
        for i in range(READS):
            expected[blk.submit(T_IN, 8 * (100 + i), in_size=BLOCK)] = block(100 + i)
        wait_until(lambda: q.held() == WRITES + READS)  # all executed, none published
        if status_0:
            fe.set_u64(Req.SET_STATUS, 0)
        base = fe.stop_ring(0)
        state = fe.save_state()
        for i in range(LATER):  # the next backend finds these in the avail ring
            expected[blk.submit(T_OUT, 8 * (200 + i), out=block(200 + i))] = None
    (p,) = [p for p in decode(state).parts if p.type == parts.INFLIGHT]
    inflight = len(parts.KINDS[parts.INFLIGHT].decode(p.value[4:]))
    return Stopped(fe, blk, base, state, expected, inflight)


def reconnect(s: Stopped, sock: Path, packed: bool) -> None:
    """The same frontend (same guest memory, rings and driver state) on a new backend."""
    s.fe.sock.close()
    s.fe.sock = connect(sock)
    s.fe.init(packed=packed)


def finish_and_verify(s: Stopped, disk: Path) -> None:
    """Every request completes once, reads see the disk, writes reach it."""
    done = s.blk.wait(count=len(s.expected))
    assert sorted(c.token for c in done) == sorted(s.expected)
    for c in done:
        assert status_of(c) == S_OK
        if s.expected[c.token] is not None:
            assert c.data[:-1] == s.expected[c.token]
    # one more request: a duplicate completion would come first (and the driver raises)
    assert s.blk.read(0, 1) == block(0)[:SECTOR]
    data = disk.read_bytes()
    for i in [*range(WRITES), *range(100, 100 + READS), *range(200, 200 + LATER)]:
        assert data[8 * i * SECTOR : 8 * i * SECTOR + BLOCK] == block(i)


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("policy", ["report", "drain"])
@pytest.mark.parametrize("status_0", [False, True], ids=["enable-0", "status-0-first"])
def test_in_flight_requests_move_to_a_new_backend_process(
    disk: Path, tmp_path: Path, packed: bool, policy: str, status_0: bool
) -> None:
    """status-0-first: QEMU 7.2's stop; its reset must not lose the base or the requests."""
    s = stop_with_inflight(disk, tmp_path / "a.sock", packed, policy, status_0)
    assert s.inflight == (WRITES + READS if policy == "report" else 0)
    assert s.base & 0x7FFF == READS + WRITES + READS  # one slot per chain (indirect)
    sock = tmp_path / "b.sock"
    try:
        with emu_serve(sock, f"blk:{disk}"):
            reconnect(s, sock, packed)
            s.fe.load_state(s.state)
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
    finally:
        s.fe.close()


@pytest.mark.parametrize("packed", RINGS)
def test_loaded_state_seeds_a_fresh_inflight_region(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    """QEMU asks for an INFLIGHT_SHMFD region on the destination: the loaded chains go
    into it (and are not lost to its empty record)."""
    s = stop_with_inflight(disk, tmp_path / "a.sock", packed)
    sock = tmp_path / "b.sock"
    try:
        with in_process(BlkDevice(disk, queue_max_size=1024), sock):
            s.fe.want_inflight = True
            reconnect(s, sock, packed)
            assert s.fe.inflight_fd >= 0
            s.fe.load_state(s.state)
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
    finally:
        s.fe.close()


@pytest.mark.parametrize("packed", RINGS)
def test_state_files_for_frontends_without_device_state(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    """``emu serve --state-dir`` writes the state at GET_VRING_BASE; a fresh ``emu serve
    --restore-dir`` applies it when the frontend restarts the ring (QEMU 7.2's migration)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    sock = tmp_path / "blk.sock"
    spec = f"blk:{disk}"
    state_file = state_dir / "blk.sock.state"
    with emu_serve(sock, spec, "--policy", "report", "--state-dir", str(state_dir)):
        fe = VhostUserDriver(sock)
        try:
            blk = BlkDriver.open(fe, packed=packed, queue_size=64)
            assert blk.write(0, block(0)) == S_OK
            assert not state_file.exists()  # rings running: nothing saved yet
            fe.stop_ring(0)
            wait_until(state_file.exists)  # written after the answer: not in the downtime
            assert decode(state_file.read_bytes()).device_type == 2
        finally:
            fe.close()
    # held completions need the in-process backend: take its saved state, as a file
    s = stop_with_inflight(disk, tmp_path / "a.sock", packed)
    state_file.write_bytes(s.state)
    try:
        with emu_serve(sock, spec, "--restore-dir", str(state_dir), "--state-dir", str(state_dir)):
            s.fe.want_inflight = True  # as QEMU does
            reconnect(s, sock, packed)
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
            base = s.fe.stop_ring(0)
        saved = decode(state_file.read_bytes())  # the restored backend saved it again
        (ring,) = [p for p in saved.parts if p.type == parts.INFLIGHT]
        assert parts.KINDS[parts.INFLIGHT].decode(ring.value[4:]) == []
        assert parts.make(parts.TRANSPORT, {}).type in [p.type for p in saved.parts]
        assert base != s.base  # the ring moved on
    finally:
        s.fe.close()


@pytest.mark.parametrize("packed", RINGS)
def test_live_destination_starts_before_the_source_stops(
    disk: Path, tmp_path: Path, packed: bool
) -> None:
    """A live migration's order: the destination ``emu serve --restore-dir`` starts (and
    its frontend connects) while the source still runs; the source writes the state at
    its last GET_VRING_BASE; the destination takes it when its frontend starts the ring.
    Both sockets are named blk.sock, in directories of their own, over one state dir."""
    state_dir, src_dir, dst_dir = tmp_path / "state", tmp_path / "src", tmp_path / "dst"
    for d in (state_dir, src_dir, dst_dir):
        d.mkdir()
    dst_sock = dst_dir / "blk.sock"
    opts = ("--restore-dir", str(state_dir), "--state-dir", str(state_dir))
    with emu_serve(dst_sock, f"blk:{disk}", *opts) as dst:
        source_files = StateFiles(save_to=state_dir / "blk.sock.state")
        s = stop_with_inflight(disk, src_dir / "blk.sock", packed, files=source_files)
        try:
            assert s.inflight > 0 and dst.poll() is None
            reconnect(s, dst_sock, packed)
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
        finally:
            s.fe.close()


def test_restore_dir_waits_for_the_file_then_gives_up_clearly(disk: Path, tmp_path: Path) -> None:
    """The ring start waits for a state file that comes late (copied by other means);
    one that never comes refuses the start after ``--restore-timeout``, saying why."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    sock = tmp_path / "blk.sock"
    s = stop_with_inflight(disk, tmp_path / "src.sock", False)
    try:
        opts = ("--restore-dir", str(state_dir), "--restore-timeout", "20")
        with emu_serve(sock, f"blk:{disk}", *opts):
            reconnect(s, sock, False)
            late = threading.Timer(0.5, (state_dir / "blk.sock.state").write_bytes, [s.state])
            late.start()
            s.fe.restart_ring(0, s.base)  # its SET_VRING_KICK is answered once the file came
            late.join()
            finish_and_verify(s, disk)
    finally:
        s.fe.close()
    (state_dir / "blk.sock.state").unlink()
    opts = ("--restore-dir", str(state_dir), "--restore-timeout", "0.3")
    with emu_serve(sock, f"blk:{disk}", *opts) as proc:
        fe = VhostUserDriver(sock)
        try:
            with pytest.raises((ConnectionError, ProtocolError, FrontendError)):
                BlkDriver.open(fe)
        finally:
            fe.close()
        proc.terminate()
        assert b"no state file" in proc.stderr.read()  # type: ignore[union-attr]


def test_restore_dir_refuses_a_state_that_does_not_fit(disk: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "blk.sock.state").write_bytes(b"EMUSTATE but not really")
    cmd = [sys.executable, "-m", "emu.cli", "serve", "--socket", str(tmp_path / "blk.sock")]
    res = subprocess.run(
        [*cmd, "--restore-dir", str(state_dir), f"blk:{disk}"], capture_output=True, timeout=30
    )
    assert res.returncode != 0 and b"state" in res.stderr
    assert not (tmp_path / "blk.sock").exists()


def _inflight_heads_doubled(state: bytes) -> bytes:
    st = decode(state)
    for i, p in enumerate(st.parts):
        if p.type == parts.INFLIGHT:
            chains = parts.KINDS[parts.INFLIGHT].decode(p.value[4:])
            st.parts[i] = parts.make(parts.INFLIGHT, chains + chains[:1], vq=0)
    return encode(st)


def _writethrough(state: bytes) -> bytes:
    st = decode(state)
    for i, p in enumerate(st.parts):
        if p.type == parts.device_part(2):
            value = json.loads(p.value[4:])
            st.parts[i] = parts.make(p.type, dict(value, writeback=0))
    return encode(st)


def _device_json(state: bytes, raw: bytes) -> bytes:
    """The device part replaced by ``raw`` (hostile JSON), the rest left as it was."""
    st = decode(state)
    for i, p in enumerate(st.parts):
        if p.type == parts.device_part(2):
            st.parts[i] = Part(p.type, p.value[:4] + raw, p.selector, p.flags)
    return encode(st)


def _rng_state(tmp_path: Path) -> bytes:
    sock = tmp_path / "rng.sock"
    with in_process(RngDevice(), sock):
        fe = VhostUserDriver(sock)
        try:
            fe.init()
            fe.setup_queue(0)
            fe.driver_ok()
            fe.stop_ring(0)
            return fe.save_state()
        finally:
            fe.close()


BAD_STATES: dict[str, Callable[[bytes, Path], bytes]] = {
    "corrupt": lambda good, _: good[:100] + bytes([good[100] ^ 1]) + good[101:],
    "truncated": lambda good, _: good[: len(good) // 2],
    "empty": lambda good, _: b"",
    "another-device": lambda good, tmp: _rng_state(tmp),
    "duplicate-inflight-head": lambda good, _: _writethrough(_inflight_heads_doubled(good)),
    "json-100000-deep": lambda good, _: _device_json(good, b"[" * 100_000 + b"]" * 100_000),
    "json-5000-digits": lambda good, _: _device_json(good, b'{"capacity": ' + b"9" * 5000 + b"}"),
}


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("bad", BAD_STATES)
def test_refused_state_applies_nothing(disk: Path, tmp_path: Path, packed: bool, bad: str) -> None:
    s = stop_with_inflight(disk, tmp_path / "a.sock", packed)
    good = _writethrough(s.state)  # the device part says writethrough: visible if applied
    sock = tmp_path / "b.sock"
    try:
        with in_process(BlkDevice(disk, queue_max_size=1024), sock):
            reconnect(s, sock, packed)
            with pytest.raises(StateTransferError, match="failed"):
                s.fe.load_state(BAD_STATES[bad](good, tmp_path))
            assert s.fe.config_read(CONFIG_WRITEBACK, 1) == 1  # untouched
            s.fe.load_state(good)  # the refusal left the session able to load
            assert s.fe.config_read(CONFIG_WRITEBACK, 1) == 0
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
    finally:
        s.fe.close()


def test_restart_at_another_base_is_refused(disk: Path, tmp_path: Path) -> None:
    """A base that does not match the loaded ring would resubmit the wrong requests."""
    s = stop_with_inflight(disk, tmp_path / "a.sock", False)
    sock = tmp_path / "b.sock"
    try:
        with in_process(BlkDevice(disk, queue_max_size=1024), sock):
            reconnect(s, sock, False)
            s.fe.load_state(s.state)
            with pytest.raises(FrontendError, match="refused"):
                s.fe.restart_ring(0, s.base - 1)
            s.fe.restart_ring(0, s.base)
            finish_and_verify(s, disk)
    finally:
        s.fe.close()


def _state_fd(fe: VhostUserDriver, direction: int, phase: int, fd: int) -> int:
    try:
        answer = fe.request(Req.SET_DEVICE_STATE_FD, STATE_FD.pack(direction, phase), [fd])
    finally:
        os.close(fd)
    assert not answer.fds
    return U64.unpack(answer.payload)[0]


def test_transfers_the_backend_refuses(disk: Path, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    with in_process(BlkDevice(disk), sock):
        fe = VhostUserDriver(sock)
        try:
            blk = BlkDriver.open(fe)
            with pytest.raises(StateTransferError, match="refused"):
                fe.save_state()  # the ring runs
            fe.stop_ring(0)
            r, w = os.pipe()
            os.close(r)
            assert _state_fd(fe, 2, 0, w) == 1 << 8 | 1  # no such direction
            r, w = os.pipe()
            os.close(w)
            assert _state_fd(fe, 0, 1, r) == 1 << 8 | 1  # no such phase
            r, w = os.pipe()
            os.close(w)
            assert _state_fd(fe, 0, 0, r) == 1 << 8 | 1  # save into a read end
            assert _state_fd(fe, 1, 0, os.eventfd(0)) == 1 << 8 | 1  # not a pipe
            assert fe.get_u64(Req.CHECK_DEVICE_STATE) == 1  # nothing was transferred
            r, w = os.pipe()
            os.close(r)  # nobody reads: the transfer fails, and CHECK says so
            assert _state_fd(fe, 0, 0, w) == 1 << 8
            assert fe.get_u64(Req.CHECK_DEVICE_STATE) == 1
            fe.restart_ring(0, fe.stop_ring(0))  # the session goes on
            assert blk.write(1, block(1)) == S_OK
            fe.stop_ring(0)
            assert decode(fe.save_state()).device_type == 2
        finally:
            fe.close()


def test_dirty_log_gets_the_pages_the_backend_wrote(disk: Path, tmp_path: Path) -> None:
    """LOG_SHMFD/LOG_ALL (QEMU 7.2 will not migrate without them): when the ring stops,
    the pages emu wrote (the used ring, the buffers a read filled) are set in the log."""
    sock = tmp_path / "blk.sock"
    with in_process(BlkDevice(disk), sock):
        fe = VhostUserDriver(sock)
        log_fd = os.memfd_create("vhost-log", os.MFD_ALLOW_SEALING)  # as QEMU's (sealed)
        try:
            blk = BlkDriver.open(fe)
            base = fe.stop_ring(0)
            fe.set_u64(Req.SET_FEATURES, fe.features | 1 << 26 | 1 << 30)
            pages = fe.mem.size >> 12
            os.ftruncate(log_fd, pages // 8)
            answer = fe.request(Req.SET_LOG_BASE, struct.pack("<QQ", pages // 8, 0), [log_fd])
            assert answer.payload == U64.pack(0)
            fe.restart_ring(0, base)
            assert blk.read(0, 8) == bytes(BLOCK)
            fe.stop_ring(0)
            bits = int.from_bytes(os.pread(log_fd, pages // 8, 0), "little")
            used_page = fe.queues[0].device >> 12
            assert bits >> used_page & 1
            assert bin(bits).count("1") >= 2  # the used ring and the 4 KiB read buffer
        finally:
            os.close(log_fd)
            fe.close()


@pytest.mark.parametrize("bad", ["eventfd", "empty", "too-small"])
def test_hostile_dirty_log_closes_the_connection(disk: Path, tmp_path: Path, bad: str) -> None:
    sock = tmp_path / "blk.sock"
    with in_process(BlkDevice(disk), sock) as server:
        fe = VhostUserDriver(sock)
        try:
            fe.init()
            fd = os.eventfd(0) if bad == "eventfd" else os.memfd_create("vhost-log")
            size = 0 if bad == "empty" else 4096
            if bad == "too-small":
                os.ftruncate(fd, 100)
            with pytest.raises((ConnectionError, ProtocolError)):
                fe.request(Req.SET_LOG_BASE, struct.pack("<QQ", size, 0), [fd])
            os.close(fd)
        finally:
            fe.close()
        fe2 = VhostUserDriver(sock)  # the server serves the next frontend
        try:
            assert BlkDriver.open(fe2).write(0, block(0)) == S_OK
        finally:
            fe2.close()
        assert server.connections == 2


def test_a_state_saved_behind_virtio_mmio_loads_behind_vhost_user(disk: Path) -> None:
    """virtio-mmio's TRANSPORT part (its registers, optional) is another transport's to
    the vhost-user loader: skipped, so a device moves between transports as saved. A
    TRANSPORT part marked required is still refused: it says the state needs it."""
    mem = GuestMemory.create(IMAGE)
    src, dst = BlkDevice(str(disk)), BlkDevice(str(disk))
    try:
        tr = MmioTransport(src, mem)
        blk = BlkDriver.open(VirtioMmioDriver(tr, mem))
        blk.submit(T_OUT, 0, block(1))
        blk.wait(0, 1)
        tr.vmm_stop("report")
        state = tr.save()
        assert [p.optional for p in state.find(parts.TRANSPORT)] == [True]
        loaded = device_state.check(dst, state)
        assert 0 in loaded.rings and loaded.rings[0][0].next_used == 1
        required = DeviceState(
            state.device_type,
            [replace(p, flags=0) if p.type == parts.TRANSPORT else p for p in state.parts],
        )
        with pytest.raises(StateError, match="TRANSPORT"):
            device_state.check(dst, required)
    finally:
        src.close()
        dst.close()
        mem.close()
