"""virtio-fs state that only emu knows (nodes, open handles, the FUSE session) carried
from one ``emu serve`` process to a fresh one, with a real guest holding files open.

What QEMU 7.2 here cannot do (docs/fs.md, "Snapshot and restore"): its
vhost-user-fs-device is not migratable (QMP ``migrate`` answers "State blocked by
non-migratable device"), and it cannot reconnect to a restarted backend (with
``reconnect=1`` the device fails at init), so a real guest cannot be moved onto a fresh
``emu serve``. What is done instead, in one guest boot:

1. A QEMU microvm guest mounts emu's fs (``emu serve --policy drain --state-dir``). Its
   processes hold files open: a reader mid-file (16 KiB chunks through one fd, a sha256
   per chunk), an appender (numbered lines through one O_APPEND fd), ``find`` listing a
   directory (its directory fd held, mid-listing, while ``-exec`` children run), a
   reader of a file it replaced on the host (``victim``) and a reader of a file the guest
   itself unlinked while open (``scratch``). Each stops at a gate (a file the host makes
   in the share) after its first part, so its position is known exactly.
2. QMP ``stop``: QEMU sends GET_VRING_BASE, emu serve writes the state file. The host
   decodes it: the fs part lists those files' nodes (path, st_dev/st_ino, file handle)
   and their handles (open flags, directory or not); ``scratch`` has no path.
3. The host replaces ``victim`` (delete, recreate with other bytes).
4. A fresh ``emu serve --restore-dir`` process takes the state; emu's Python vhost-user
   frontend stands in for a migrated QEMU (the saved features, rings whose indexes start
   where the saved ones stand) and sends FUSE requests on the guest's own node ids and
   handles: the reader's handle reads the next bytes, the appender's appends at the end
   (even when asked to write at offset 0: O_APPEND came along), the listing goes on
   where the guest's will, ``victim`` and ``scratch`` answer ESTALE, the session is the
   guest's (a second INIT is refused). Its append is cut off again before step 6.
5. The first ``emu serve`` (started with a test hook) drops every node and handle it
   holds and loads the same state file, as the fresh process did: from here on the
   guest is served by nodes and handles reopened from the file, not by the fds it had.
6. QMP ``cont``: the processes go on. The reader's chunks are the host file's, the
   appender's file has every line once in order, ``find`` printed every entry once in the
   host's order, and ``victim`` / ``scratch`` reads end in an error (ESTALE) once they
   leave the guest's page cache, after giving only the old file's bytes.

What it does not show: the real guest is never served by another process (4 is a
Python frontend, 5 the same process); requests in flight at the stop (``--policy
drain``: none are; the blk tests cover in-flight requests across a real migration).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from emu.commands.serve import make_devices, serve
from emu.devices import registry
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import DeviceState
from emu.testing.fs import FuseClient, FuseReplyError
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.protocol import VRING_STATE, Req

ROOT = 1
CHUNK = 16 << 10


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.01)


def raises(code: int, fn, *args) -> None:
    with pytest.raises(FuseReplyError) as e:
        fn(*args)
    assert e.value.errno == code, os.strerror(e.value.errno)


def saved_values(state: DeviceState) -> dict[tuple[int, int], object]:
    """(part type, vq index) -> decoded value of every part of a state."""
    return {(p.type, p.vq_index): v for p, v in parts.parse(state, registry.schemas())}


def fs_part(state: DeviceState) -> dict:
    return saved_values(state)[(parts.device_part(26), 0)]  # type: ignore[return-value]


def take_over(sock: Path, state: DeviceState) -> tuple[VhostUserDriver, FuseClient]:
    """emu's Python vhost-user frontend in the place of a migrated QEMU: it negotiates the
    saved driver features and starts rings of the saved sizes whose indexes stand where
    the saved ones do, so a ``--restore-dir`` backend takes them as the guest's. A
    drained stop only (both indexes equal: nothing in flight to hand back)."""
    values = saved_values(state)
    feats = int(values[(parts.DRV_FEATURES, 0)])  # type: ignore[call-overload]
    fe = VhostUserDriver(sock)
    try:
        fe.init(
            feats,
            packed=bool(feats >> F_RING_PACKED & 1),
            event_idx=bool(feats >> F_EVENT_IDX & 1),
            indirect=bool(feats >> F_INDIRECT_DESC & 1),
        )
        vqs = sorted(vq for kind, vq in values if kind == parts.VQ_CFG)
        for vq in vqs:
            ring = values[(parts.RING_STATE, vq)]
            assert isinstance(ring, dict) and ring["next_avail"] == ring["next_used"], ring
            q = fe.setup_queue(vq, values[(parts.VQ_CFG, vq)]["size"])  # type: ignore[index]
            q.start_at(ring["next_avail"])
            fe.request(Req.SET_VRING_BASE, VRING_STATE.pack(vq, ring["next_avail"]))
        fe.driver_ok()
    except BaseException:
        fe.close()
        raise
    return fe, FuseClient(fe, len(vqs) - 1)


def host_order(d: Path) -> list[bytes]:
    """A directory's names in the order the host lists them (HostDir's READDIR order)."""
    return [os.fsencode(e.name) for e in os.scandir(d)]


class Served:
    """``emu serve``'s code for one spec on a thread of this process."""

    def __init__(self, spec: str, sock: Path, **options: object) -> None:
        self.devices = make_devices([spec])
        self.done = threading.Event()
        args = (self.devices, [str(sock)], self.done)
        self.thread = threading.Thread(target=serve, args=args, kwargs=options, daemon=True)
        self.thread.start()
        wait_for(sock.exists, "emu serve")

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


