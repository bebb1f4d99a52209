"""NbdEngine against NBD servers that misbehave: one that stops answering (SIGSTOP), one
that accepts connections and never speaks (a tarpit), requests larger than a server takes
in one command. Each test failed on the engine before the fix it covers."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emu.backends import _nbd
from emu.testing.nbdkit import Nbdkit, nbdkit_missing

NbdEngine = _nbd.NbdEngine
pytestmark = pytest.mark.skipif(nbdkit_missing() is not None, reason=str(nbdkit_missing()))

OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES = range(5)
MiB = 1 << 20
#: how long a call may take against a silent server before the test calls it hung
BOUND_S = 10.0

Server = Callable[..., Nbdkit]  # the nbd_server fixture (conftest.py)


@pytest.fixture
def stopped(nbd_server: Server) -> Iterator[Callable[[Nbdkit], None]]:
    """SIGSTOPs a server; every one stopped is let go again at teardown."""
    held: list[Nbdkit] = []

    def stop(srv: Nbdkit) -> None:
        held.append(srv)
        srv.freeze()

    yield stop
    for srv in held:
        if srv.proc is not None:
            srv.thaw()


def pattern(seed: int, n: int) -> bytes:
    return (bytes((seed * 31 + i) & 0xFF for i in range(4096)) * (n // 4096 + 1))[:n]


def in_thread(fn: Callable[[], object], release: Callable[[], None]) -> tuple[object, float]:
    """``fn()`` and how long it took, in a thread so that a hang fails the test (after
    ``release`` has let the stuck call end, so that teardown does not hang as well)."""
    out: list[object] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(BOUND_S)
    hung = t.is_alive()
    if hung:
        release()
        t.join(BOUND_S)
    assert not hung, f"{fn} still blocked after {BOUND_S} s"
    return out[0], time.monotonic() - t0


def resume(srv: Nbdkit) -> Callable[[], None]:
    return srv.thaw


def test_fence_on_a_silent_server_times_out_and_the_write_is_fate_unknown(
    nbd_server: Server, engines: Callable[..., NbdEngine], stopped: Callable[[Nbdkit], None]
) -> None:
    """A write (and a read) outstanding at a server that stops answering: the fence gives
    it ``timeout``, then returns -ETIMEDOUT; the write's Done is -ENOTCONN (it was sent:
    the server may still apply it), the read's too, and the read's buffer stays as it was.
    Once the server answers again, the engine reconnects and serves.

    One request thread in the server: nbdkit 1.32 with several can abort (``raw_send_socket:
    Assertion `sock >= 0'``) when two of them reply on a connection the client has closed,
    which is what the engine does with the two given-up requests here; the server is gone
    then and nothing could reconnect."""
    srv = nbd_server(threads=1)
    e = engines(srv.uri)
    e.timeout = 0.5
    assert e.timeout == 0.5
    assert e.pwritev([pattern(1, 4096)], 0) == 4096
    stopped(srv)
    buf = bytearray(b"\xee" * 4096)
    assert e.submit_py(OP_WRITE, 1, [pattern(2, 4096)], 8192) == 0
    assert e.submit_py(OP_READ, 2, [buf], 0) == 0
    rc, took = in_thread(e.fence_py, resume(srv))
    assert rc == -errno.ETIMEDOUT
    assert 0.4 < took < 3.0
    assert e.outstanding == 2
    assert dict(e.reap_py()) == {1: -errno.ENOTCONN, 2: -errno.ENOTCONN}
    assert buf == b"\xee" * 4096
    assert not e.connected
    assert e.fence_py() == 0  # nothing left that could change the disk
    srv.thaw()
    deadline = time.monotonic() + BOUND_S
    got = bytearray(4096)
    while True:
        try:
            e.preadv([got], 0)
            break
        except OSError as exc:
            assert exc.errno == errno.EIO  # refused at once while disconnected
            assert srv.proc.poll() is None, f"the server died: {srv.proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.05)
    assert got == pattern(1, 4096)
    assert e.connected and e.reconnects == 1


def test_wait_on_a_silent_server_is_bounded(
    nbd_server: Server, engines: Callable[..., NbdEngine], stopped: Callable[[Nbdkit], None]
) -> None:
    """``wait`` (reap_py(block=True), and the blocking Python face built on it) returns
    within ``timeout`` when the server has gone silent, with -ENOTCONN Dones."""
    srv = nbd_server()
    e = engines(srv.uri)
    e.timeout = 0.3
    stopped(srv)
    assert e.submit_py(OP_READ, 7, [bytearray(512)], 0) == 0
    got, took = in_thread(lambda: e.reap_py(block=True), resume(srv))
    assert got == [(7, -errno.ENOTCONN)]
    assert took < 3.0
    assert e.outstanding == 0


def test_blocking_write_on_a_silent_server_raises_enotconn(
    nbd_server: Server, engines: Callable[..., NbdEngine], stopped: Callable[[Nbdkit], None]
) -> None:
    srv = nbd_server()
    e = engines(srv.uri)
    e.timeout = 0.3

    def write() -> int:
        try:
            e.pwritev([b"x" * 512], 0)
        except OSError as exc:
            return exc.errno
        return 0

    stopped(srv)
    assert in_thread(write, resume(srv))[0] == errno.ENOTCONN


def test_close_while_reconnecting_to_a_tarpit_returns(tmp_path: Path) -> None:
    """The server dies; in its place something accepts connections and never speaks. The
    worker's reconnect must not sit in a handshake that ``close`` waits for."""
    srv = Nbdkit(tmp_path / "nbd.sock", ["memory", "16M"]).start()
    engine = NbdEngine(srv.uri, depth=4)
    engine.timeout = 60.0  # the connect deadline is no way out here: close must be
    srv.kill()
    tarpit = socket.socket(socket.AF_UNIX)
    held: list[socket.socket] = []
    try:
        srv.socket.unlink(missing_ok=True)
        tarpit.bind(str(srv.socket))
        tarpit.listen(8)
        accepted = threading.Event()

        def accept() -> None:
            held.append(tarpit.accept()[0])
            accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        for _ in range(50):  # the loss is noticed, a submit asks for a reconnect
            engine.submit_py(OP_READ, 1, [bytearray(512)], 0)
            engine.kick_py()
            if accepted.wait(0.1):
                break
        assert accepted.is_set(), "the worker never tried to reconnect"
        _, took = in_thread(engine.close, lambda: [conn.close() for conn in held])
        assert took < 2.0
    finally:
        for conn in held:
            conn.close()
        tarpit.close()


def test_connect_to_a_tarpit_fails_within_the_timeout(tmp_path: Path) -> None:
    """The first connect is bounded as well (``timeout``, default 5 s)."""
    path = tmp_path / "tarpit.sock"
    tarpit = socket.socket(socket.AF_UNIX)
    try:
        tarpit.bind(str(path))
        tarpit.listen(8)

        def connect() -> str:
            try:
                NbdEngine(f"nbd+unix:///?socket={path}").close()
            except OSError as exc:
                return str(exc)
            return "connected"

        why, took = in_thread(connect, tarpit.close)
        assert "cannot connect" in why and "no handshake" in why
        assert took < 7.0
    finally:
        tarpit.close()


def test_a_65_mib_request_is_split_for_libnbd(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """libnbd refuses a read or write over 64 MiB (ERANGE); the engine sends it in pieces,
    with one Done for the request, through the blocking face and through submit."""
    e = engines(nbd_server(["memory", "128M"]).uri)
    data = pattern(3, 65 * MiB)
    assert e.pwritev([data[:MiB], data[MiB:]], 0) == 65 * MiB  # gathered: bounce, pieces
    buf = bytearray(65 * MiB)
    assert e.preadv([buf], 0) == 65 * MiB
    assert buf == data
    parts = [bytearray(MiB) for _ in range(65)]
    assert e.submit_py(OP_READ, 9, parts, 0) == 0
    assert e.reap_py(block=True) == [(9, 65 * MiB)]
    assert b"".join(parts) == data
    assert e.submit_py(OP_WRITE, 10, [data[::-1]], 0) == 0  # one segment: zero copy
    assert e.reap_py(block=True) == [(10, 65 * MiB)]
    assert e.preadv([buf], 0) == 65 * MiB
    assert buf == data[::-1]


def test_requests_over_the_advertised_maximum_are_split(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """A server advertising a 256 KiB maximum (and refusing more, EINVAL) serves 1 MiB
    reads, writes and write-zeroes sent through the engine."""
    srv = nbd_server(
        ["memory", "16M"],
        filters=["blocksize-policy"],
        params=["blocksize-maximum=256K", "blocksize-error-policy=error"],
    )
    e = engines(srv.uri)
    data = pattern(4, MiB + 4096)
    assert e.pwritev([data], 4096) == len(data)
    buf = bytearray(len(data))
    assert e.preadv([buf], 4096) == len(data)
    assert buf == data
    e.write_zeroes(4096, MiB, unmap=False)
    assert e.preadv([buf], 4096) == len(data)
    assert buf == bytes(MiB) + data[MiB:]
    e.discard(0, 2 * MiB)


def test_write_zeroes_over_4_gib_is_split(
    nbd_server: Server, engines: Callable[..., NbdEngine]
) -> None:
    """NBD's length field is 32 bits: a write-zeroes (or discard) of 5 GiB goes out in
    pieces (libnbd refuses it whole, ERANGE)."""
    e = engines(nbd_server(["memory", "6G"]).uri)
    gib = 1 << 30
    e.pwritev([b"\xff" * 4096], 5 * gib - 4096)
    e.write_zeroes(0, 5 * gib, unmap=True)
    buf = bytearray(4096)
    e.preadv([buf], 5 * gib - 4096)
    assert buf == bytes(4096)
    e.discard(0, 5 * gib)
