"""NbdEngine against real nbdkit servers (memory and file plugins, delay/fua/log filters).

Asynchronous behaviour goes through the engine's small Python face (submit_py / reap_py /
cancel_reads_py / fence_py), which runs the same ``cdef`` calls the native blk plane uses.
Completions are awaited by polling the engine's eventfd with a deadline, so a lost Done
fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from emu.backends import _nbd
from emu.testing.nbdkit import Nbdkit, nbdkit_missing

NbdEngine = _nbd.NbdEngine
pytestmark = pytest.mark.skipif(nbdkit_missing() is not None, reason=str(nbdkit_missing()))

OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES = range(5)
F_FUA, F_MAY_UNMAP = 1, 2
MiB = 1 << 20

Server = Callable[..., Nbdkit]  # the nbd_server fixture (conftest.py)


def reap(engine: NbdEngine, n: int, timeout: float = 10.0) -> dict[int, int]:
    """Exactly ``n`` Dones (tag -> result), waiting on the engine's eventfd."""
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} Dones within {timeout} s"
        select.select([engine.fd], [], [], left)
        for tag, result in engine.reap_py(n - len(got)):
            assert tag not in got, f"two Dones for tag {tag}"
            got[tag] = result
    return got


def pattern(seed: int, n: int = 4096) -> bytes:
    return bytes((seed * 31 + i) & 0xFF for i in range(n))