# -- in-process: emu serve's restore of an fs state, driven by the Python frontend --


def test_restore_dir_reopens_nodes_and_handles_in_a_fresh_server(tmp_path):
    """``emu serve --restore-dir`` loads an fs state at start and again when the rings
    start (the second load used to be refused: HostDir loads only into a fresh table)."""
    share = tmp_path / "share"
    (share / "dir").mkdir(parents=True)
    data = os.urandom(300_000)
    (share / "big").write_bytes(data)
    (share / "log").write_bytes(b"one\n")
    (share / "victim").write_bytes(b"old bytes" * 100)
    for i in range(40):
        (share / "dir" / f"e{i:02}").touch()
    spec, state_dir = f"fs:{share},tag=st", tmp_path / "state"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state_dir.mkdir()
    first = Served(spec, tmp_path / "a" / "fs.sock", policy="drain", state_dir=str(state_dir))
    fe = VhostUserDriver(tmp_path / "a" / "fs.sock")
    try:
        fs = FuseClient.connect(fe, queue_size=64)
        big, log, victim = (fs.lookup(ROOT, n).node for n in ("big", "log", "victim"))
        d = fs.lookup(ROOT, "dir").node
        big_fh, victim_fh = fs.open(big), fs.open(victim)
        log_fh = fs.open(log, os.O_WRONLY | os.O_APPEND)
        dir_fh = fs.opendir(d)
        listed = fs.readdir(d, dir_fh, 0, size=512)  # a directory being listed
        assert fs.read(big, big_fh, 0, CHUNK) == data[:CHUNK]
        assert fs.read(victim, victim_fh, 0, 9) == b"old bytes"
        for i in (0, 1):
            fe.stop_ring(i)
        wait_for((state_dir / "fs.sock.state").exists, "state file")
        state = statefile.load(state_dir / "fs.sock.state")
    finally:
        fe.close()
        first.close()
    (share / "victim").unlink()
    (share / "victim").write_bytes(b"NEW BYTES, another inode")
    fresh = Served(spec, tmp_path / "b" / "fs.sock", restore_dir=str(state_dir))
    fe2, fs2 = take_over(tmp_path / "b" / "fs.sock", state)
    try:
        assert fs2.read(big, big_fh, CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
        assert fs2.write(log, log_fh, 0, b"two\n") == 4  # O_APPEND: at the end
        assert (share / "log").read_bytes() == b"one\ntwo\n"
        raises(errno.ESTALE, fs2.read, victim, victim_fh, 0, 9)
        raises(errno.ESTALE, fs2.getattr, victim)
        rest = fs2.readdir(d, dir_fh, listed[-1].off, size=8192)
        names = [x.name for x in listed + rest]
        assert names == [b".", b".."] + host_order(share / "dir")
        raises(errno.EIO, fs2.init)  # the same session
    finally:
        fe2.close()
        fresh.close()
