"""virtio-balloon: pages the guest gives up really go back to the host.

Guest RAM is a memfd (as QEMU's memory-backend-memfd) or a file (as UML's RAM); the host's
view of it is the file's allocated blocks (``os.fstat(fd).st_blocks``, 512-byte units).
Every test first writes all of guest RAM, so every page is allocated and nothing the
driver writes later allocates more: the counts below are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from modes import wait_until

from emu.commands.balloon import ask
from emu.commands.balloon import command as balloon_cli
from emu.devices import registry
from emu.devices.balloon import (
    F_DEFLATE_ON_OOM,
    F_REPORTING,
    F_STATS_VQ,
    BalloonDevice,
    queue_roles,
)
from emu.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from emu.testing.balloon import DEFAULT_STATS, BalloonDriver, touch
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.protocol import BackendReq

RAM = 32 << 20
BLOCKS_PER_PAGE = PAGE_SIZE // 512
RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
LAYOUTS = ["spec", "linux"]


def blocks(mem: GuestMemory) -> int:
    return os.fstat(mem.regions[0].fd).st_blocks


def fill(mem: GuestMemory) -> None:
    """Allocate every page of guest RAM (a guest that has used all its memory)."""
    for r in mem.regions:
        r.mm[:] = b"\x11" * r.size


@pytest.fixture
def guest(tmp_path):
    """(BalloonDriver, device, mem) over virtio-mmio; keyword arguments go to open()."""
    made = []

    def _open(backing: str = "memfd", device: BalloonDevice | None = None, **opts):
        mem = GuestMemory.create(RAM, backing=tmp_path / "ram" if backing == "file" else backing)
        fill(mem)
        dev = device or BalloonDevice()
        made.append((dev, mem))
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        bd = BalloonDriver.open(drv, **opts)
        return bd, dev, mem

    yield _open
    for dev, mem in made:
        dev.close()
        mem.close()


def test_features_config_and_queue_roles(guest):
    bd, dev, _ = guest()
    offered = 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING
    assert bd.drv.features & 0xFFFFFF == offered
    assert bd.drv.transport.read(mmio_regs.DEVICE_ID, 4) == 5
    assert (bd.target, bd.actual) == (0, 0)
    bd.set_actual(7)
    assert dev.actual == 7 and bd.actual == 7
    bd.drv.config_write(0, 4, 1234)  # num_pages is the host's: the write is ignored
    assert bd.target == 0
    # the spec's fixed indexes and Linux-before-6.11's consecutive ones never disagree
    both = 1 << F_STATS_VQ | 1 << F_REPORTING
    assert queue_roles(both) == {
        0: "inflate",
        1: "deflate",
        2: "stats",
        3: "reporting",
        4: "reporting",
    }
    assert queue_roles(1 << F_REPORTING) == {
        0: "inflate",
        1: "deflate",
        2: "reporting",
        4: "reporting",
    }
    assert queue_roles(0) == {0: "inflate", 1: "deflate"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("backing", ["memfd", "file"])
def test_inflate_gives_exactly_those_pages_back(guest, packed, layout, backing):
    bd, dev, mem = guest(backing, packed=packed, layout=layout)
    pool = bd.take_pages(1024)
    # scattered pages, a duplicate (in the first chain of 256 PFNs), a run: 300 pages
    pfns = pool[0:400:2] + [pool[0]] + pool[600:700]
    before = blocks(mem)
    bd.inflate(pfns)
    assert before - blocks(mem) == 300 * BLOCKS_PER_PAGE
    assert mem.read(pool[600] << PAGE_SHIFT, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert mem.read(pool[1] << PAGE_SHIFT, 4) == b"\x11" * 4  # a neighbour is untouched
    assert dev.counters["inflated_pages"] == 300 and dev.counters["ignored_pfns"] == 1
    assert dev.counters["released_bytes"] == 300 * PAGE_SIZE


@pytest.mark.parametrize("packed", RINGS)
def test_deflate_then_touch_refaults(guest, packed):
    bd, _, mem = guest(packed=packed)
    pfns = bd.take_pages(256)
    before = blocks(mem)
    bd.inflate(pfns)
    assert blocks(mem) == before - 256 * BLOCKS_PER_PAGE
    bd.deflate(pfns)
    assert blocks(mem) == before - 256 * BLOCKS_PER_PAGE  # deflate alone costs the host nothing
    touch(mem, pfns, 0x5A)
    assert blocks(mem) == before
    assert mem.read(pfns[-1] << PAGE_SHIFT, PAGE_SIZE) == b"\x5a" * PAGE_SIZE


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packed", RINGS)
def test_free_page_reporting_gives_ranges_back(guest, packed, layout):
    bd, dev, mem = guest(packed=packed, layout=layout)
    pool = bd.take_pages(1024)
    start = pool[0] << PAGE_SHIFT
    before = blocks(mem)
    # two 1 MiB ranges with a page kept between them, as Linux reports buddy blocks
    bd.report([(start, 1 << 20), (start + (1 << 20) + PAGE_SIZE, 1 << 20)])
    assert before - blocks(mem) == 512 * BLOCKS_PER_PAGE
    assert mem.read(start + (1 << 20), 4) == b"\x11" * 4
    assert dev.counters["reported_bytes"] == 2 << 20
    # reported pages are the guest's again once used: touching them allocates them
    touch(mem, pool[:256])
    assert before - blocks(mem) == 256 * BLOCKS_PER_PAGE


@pytest.mark.parametrize("packed", RINGS)
def test_target_change_raises_a_config_interrupt_and_the_guest_follows(guest, packed):
    bd, dev, mem = guest(packed=packed)
    bd.pool = bd.take_pages(2048)
    before = blocks(mem)
    seen = bd.drv.config_interrupts
    dev.set_target(1024)
    bd.drv.handle_interrupt()
    assert bd.drv.config_interrupts == seen + 1
    assert bd.target == 1024
    assert bd.balance() == 1024
    assert dev.actual == 1024
    assert before - blocks(mem) == 1024 * BLOCKS_PER_PAGE
    dev.set_target(1024)  # no change: no interrupt
    bd.drv.handle_interrupt()
    assert bd.drv.config_interrupts == seen + 1
    dev.set_target(256)
    bd.drv.handle_interrupt()
    assert bd.drv.config_interrupts == seen + 2
    assert bd.balance() == -768 and dev.actual == 256
    with pytest.raises(ValueError, match="more than the guest's RAM"):
        dev.set_target((RAM >> PAGE_SHIFT) + 1)


@pytest.mark.parametrize("packed", RINGS)
def test_stats_round_trip(guest, packed):
    first = {4: 100 << 20, 5: 256 << 20, 99: 7}  # 99: no such tag, ignored
    bd, dev, _ = guest(packed=packed, initial_stats=first)
    wait_until(lambda: dev.stats()["stats"] != {})
    assert dev.stats()["stats"] == {"free-memory": 100 << 20, "total-memory": 256 << 20}
    got: dict = {}
    asker = threading.Thread(target=lambda: got.update(dev.stats(refresh=True, timeout=5)))
    asker.start()
    bd.answer_stats({4: 50 << 20, 7: 3 << 20})  # the device gave the buffer back
    asker.join()
    assert got["fresh"] is True
    assert got["stats"] == {"free-memory": 50 << 20, "disk-caches": 3 << 20}
    assert got["age_s"] < 5
    # without the stats queue there is nothing to refresh: the answer comes at once
    bd2, dev2, _ = guest(stats=False)
    assert "stats" not in bd2.q
    assert dev2.stats(refresh=True, timeout=30) == {"stats": {}, "age_s": None, "fresh": False}


def _serve_guest(bd: BalloonDriver, stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=bd.serve, args=(stop, lambda: {**DEFAULT_STATS, 4: 42 << 20}))
    t.start()
    return t


def test_control_socket_and_cli(guest, tmp_path):
    path = tmp_path / "balloon.ctl"
    (dev,) = registry.make_devices([f"balloon,control={path}"])
    bd, _, mem = guest(device=dev)
    bd.pool = bd.take_pages(4096)
    before = blocks(mem)
    stop = threading.Event()
    t = _serve_guest(bd, stop)
    try:
        assert ask(str(path), "target 8") == {"ok": True, "target_mib": 8.0, "actual_mib": 0.0}
        assert dev.wait_actual(2048, 10)
        assert before - blocks(mem) == 2048 * BLOCKS_PER_PAGE
        info = ask(str(path), "info")
        assert info["ok"] and info["target_pages"] == 2048 and info["actual_pages"] == 2048
        assert info["inflated_pages"] == 2048 and info["ram_pages"] == RAM >> PAGE_SHIFT
        assert info["backing_allocated_bytes"] == blocks(mem) * 512
        assert info["features"] == ["deflate_on_oom", "page_reporting", "stats_vq"]
        stats = ask(str(path), "stats")
        assert stats["ok"] and stats["fresh"] and stats["stats"]["free-memory"] == 42 << 20
        assert ask(str(path), "target 1 2")["ok"] is False
        assert ask(str(path), "target -1")["ok"] is False
        assert "more than the guest's RAM" in ask(str(path), "target 100000")["error"]
        assert ask(str(path), "bogus")["ok"] is False
        # the CLI: same answers, exit status 1 on a refusal
        run = CliRunner().invoke(balloon_cli, ["--control", str(path), "target", "2"])
        assert run.exit_code == 0, run.output
        assert json.loads(run.output)["target_mib"] == 2.0
        assert dev.wait_actual(512, 10)
        run = CliRunner().invoke(balloon_cli, ["--control", str(path), "target", "100000"])
        assert run.exit_code == 1 and json.loads(run.output)["ok"] is False
        # the installed entry point, as a user runs it
        out = subprocess.run(
            [sys.executable, "-m", "emu.cli", "balloon", "--control", str(path), "info"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            check=True,
        )
        assert json.loads(out.stdout)["actual_pages"] == 512
    finally:
        stop.set()
        t.join()
    dev.close()
    assert not path.exists()  # the control socket goes with the device


def test_control_socket_holds_against_garbage(tmp_path):
    """Long lines, many clients, binary junk: refused, and the server answers after."""
    import socket

    from emu.backends.balloon_control import MAX_CLIENTS, MAX_LINE

    path = tmp_path / "c.sock"
    (dev,) = registry.make_devices([f"balloon,control={path}"])
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"x" * (MAX_LINE + 10))
            assert b"longer than" in s.recv(4096)
            assert s.recv(4096) == b""  # and it was dropped
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"\xff\xfe\x00\n")
            assert json.loads(s.makefile().readline())["ok"] is False
        idle = []
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            idle.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(str(path))
        assert b"more than" in extra.recv(4096)
        extra.close()
        for s in idle:
            s.close()
        wait_until(lambda: ask(str(path), "info")["ok"])
        assert ask(str(path), "target")["target_mib"] == 0.0
    finally:
        dev.close()


@pytest.mark.parametrize("ram", ["memfd", "file"])
def test_over_vhost_user_the_frontends_ram_is_released(tmp_path, ram):
    """Served as emu serve serves it: the frontend's memfd (QEMU) or file (UML) loses the
    pages, and a new target reaches the frontend as CONFIG_CHANGE_MSG."""
    dev = BalloonDevice(queue_max_size=registry.QUEUE_MAX)
    server = VhostUserServer(dev, tmp_path / "b.sock").start()
    fe = VhostUserDriver(
        server.path, RAM, ram=tmp_path / "ram" if ram == "file" else "memfd", backend_req=True
    )
    try:
        fill(fe.mem)
        bd = BalloonDriver.open(fe, layout="linux")  # UML 6.1's numbering
        pfns = bd.take_pages(512)
        before = blocks(fe.mem)
        bd.inflate(pfns)
        assert before - blocks(fe.mem) == 512 * BLOCKS_PER_PAGE
        dev.set_target(300)
        msgs = fe.backend_requests(timeout=5)
        assert [m.req for m in msgs] == [BackendReq.CONFIG_CHANGE_MSG]
        assert fe.config_interrupts == 1 and bd.target == 300
        bd.set_actual(300)  # SET_CONFIG
        assert dev.wait_actual(300, 5)
    finally:
        fe.close()
        server.close()
        dev.close()


@pytest.mark.parametrize("packed", RINGS)
def test_state_carries_target_actual_stats_and_the_held_stats_buffer(guest, packed):
    bd, dev, mem = guest(packed=packed, initial_stats={4: 5 << 20})
    bd.pool = bd.take_pages(512)
    dev.set_target(100)
    bd.balance()
    wait_until(lambda: dev.stats()["stats"] != {})
    tr = bd.drv.transport
    tr.vmm_stop("report")
    state, saved = tr.save(), bd.drv.save()
    dev.close()
    fresh = BalloonDevice()
    try:
        drv = VirtioMmioDriver.load(MmioTransport(fresh, mem), mem, saved)
        drv.transport.restore(state)
        assert (fresh.num_pages, fresh.actual) == (100, 100)
        assert fresh.stats()["stats"] == {"free-memory": 5 << 20}
        # the stats buffer held at the save is held again: a refresh goes through it
        bd2 = BalloonDriver(drv, bd.q)
        got: dict = {}
        asker = threading.Thread(target=lambda: got.update(fresh.stats(refresh=True, timeout=5)))
        asker.start()
        bd2.answer_stats({4: 6 << 20})
        asker.join()
        assert got["fresh"] and got["stats"] == {"free-memory": 6 << 20}
        before = blocks(mem)
        bd2.inflate(bd2.take_pages(10))
        assert before - blocks(mem) == 10 * BLOCKS_PER_PAGE
    finally:
        fresh.close()


@pytest.mark.parametrize(
    "state, why",
    [
        ({"target": 1, "actual": 0, "stats": [[99, 1]]}, "not \\(known tag"),
        ({"target": 1, "actual": 0, "stats": [[4]]}, "not \\(known tag"),
        ({"target": 1 << 32, "actual": 0, "stats": []}, "outside"),
        ({"target": 1, "actual": 0, "stats": [], "extra": 1}, "unknown fields"),
        ({"target": 1, "stats": []}, "missing fields"),
    ],
)
def test_bad_states_are_refused_whole(state, why):
    from emu.state.format import StateError

    dev = BalloonDevice(target_pages=7)
    try:
        with pytest.raises(StateError, match=why):
            dev.load_state(state)
        assert (dev.num_pages, dev.actual, dev.stats()["stats"]) == (7, 0, {})
    finally:
        dev.close()


def test_a_frontend_that_never_reads_its_channel_does_not_hold_the_host(tmp_path, caplog):
    """Config change notices are sent without blocking: once the frontend's channel is
    full they are dropped (logged 1st, 2nd, 4th... time), and set_target returns."""
    import logging

    dev = BalloonDevice(queue_max_size=registry.QUEUE_MAX)
    server = VhostUserServer(dev, tmp_path / "b.sock").start()
    fe = VhostUserDriver(server.path, RAM, backend_req=True)
    try:
        BalloonDriver.open(fe)
        with caplog.at_level(logging.WARNING, "emu.vhost_user.backend"):
            for i in range(100_000):
                dev.set_target(i % 2)
        lost = [r for r in caplog.records if "notice not sent" in r.message]
        assert 1 <= len(lost) <= 17
        sent = fe.backend_requests()  # those sent before it filled are whole
        assert len(sent) > 100 and {(m.req, m.flags) for m in sent} == {(2, 1)}
    finally:
        fe.close()
        server.close()
    dev.set_target(5)  # no frontend any more: nothing to tell, nothing fails
    dev.close()


def test_emu_serve_balloon_with_its_control_socket(tmp_path):
    """`emu serve --socket S balloon,control=C` as a user starts it, a vhost-user guest
    (UML's queue numbering, RAM in a file as UML's) following the target that
    `emu balloon --control C target` sets: the file loses what the guest gave."""
    sock, ctl = tmp_path / "b.sock", tmp_path / "b.ctl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    serve = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", "serve", "--socket", str(sock), f"balloon,control={ctl}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stop = threading.Event()
    fe = None
    try:
        fe = VhostUserDriver(sock, RAM, ram=tmp_path / "ram", backend_req=True)
        fill(fe.mem)
        bd = BalloonDriver.open(fe, layout="linux")
        bd.pool = bd.take_pages(2048)
        before = blocks(fe.mem)
        t = _serve_guest(bd, stop)
        cli = [sys.executable, "-m", "emu.cli", "balloon", "--control", str(ctl)]
        out = subprocess.run([*cli, "target", "4"], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and json.loads(out.stdout)["target_mib"] == 4.0
        wait_until(lambda: ask(str(ctl), "info")["actual_pages"] == 1024)
        assert before - blocks(fe.mem) == 1024 * BLOCKS_PER_PAGE
        assert [m.req for m in fe.backend_requests(timeout=5)] == [BackendReq.CONFIG_CHANGE_MSG]
        out = subprocess.run([*cli, "stats"], env=env, capture_output=True, text=True)
        assert json.loads(out.stdout)["stats"]["free-memory"] == 42 << 20
        stop.set()
        t.join()
    finally:
        stop.set()
        if fe is not None:
            fe.close()
        serve.terminate()
        text = serve.communicate(timeout=30)[0]
    assert f"balloon: control socket {ctl}" in text
    assert not ctl.exists()


def test_legacy_driver_first_stats_buffer_is_ignored():
    """The spec: over the legacy interface the first stats buffer held garbage."""
    mem = GuestMemory.create(RAM)
    dev = BalloonDevice()
    try:
        drv = VirtioMmioDriver(MmioTransport(dev, mem, version=1), mem)
        bd = BalloonDriver.open(drv, initial_stats={4: 666})
        assert not drv.features >> 32  # no VERSION_1
        wait_until(lambda: len(dev.queues[2].inflight()) == 1)  # the device holds it
        assert dev.stats()["stats"] == {}
        got: dict = {}
        asker = threading.Thread(target=lambda: got.update(dev.stats(refresh=True, timeout=5)))
        asker.start()
        bd.answer_stats({4: 7})
        asker.join()
        assert got["stats"] == {"free-memory": 7}
        bd.inflate(bd.take_pages(4))  # and the rest works over the legacy transport
        assert dev.counters["released_bytes"] == 4 * PAGE_SIZE
    finally:
        dev.close()
        mem.close()


def test_spec_options(tmp_path):
    (dev,) = registry.make_devices(["balloon,target=16,reporting=off,stats=off,packed=off"])
    try:
        assert dev.num_pages == 16 * 256
        offered = dev.features & 0xFFFFFF
        assert offered == 1 << F_DEFLATE_ON_OOM
    finally:
        dev.close()
    for bad, why in (
        ("balloon:x", "no argument"),
        ("balloon,target=-1", "whole number"),
        ("balloon,target=1x", "whole number"),
        ("balloon,target=99999999", "whole number"),
        ("balloon,stats=maybe", "on or off"),
        ("balloon,control=", "socket path"),
        (f"balloon,control={tmp_path}/no/such/dir/c.sock", "No such file"),
        ("balloon,colour=red", "option 'colour'"),
    ):
        with pytest.raises(registry.SpecError, match=why):
            registry.make_devices([bad])
