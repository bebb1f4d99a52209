"""Dirty logging on running rings, as QEMU 7.2 drives it in a live migration.

emu's frontend sends QEMU's sequences (hw/virtio/vhost.c ``vhost_log_global_start`` /
``_stop``, ``vhost_dev_log_resize``; shared/traces/vhost-user/README.md 4.6) to emu's
blk backend while its ring runs: SET_LOG_BASE, SET_FEATURES + LOG_ALL and SET_VRING_ADDR
with VHOST_VRING_F_LOG (both need_reply) to start; SET_FEATURES and SET_VRING_ADDR
without the flag and without need_reply to cancel, or to roll back a refused start; a
second SET_LOG_BASE to resize the log mid-migration.

The main check is a migration played out in guest memory: the frontend copies all of
guest RAM to a "destination" when logging starts, then between rounds of I/O copies the
pages it wrote itself (its own dirty map: QEMU's tracking of guest CPU writes) and the
pages the backend logged, and once more after GET_VRING_BASE. The destination must then
equal the source byte for byte. Requests are made available before a copy and kicked
after it, so every page the backend writes is written after the copy that could have
picked it up by chance: only the log carries it. With the log hidden (the backend never
sets a bit) the same run must leave the destination stale, which shows the check sees
unreported pages.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emu.devices.blk import S_OK, T_IN, T_OUT, BlkDevice
from emu.memory import PAGE_SHIFT
from emu.testing.blk import BlkDriver, header, status_of
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user import dirty_log
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.dirty_log import (
    log_marks,
    log_marks_py,
    log_range,
    log_range_py,
    log_take,
    log_take_py,
)
from emu.vhost_user.frontend import UVA_OFFSET, FrontendError
from emu.vhost_user.protocol import VRING_ADDR, ProtocolError, Req

RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
BLOCK = 4096
BLOCKS = 64  # on disk before the migration; the rounds read them back
ROUNDS = 6
PER_ROUND = 12


def block(i: int) -> bytes:
    return hashlib.sha256(b"block %d" % i).digest() * (BLOCK // 32)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


@contextmanager
def backend(disk: Path, sock: Path, policy: str = "drain") -> Iterator[tuple[BlkDevice, Any]]:
    dev = BlkDevice(disk, queue_max_size=1024)
    dev.policy = policy
    server = VhostUserServer(dev, sock).start()
    try:
        yield dev, server
    finally:
        server.close()
        dev.close()


@contextmanager
def frontend(sock: Path, packed: bool = False) -> Iterator[tuple[VhostUserDriver, BlkDriver]]:
    fe = VhostUserDriver(sock)
    try:
        blk = BlkDriver.open(fe, packed=packed)
        for i in range(BLOCKS):
            assert blk.write(8 * i, block(i)) == S_OK
        yield fe, blk
    finally:
        fe.close()


# -- a migration played out in guest memory --


def copy_pages(dest: np.ndarray, src: np.ndarray, pages: set[int]) -> None:
    for p in pages:
        dest[p << PAGE_SHIFT : (p + 1) << PAGE_SHIFT] = src[p << PAGE_SHIFT : (p + 1) << PAGE_SHIFT]


def sync(fe: VhostUserDriver, dest: np.ndarray, src: np.ndarray) -> None:
    """One pass of the migration: the pages the guest (frontend) and the backend wrote."""
    copy_pages(dest, src, fe.dirty_pages() | set(fe.mem.get_and_clear_dirty()))


def round_of_io(fe: VhostUserDriver, dest: np.ndarray, src: np.ndarray, r: int) -> None:
    """Reads and writes made available, a pass copied, then the kick: the backend writes
    guest memory only after the pass that could have copied its pages by chance."""
    q = fe.queues[0]
    expected = {}
    for k in range(PER_ROUND):
        i = (r * PER_ROUND + k) % BLOCKS
        if k % 3 == 2:
            token = q.add([header(T_OUT, 8 * i), block(i)], [1])
            expected[token] = None
        else:
            expected[q.add([header(T_IN, 8 * i)], [BLOCK, 1])] = block(i)
    q.kick_needed()
    sync(fe, dest, src)
    fe.kick(0)
    done = fe.wait(0, count=len(expected))
    for c in done:
        assert status_of(c) == S_OK
        if expected[c.token] is not None:
            assert c.data[:-1] == expected[c.token]


def live_migration(
    fe: VhostUserDriver, resize_at: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (source, destination) RAM after the last pass."""
    src = fe.mem.regions[0].array
    fe.start_logging()
    fe.mem.get_and_clear_dirty()
    dest = src.copy()  # the first pass: all of RAM
    for r in range(ROUNDS):
        if r == resize_at:
            fe.set_log_base(2 * fe.log_size())  # QEMU's resize; it reads the old log once more
        round_of_io(fe, dest, src, r)
    fe.stop_ring(0)  # the VM stops: GET_VRING_BASE, then the last pass
    sync(fe, dest, src)
    return src, dest