def test_round_trip_memory(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    e = engines(nbd_server(["memory", "16M"]).uri)
    assert (e.size, e.readonly, e.outstanding) == (16 * MiB, False, 0)
    data = pattern(1, 12288)
    # a scatter list (gathered into one command) and a single buffer (zero copy)
    assert e.pwritev([data[:512], data[512:4096], data[4096:]], 65536) == 12288
    assert e.pwritev([pattern(2)], 0) == 4096
    parts = [bytearray(100), bytearray(4000), bytearray(8188)]
    assert e.preadv(parts, 65536) == 12288
    assert b"".join(parts) == data
    one = bytearray(4096)
    e.preadv([one], 0)
    assert one == pattern(2)
    e.flush()
    for unmap in (False, True):
        e.pwritev([data], 65536)
        e.write_zeroes(65536 + 4096, 4096, unmap=unmap)
        e.preadv([parts[2]], 65536 + 4096)
        assert parts[2] == bytes(8188)[:4096] + data[8192:12284]
    e.discard(0, 4096)  # advisory: the engine only has to succeed
    with pytest.raises(OSError) as bad:
        e.preadv([bytearray(4096)], 16 * MiB - 2048)  # past the end
    assert bad.value.errno == errno.EINVAL
    assert e.outstanding == 0


def test_requests_larger_than_the_socket_buffer(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """Writes that cannot leave in one send (libnbd then waits for POLLOUT, which the
    worker polls for), many in flight, and a 4 MiB scatter read back."""
    e = engines(nbd_server(["memory", "64M"]).uri)
    chunks = [os.urandom(MiB) for _ in range(16)]
    for i, chunk in enumerate(chunks):
        assert e.submit_py(OP_WRITE, i, [chunk[:4096], chunk[4096:]], i * MiB) == 0
    assert reap(e, 16) == dict.fromkeys(range(16), MiB)
    parts = [bytearray(MiB - 512), bytearray(3 * MiB + 512)]
    assert e.preadv(parts, 4 * MiB) == 4 * MiB
    assert b"".join(parts) == b"".join(chunks[4:8])


def test_round_trip_file_plugin(
    nbd_server: Server, engines: Callable[..., NbdEngine], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(pattern(7, 1 * MiB))
    e = engines(nbd_server(["file", f"file={disk}"]).uri)
    assert e.size == MiB
    buf = bytearray(4096)
    e.preadv([buf], 8192)
    assert buf == pattern(7, MiB)[8192 : 8192 + 4096]
    e.pwritev([pattern(9)], 4096)
    e.flush()
    assert disk.read_bytes()[4096:8192] == pattern(9)


def test_tcp_uri(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    with socket.socket() as probe:  # a free port, to hand to nbdkit
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = nbd_server(["memory", "1M"], port=port)
    assert srv.uri == f"nbd://127.0.0.1:{port}/"
    e = engines(srv.uri)
    e.pwritev([pattern(4)], 4096)
    got = bytearray(4096)
    e.preadv([got], 4096)
    assert (e.size, got) == (MiB, pattern(4))


def test_random_mix_matches_a_model(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    """Reads, scatter/gather writes, FUA writes, zeroes, discards and flushes, up to 16 in
    flight on disjoint blocks, against a bytearray model of the disk."""
    rng = random.Random(9)
    size = 256 * 4096
    e = engines(nbd_server(["memory", str(size)]).uri, depth=16)
    model = bytearray(size)
    inflight: dict[int, tuple[int, int, list[bytearray]]] = {}  # tag -> op, block, buffers
    busy: set[int] = set()
    undefined: set[int] = set()  # discarded blocks
    for tag in range(1500):
        while len(inflight) == 16 or (len(inflight) and rng.random() < 0.3):
            for t, result in reap(e, 1).items():
                op, block, bufs = inflight.pop(t)
                busy.discard(block)
                if op == OP_READ:
                    assert result == 4096
                    if block not in undefined:
                        assert b"".join(bufs) == model[block * 4096 : (block + 1) * 4096], t
                else:
                    assert result == (4096 if op == OP_WRITE else 0)
        block = rng.choice([b for b in range(256) if b not in busy])
        cuts = sorted(rng.sample(range(1, 4096), rng.randrange(4)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, 4096], strict=True)]
        op = rng.choice(
            [OP_READ, OP_READ, OP_WRITE, OP_WRITE, OP_WRITE_ZEROES, OP_DISCARD, OP_FLUSH]
        )
        span = slice(block * 4096, (block + 1) * 4096)
        bufs: list[bytearray] = []
        if op == OP_READ:
            bufs = [bytearray(n) for n in sizes]
            rc = e.submit_py(op, tag, bufs, block * 4096)
        elif op == OP_WRITE:
            data = rng.randbytes(4096)
            model[span] = data
            undefined.discard(block)
            offs = [0, *cuts]
            bufs = [bytearray(data[o : o + n]) for o, n in zip(offs, sizes, strict=True)]
            rc = e.submit_py(op, tag, bufs, block * 4096, 0, rng.choice([0, F_FUA]))
        elif op == OP_WRITE_ZEROES:
            model[span] = bytes(4096)
            undefined.discard(block)
            rc = e.submit_py(op, tag, None, block * 4096, 4096, rng.choice([0, F_MAY_UNMAP]))
        elif op == OP_DISCARD:  # the block's contents are undefined until written again
            undefined.add(block)
            rc = e.submit_py(op, tag, None, block * 4096, 4096)
        else:
            rc = e.submit_py(op, tag, None, 0, 0)
        assert rc == 0, (tag, op, rc)
        inflight[tag] = (op, block, bufs)
        busy.add(block)
    got = reap(e, len(inflight))
    assert all(r >= 0 for r in got.values())
    disk = bytearray(size)
    e.preadv([disk], 0)
    for block in undefined:
        disk[block * 4096 : (block + 1) * 4096] = model[block * 4096 : (block + 1) * 4096]
    assert disk == model


def test_read_only(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    ro_server = engines(nbd_server(readonly=True).uri)
    assert ro_server.readonly
    rw_server = nbd_server()
    ro_engine = engines(rw_server.uri, readonly=True)
    assert ro_engine.readonly
    for e in (ro_server, ro_engine):
        e.preadv([bytearray(512)], 0)
        e.flush()
        for refused in (
            partial(e.pwritev, [b"x" * 512], 0),
            partial(e.discard, 0, 4096),
            partial(e.write_zeroes, 0, 4096, unmap=True),
        ):
            with pytest.raises(OSError) as err:
                refused()
            assert err.value.errno in (errno.EROFS, errno.EPERM)
    # an engine that may write, on the same read-write server, still can
    engines(rw_server.uri).pwritev([b"x" * 512], 0)


def test_many_outstanding_at_once(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    srv = nbd_server(filters=["delay"], params=["rdelay=300ms"])
    e = engines(srv.uri, depth=32)
    for i in range(32):
        e.pwritev([pattern(i)], i * 4096)
    bufs = [bytearray(4096) for _ in range(32)]
    for i, buf in enumerate(bufs):
        assert e.submit_py(OP_READ, 1000 + i, [buf], i * 4096) == 0
    assert e.submit_py(OP_READ, 99, [bytearray(4096)], 0) == -errno.EAGAIN  # depth 32
    assert e.kick_py() == 0
    # all 32 were handed to the server before any of them came back
    assert e.outstanding == 32
    assert e.reap_py() == []
    assert reap(e, 32) == {1000 + i: 4096 for i in range(32)}
    assert e.outstanding == 0 and e.reap_py() == []
    assert all(buf == pattern(i) for i, buf in enumerate(bufs))


def test_bad_requests_are_refused_not_taken(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    e = engines(nbd_server(["memory", "1M"]).uri, depth=4)
    assert e.submit_py(OP_READ, 1, [bytearray(4096)], MiB) == -errno.EINVAL
    assert e.submit_py(OP_DISCARD, 2, None, MiB - 512, 4096) == -errno.EINVAL
    assert e.submit_py(9, 3, None, 0, 0) == -errno.EINVAL
    assert e.outstanding == 0
    assert e.submit_py(OP_READ, 4, [bytearray(0)], 0) == 0  # empty: answered at once
    assert reap(e, 1) == {4: 0}


def test_cancel_reads_leaves_buffers_untouched(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    srv = nbd_server(filters=["delay"], params=["rdelay=300ms"])
    e = engines(srv.uri, depth=8)
    e.pwritev([pattern(3, 8 * 4096)], 0)
    bufs = [bytearray(b"\xee" * 4096) for _ in range(8)]
    for i, buf in enumerate(bufs):
        assert e.submit_py(OP_READ, i, [buf], i * 4096) == 0
    assert e.cancel_reads_py() == 0
    # their Dones are there at once, without waiting for the server
    assert dict(e.reap_py()) == dict.fromkeys(range(8), -errno.ECANCELED)
    assert e.outstanding == 0
    # the server still holds them: their slots come back only when it answers, and the
    # refused submitter hears of it through fd
    assert e.submit_py(OP_READ, 50, [bytearray(4096)], 0) == -errno.EAGAIN
    deadline = time.monotonic() + 10
    while e.submit_py(OP_READ, 50, [bytearray(4096)], 0) == -errno.EAGAIN:
        assert select.select([e.fd], [], [], deadline - time.monotonic())[0], "no wakeup"
        assert e.reap_py() == []
    assert reap(e, 1) == {50: 4096}
    assert all(buf == b"\xee" * 4096 for buf in bufs)


def test_fence_waits_for_writes(nbd_server: Server, engines: Callable[..., NbdEngine]) -> None:
    srv = nbd_server(filters=["delay"], params=["wdelay=300ms"])
    e = engines(srv.uri)
    other = engines(srv.uri)
    for i in range(4):
        assert e.submit_py(OP_WRITE, i, [pattern(20 + i)], i * 4096) == 0
    assert e.submit_py(OP_WRITE_ZEROES, 9, None, 65536, 4096, 0) == 0
    assert e.fence_py() == 0
    got = bytearray(4 * 4096)
    other.preadv([got], 0)  # a second connection sees every write
    assert got == b"".join(pattern(20 + i) for i in range(4))
    # the Dones stay for reap
    assert dict(e.reap_py()) == {0: 4096, 1: 4096, 2: 4096, 3: 4096, 9: 0}


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("server_fua", [True, False])
def test_fua_write_is_durable_before_its_done(
    server_fua: bool, nbd_server: Server, engines: Callable[..., NbdEngine], tmp_path: Path
) -> None:
    """A server with FUA gets the flag; one without gets the write, then a flush, and the
    Done waits for the flush (nbdkit's log filter sees what the client sent)."""
    log = tmp_path / f"fua{server_fua}.log"
    filters = ["log"] + ([] if server_fua else ["fua"])
    params = [f"logfile={log}"]  # the fua filter defaults to not advertising FUA
    e = engines(nbd_server(filters=filters, params=params).uri)
    assert e.can_fua is server_fua
    assert e.submit_py(OP_WRITE, 1, [pattern(5)], 8192, 0, F_FUA) == 0
    assert reap(e, 1) == {1: 4096}
    # request lines: "connection=1 Write id=1 offset=... fua=1 ..."
    sent = [ln for ln in _log_lines(log) if re.search(r"connection=\d+ (Write|Flush) id=", ln)]
    if server_fua:
        assert any("Write" in ln and "fua=1" in ln for ln in sent)
        assert not any("Flush" in ln for ln in sent)
    else:
        kinds = ["Write" if "Write" in ln else "Flush" for ln in sent]
        assert kinds == ["Write", "Flush"]


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> None:
    """The worker thread logs after the Dones are out: wait for its line."""
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.01)


def test_server_killed_mid_io_then_back(
    nbd_server: Server,
    engines: Callable[..., NbdEngine],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(pattern(11, MiB))
    # the write is delayed too: answered before the kill (a loaded machine), it is no
    # longer of unknown fate
    delays = ["rdelay=500ms", "wdelay=500ms"]
    srv = nbd_server(["file", f"file={disk}"], filters=["delay"], params=delays)
    e = engines(srv.uri)
    caplog.set_level(logging.INFO, logger="emu.backends._nbd")
    bufs = [bytearray(b"\xee" * 4096) for _ in range(8)]
    for i, buf in enumerate(bufs):
        assert e.submit_py(OP_READ, i, [buf], i * 4096) == 0
    assert e.submit_py(OP_WRITE, 8, [pattern(12)], 65536) == 0
    srv.kill()
    # sent, never answered: their fate is unknown (the write may still have been applied)
    assert reap(e, 9) == dict.fromkeys(range(9), -errno.ENOTCONN)
    assert e.reap_py() == []
    assert all(buf == b"\xee" * 4096 for buf in bufs)
    assert not e.connected
    wait_for_log(caplog, "connection lost")
    # while it is gone: refused at once, not hung
    with pytest.raises(OSError) as err:
        e.preadv([bytearray(4096)], 0)
    assert err.value.errno == errno.EIO
    srv.start()
    deadline = time.monotonic() + 10
    buf = bytearray(4096)
    while True:
        try:
            e.preadv([buf], 4096)
            break
        except OSError as exc:
            assert exc.errno == errno.EIO
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.05)
    assert buf == pattern(11, MiB)[4096:8192]
    assert e.connected and e.reconnects == 1
    wait_for_log(caplog, "reconnected")
    e.pwritev([pattern(13)], 0)
    e.flush()
    assert disk.read_bytes()[:4096] == pattern(13)


def take_dones(accepted: set[int], got: dict[int, int], dones: list[tuple[int, int]]) -> None:
    """Records ``dones`` in ``got``: each for a tag submit took (``accepted``), once."""
    for t, result in dones:
        assert t in accepted, f"a Done for tag {t}, refused at submit"
        assert t not in got, f"two Dones for tag {t}"
        got[t] = result


def test_submits_racing_a_lost_connection_give_each_done_at_most_once(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """Submits from this thread while the server is killed under them and the worker drops
    the dead handle. A submit refused -EIO (the engine found dead) used to leave its slot
    marked in use, not answered, for a moment: a _drop scanning then queued a -ENOTCONN
    Done for it, and submit released it too (a stray Done for a refused tag or a tag twice,
    ``outstanding`` decremented twice). The window is narrow, so this is a stress test:
    a request refused at submit never gets a Done, an accepted one gets exactly one, and
    nothing stays outstanding."""
    rng = random.Random(9)
    data = pattern(21)
    end = time.monotonic() + 5
    rounds = 0
    while time.monotonic() < end:
        rounds += 1
        srv = nbd_server()
        e = engines(srv.uri, depth=32)
        killer = threading.Timer(rng.uniform(0.0, 0.03), srv.kill)
        killer.start()
        accepted: set[int] = set()
        got: dict[int, int] = {}
        take = partial(take_dones, accepted, got)
        tag = 0
        until = time.monotonic() + 0.15  # past the loss and the worker's drop
        while time.monotonic() < until:
            if tag % 2:
                rc = e.submit_py(OP_WRITE, tag, [data], tag % 64 * 4096)
            else:
                rc = e.submit_py(OP_READ, tag, [bytearray(4096)], tag % 64 * 4096)
            assert rc in (0, -errno.EIO, -errno.EAGAIN)
            if rc == 0:
                accepted.add(tag)
            tag += 1
            take(e.reap_py())
        killer.join()
        assert not e.connected
        deadline = time.monotonic() + 10
        while len(got) < len(accepted):
            assert time.monotonic() < deadline, f"{len(accepted) - len(got)} Dones missing"
            select.select([e.fd], [], [], 0.1)
            take(e.reap_py())
        assert e.outstanding == 0
        assert e.reap_py() == []
        assert set(got.values()) <= {4096, -errno.ENOTCONN}
        e.close()
    assert rounds >= 3


def test_close_with_requests_outstanding(nbd_server: Server) -> None:
    srv = nbd_server(filters=["delay"], params=["rdelay=300ms"])
    e = NbdEngine(srv.uri)
    buf = bytearray(b"\xee" * 4096)
    assert e.submit_py(OP_READ, 1, [buf], 0) == 0
    e.close()
    time.sleep(0.4)
    assert buf == b"\xee" * 4096
    with pytest.raises(OSError):
        e.preadv([bytearray(16)], 0)


def test_connect_failure_is_clear(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot connect"):
        NbdEngine(f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}")


def test_cancel_reads_racing_replies_gives_each_done_once(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """cancel_reads while the server answers the same reads: a reply landing between reap
    taking a canceled read and reap releasing the slots used to release the slot twice
    (a slot on the free stack twice: two requests in it, one Done lost, memory corrupted).
    Every tag must come back exactly once and the reads after it must carry the data."""
    e = engines(nbd_server(["memory", "4M"]).uri, depth=64)
    size = 128 * 1024  # long scatters in reap: a wide window for the replies
    e.pwritev([pattern(7, 16 * size)], 0)
    tag = 0

    def submit(tags: list[int], buf: bytearray, offset: int) -> None:
        nonlocal tag
        while (rc := e.submit_py(OP_READ, tag, [buf], offset)) == -errno.EAGAIN:
            # canceled reads still at the server hold the slots: fd says when one is back
            assert select.select([e.fd], [], [], 10)[0], "no slot came back"
            for t, _ in e.reap_py():
                tags.remove(t)
        assert rc == 0
        tags.append(tag)
        tag += 1

    for _ in range(1500):
        tags: list[int] = []
        for i in range(16):
            submit(tags, bytearray(size), i * size)
        e.cancel_reads_py()
        assert sorted(reap(e, len(tags))) == tags
        assert e.outstanding == 0
    bufs = [bytearray(size) for _ in range(16)]
    tags = []
    for i, buf in enumerate(bufs):
        submit(tags, buf, i * size)
    assert reap(e, len(tags)) == dict.fromkeys(tags, size)
    assert b"".join(bufs) == pattern(7, 16 * size)