def stale_pages(src: np.ndarray, dest: np.ndarray) -> list[int]:
    differ = np.flatnonzero(src != dest)
    return sorted({int(b) >> PAGE_SHIFT for b in differ})


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("policy", ["drain", "report"])
def test_live_migration_copies_every_page_the_backend_wrote(
    disk: Path, tmp_path: Path, packed: bool, policy: str
) -> None:
    sock = tmp_path / "blk.sock"
    with backend(disk, sock, policy) as (dev, _), frontend(sock, packed) as (fe, _):
        src, dest = live_migration(fe, resize_at=ROUNDS // 2)
        assert stale_pages(src, dest) == []


def test_negative_control_hidden_log_leaves_the_destination_stale(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same migration with the backend never setting a bit: the check must fail."""
    monkeypatch.setattr(dirty_log, "log_marks", lambda marks, bits, gpa: 0)
    monkeypatch.setattr(dirty_log, "log_range", lambda bits, gpa, length: 0)
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, _):
        src, dest = live_migration(fe)
        stale = stale_pages(src, dest)
        used_page = fe.queues[0].device >> PAGE_SHIFT
        assert used_page in stale
        assert len(stale) > ROUNDS  # read buffers too, not only the used ring


# -- what the log holds, and when --


class PushSpy:
    """Wraps a ring core: counts, at each push, the pages marked and not yet logged."""

    def __init__(self, ring: Any, mem: Any) -> None:
        self.ring, self.mem = ring, mem
        self.unlogged: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ring, name)

    def push(self, heads: np.ndarray, lengths: np.ndarray) -> bool:
        self.unlogged.append(sum(int(np.count_nonzero(r.dirty)) for r in self.mem.regions))
        return self.ring.push(heads, lengths)


@pytest.mark.parametrize("logging", [True, False], ids=["logging", "not-logging"])
def test_pages_are_logged_before_the_used_entries_are_published(
    disk: Path, tmp_path: Path, logging: bool
) -> None:
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, blk):
        if logging:
            fe.start_logging()
        q = dev.queues[0]
        spy = dev.call(lambda: setattr(q, "ring", PushSpy(q.ring, dev.mem)) or q.ring)
        for i in range(8):
            assert blk.read(8 * i, 8) == block(i)
        assert len(spy.unlogged) >= 8
        if logging:
            assert spy.unlogged == [0] * len(spy.unlogged)
        else:  # the check can see a page the device wrote and did not log
            assert min(spy.unlogged) > 0


def test_log_starts_empty_and_stops_with_cancel(disk: Path, tmp_path: Path) -> None:
    """Pages written before LOG_ALL are not reported (the first pass copies them); after a
    cancel the backend keeps serving and logs nothing more; logging can start again."""
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, blk):
        fe.start_logging()
        assert fe.dirty_pages() == set()
        assert blk.read(0, 8) == block(0)
        logged = fe.dirty_pages()
        used = fe.queues[0].device
        assert used >> PAGE_SHIFT in logged  # the used ring, at log_guest_addr
        assert len(logged) >= 2  # and the read buffer
        fe.stop_logging()  # migrate_cancel: no reply asked for either message
        assert fe.get_u64(Req.GET_FEATURES)  # a round trip: both were taken, the line is up
        for i in range(8):
            assert blk.read(8 * i, 8) == block(i)
        assert fe.dirty_pages() == set()
        fe.start_logging()  # a second attempt after the cancel
        assert blk.read(8, 8) == block(1)
        assert used >> PAGE_SHIFT in fe.dirty_pages()


def test_log_replaced_mid_migration(disk: Path, tmp_path: Path) -> None:
    """QEMU resizes the log: after the answer to the new SET_LOG_BASE nothing more goes
    into the old one (QEMU reads it a last time and frees it)."""
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, blk):
        fe.start_logging()
        old_log, old_fd = fe.log, fe.log_fd
        fe.log, fe.log_fd = None, -1  # kept here, not closed by the resize
        try:
            assert blk.read(0, 8) == block(0)
            fe.set_log_base(4 * fe.log_size())
            assert log_take(old_log).size > 0
            for i in range(4):
                assert blk.read(8 * i, 8) == block(i)
            assert log_take(old_log).size == 0
            assert fe.queues[0].device >> PAGE_SHIFT in fe.dirty_pages()
        finally:
            old_log.close()
            os.close(old_fd)


def addr_payload(
    fe: VhostUserDriver, flags: int, desc_shift: int = 0, log: int | None = None
) -> bytes:
    q = fe.queues[0]
    return VRING_ADDR.pack(
        0,
        flags,
        q.desc + UVA_OFFSET + desc_shift,
        q.device + UVA_OFFSET,
        q.driver + UVA_OFFSET,
        q.device if log is None else log,
    )


def test_refused_log_start_is_rolled_back_and_the_device_keeps_serving(
    disk: Path, tmp_path: Path
) -> None:
    """A running ring's addresses cannot change: the SET_VRING_ADDR that tries is refused
    (ack 1), and QEMU's rollback (flag cleared, no reply asked) is taken as it is."""
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, blk):
        fe.set_log_base()
        fe.set_u64(Req.SET_FEATURES, fe.features | 1 << dirty_log.F_LOG_ALL | fe.vhost_bits)
        with pytest.raises(FrontendError):
            fe.request(Req.SET_VRING_ADDR, addr_payload(fe, 1, desc_shift=4096))
        with pytest.raises(FrontendError):  # a log address beyond the log
            fe.request(Req.SET_VRING_ADDR, addr_payload(fe, 1, log=1 << 40))
        with pytest.raises(FrontendError):  # a flag nobody defined
            fe.request(Req.SET_VRING_ADDR, addr_payload(fe, 3))
        fe.stop_logging()  # the rollback
        assert fe.get_u64(Req.GET_FEATURES)  # a round trip: both messages were taken
        for i in range(4):
            assert blk.read(8 * i, 8) == block(i)
        assert fe.dirty_pages() == set()


@pytest.mark.parametrize("bad", ["ring-moved", "log-short-of-memory"])
def test_hostile_live_logging_closes_only_that_connection(
    disk: Path, tmp_path: Path, bad: str
) -> None:
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, server):
        with frontend(sock) as (fe, blk):
            with pytest.raises((ConnectionError, ProtocolError)):
                if bad == "ring-moved":  # no reply asked: only closing tells the frontend
                    fe.request(Req.SET_VRING_ADDR, addr_payload(fe, 0, desc_shift=4096), ack=False)
                    fe.get_u64(Req.GET_FEATURES)
                else:
                    fe.set_log_base(fe.log_size() // 2)
        with frontend(sock) as (fe, blk):  # the server serves the next frontend
            assert blk.read(0, 8) == block(0)
        assert server.connections == 2


def test_memory_beyond_the_log_is_refused_while_logging(disk: Path, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    with backend(disk, sock) as (dev, _), frontend(sock) as (fe, blk):
        fe.start_logging()
        end = fe.mem.regions[0].end
        fd = os.memfd_create("more-ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 1 << 20)
        region = struct.pack("<QQQQ", end + (64 << 20), 1 << 20, end + (64 << 20) + UVA_OFFSET, 0)
        with pytest.raises(FrontendError):
            fe.request(Req.ADD_MEM_REG, bytes(8) + region, [fd])
        os.close(fd)
        assert blk.read(0, 8) == block(0)  # still serving, still logging
        assert fe.queues[0].device >> PAGE_SHIFT in fe.dirty_pages()


# -- the bit setters: native and numpy agree --


@pytest.mark.parametrize("gpa", [0, 0x100000, 0x1800])
def test_native_log_marks_matches_numpy(gpa: int) -> None:
    rng = np.random.default_rng(7)
    marks = (rng.random(1000) < 0.05).astype(np.uint8)
    marks[-3:] = 1  # beyond a log of 992 pages, whatever the gpa
    logs, left = [], []
    for fn in (log_marks, log_marks_py):
        m, bits = marks.copy(), bytearray(124)
        beyond = fn(m, bits, gpa)
        logs.append(bytes(bits))
        left.append((beyond, m.tobytes()))
    assert logs[0] == logs[1] and left[0] == left[1]
    assert left[0][0] > 0
    taken = [sorted(int(p) for p in fn(bytearray(logs[0]))) for fn in (log_take, log_take_py)]
    assert taken[0] == taken[1] and taken[0]
    ranges = []
    for fn in (log_range, log_range_py):
        bits = bytearray(124)
        ranges.append(
            (
                fn(bits, gpa + 0x7FF, 3 << PAGE_SHIFT),
                fn(bits, 990 << PAGE_SHIFT, 5 << PAGE_SHIFT),
                bytes(bits),
            )
        )
    assert ranges[0] == ranges[1] and ranges[0][1] == 3


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_ring_writes_marked_before_a_memory_table_change_reach_the_log(
    tmp_path: Path, packed: bool
) -> None:
    """A live pass took the log; the frontend re-sends its memory table (the backend pauses
    the rings and drops the old table's page marks), then stops the ring: the page of the
    ring writes made since the last publish (packed: the used descriptor; split: the
    avail_event) must still reach the final log."""
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    dev = BlkDevice(img)
    srv = VhostUserServer(dev, tmp_path / "s").start()
    drv = VhostUserDriver(tmp_path / "s", add_mem_reg=False)
    try:
        blk = BlkDriver.open(drv, packed=packed)
        drv.start_logging()
        blk.read(0, 8)
        drv.dirty_pages()  # the live pass takes what is there
        q = drv.queues[0]
        ring_page = (q.desc if packed else q.device + 4 + 8 * q.size) >> PAGE_SHIFT
        drv.share_memory()  # SET_MEM_TABLE, the same regions
        drv.stop_ring(0)
        assert ring_page in drv.dirty_pages()
    finally:
        drv.close()
        srv.close()
        dev.close()
