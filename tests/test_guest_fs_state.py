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
   reader of a file the host replaces after the stop (``victim``) and a reader of a file
   the guest itself unlinked while open (``scratch``). Each waits at a gate (a file the
   host makes in the share) after its first part, so its position is known exactly.
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
   host's order, and the ``victim`` / ``scratch`` readers get only the old file's bytes,
   then ESTALE at the first request on them that reaches the device (an attribute
   refresh, or a read past the guest's page cache).

What it does not show: the real guest is never served by another process (4 is a
Python frontend, 5 the same process); requests in flight at the stop (``--policy
drain``: none are; the blk tests cover in-flight requests across a real migration).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu_blockers import assert_no_migration_or_reconnect

from emu.commands.serve import make_devices, serve
from emu.devices import registry
from emu.guest import GuestImage, vm
from emu.guest.backends import guest_devices
from emu.guest.proc import start, stop
from emu.guest.run import kernel_args
from emu.guest.vm import Vm as Guest
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED, RingState
from emu.state import file as statefile
from emu.state import parts
from emu.state.format import DeviceState
from emu.testing.fs import FuseClient, FuseReplyError
from emu.testing.vhost_user import VhostUserDriver
from emu.vhost_user.protocol import VRING_STATE, Req
from emu.vhost_user.vring import encode_base

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
    drained stop only (both indexes equal: nothing in flight to hand back); split or
    packed."""
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
            assert isinstance(ring, dict)
            rs = RingState(**ring)
            assert (rs.next_avail, rs.avail_wrap) == (rs.next_used, rs.used_wrap), ring
            q = fe.setup_queue(vq, values[(parts.VQ_CFG, vq)]["size"])  # type: ignore[index]
            q.start_at(rs.next_avail, rs.avail_wrap)
            base = encode_base(rs, q.packed)
            fe.request(Req.SET_VRING_BASE, VRING_STATE.pack(vq, base))
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


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_restore_dir_reopens_nodes_and_handles_in_a_fresh_server(tmp_path, packed):
    """``emu serve --restore-dir`` loads an fs state at start and again when the rings
    start (the second load used to be refused: HostDir loads only into a fresh table).
    The request ring has gone round once before the stop (a packed one's wrap counters
    are 0), and the frontend takes it over there."""
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
        fs = FuseClient.connect(fe, queue_size=64, packed=packed)
        for _ in range(70):
            fs.getattr(ROOT)
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
        ring = saved_values(state)[(parts.RING_STATE, 1)]
        ring = RingState(**ring)  # type: ignore[arg-type]
        assert ring.avail_wrap is not packed and (packed or ring.next_avail > 64), ring
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


# -- a real guest: QEMU microvm on emu serve, processes holding files open --

#: the guest's part, kept in the share (the kernel command line is too short for it)
WORK = r"""
M=/mnt PACE=$(arg emu.st.pace 20000)
gate() {  # gate NAME: tell the host, then wait for its go file in the share
  echo "EMU-GATE $1"
  until [ -e $M/go ]; do usleep 50000; done
}
rd() {  # rd NAME AT: 16 KiB chunks of stdin (one open file), a sha256 each
  local i=0
  while :; do
    [ $i = $2 ] && gate $1
    dd bs=16k count=1 of=/tmp/$1.c 2>/tmp/$1.e ||
      { echo "EMU-RERR $1 $i $(tail -n 1 /tmp/$1.e)"; break; }
    [ -s /tmp/$1.c ] || break
    echo "EMU-CHUNK $1 $i $(sha < /tmp/$1.c)"
    i=$((i + 1)); usleep $PACE
  done
  echo "EMU-END $1 $i"
}
ap() {  # ap AT N: N numbered lines through fd 4 (one O_APPEND open file)
  local i=0
  while [ $i -lt $2 ]; do
    [ $i = $1 ] && gate ap
    echo "line $i" >&4 || { echo "EMU-RERR ap $i"; break; }
    i=$((i + 1)); usleep $PACE
  done
  echo "EMU-END ap $i"
}
lister() {  # lister AT: find holds the directory open, mid-listing, while -exec runs
  : > /tmp/dn
  find $M/dir -type f -exec sh -c 'echo "EMU-DIR ${1##*/}"; echo >> /tmp/dn
    if [ $(wc -l < /tmp/dn) = '$1' ]; then
      echo EMU-GATE dir; until [ -e '$M'/go ]; do usleep 50000; done
    fi
    usleep '$PACE _ {} \;
  echo "EMU-END dir $(wc -l < /tmp/dn)"
}
rd big 8 < $M/big.bin &
ap 40 80 4>> $M/log.txt &
lister 30 &
rd victim 2 < $M/victim.bin &
{ rm $M/scratch.bin && rd scratch 2; } < $M/scratch.bin &
wait
result st.log_sha256 "$(sha < $M/log.txt)"
result st.victim_by_name "$(sha < $M/victim.bin)"
"""
#: /init's `script` workload: mount the share, run WORK from it
BOOT = r"""
FS_TAG=$(arg emu.fs.tag emu) FS_MNT=/mnt
fs_mount || return 1
cp /mnt/work.sh /tmp/work.sh && . /tmp/work.sh
"""
WORKERS = ("big", "ap", "dir", "victim", "scratch")
MIB = 1 << 20
DIR_ENTRIES = 100
LINES = 80
#: the positions the gates hold the workers at (WORK's arguments)
AT = {"big": 8, "ap": 40, "dir": 30, "victim": 2, "scratch": 2}
TAG = "st"
#: run by `python -c` as the first emu serve: after the stop, when the test asks, the fs
#: device drops every node and handle and loads the state file, as a fresh process would
RELOAD_HOOK = r"""
import sys, threading, time
from pathlib import Path
from emu.commands import serve as command

trigger, saved = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))
made = []
make_devices = command.make_devices
command.make_devices = lambda specs: made.extend(make_devices(specs)) or made

def reload_when_asked():
    while not trigger.exists():
        time.sleep(0.02)
    from emu.state import file as statefile
    from emu.vhost_user.device_state import check
    try:
        (dev,) = made
        dev.load_state(check(dev, statefile.load(saved)).device_part)
        answer = "ok"
    except Exception as e:
        answer = f"{type(e).__name__}: {e}"
    trigger.with_name("reloaded").write_text(answer)

threading.Thread(target=reload_when_asked, daemon=True).start()
from emu.cli import main
main()
"""


def chunks(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i : i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]


def emu_serve(sock: Path, spec: str, log: Path, *options: str, hook: list[str] | None = None):
    """``emu serve`` in a process of its own (under the reaper), listening on ``sock``."""
    entry = ["-c", RELOAD_HOOK, *hook] if hook else ["-m", "emu.cli"]
    cmd = [sys.executable, *entry, "-v", "serve", "--socket", str(sock), *options, spec]
    with open(log, "ab") as out:
        proc = start(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, "emu serve", 30)
        assert proc.poll() is None, log.read_text()
    except BaseException:
        stop(proc)
        raise
    return proc


def make_share(root: Path) -> dict[str, bytes]:
    share = root / "share"
    (share / "dir").mkdir(parents=True)
    files = {n: os.urandom(MIB) for n in ("big.bin", "victim.bin", "scratch.bin")}
    files["log.txt"] = b""
    for name, data in files.items():
        (share / name).write_bytes(data)
    for i in range(DIR_ENTRIES):
        (share / "dir" / f"f{i:03}").write_bytes(b"x")
    (share / "work.sh").write_text(WORK)
    return files


def console_lines(guest: Guest, marker: str) -> list[list[str]]:
    return [ln.split(marker, 1)[1].split() for ln in guest.lines if marker in ln]


def check_saved_state(state: DeviceState, ids: dict[str, tuple[int, int]]) -> dict:
    """The fs part names every file the guest holds, by path (none for the one it
    unlinked), host identity and open handle; name -> (node id, handle)."""
    fs = fs_part(state)
    assert fs["tag"] == TAG and fs["session"] is not None and fs["replied"] == {}
    by_key = {(n["dev"], n["ino"]): n for n in fs["dir"]["nodes"]}
    flags = {"dir": os.O_RDONLY, "log.txt": os.O_WRONLY | os.O_APPEND}
    held = {}
    for name, key in ids.items():
        node = by_key[key]
        assert node["path"] == (None if name == "scratch.bin" else name), node
        assert node["nlookup"] >= 1 and node["file_handle"], node
        (handle,) = [h for h in fs["dir"]["handles"] if h["node"] == node["id"]]
        assert handle["flags"] == flags.get(name, os.O_RDONLY), (name, handle)
        assert handle["dir"] is (name == "dir"), (name, handle)
        held[name] = (node["id"], handle["fh"])
    # nothing in flight after a drained stop: a fresh process can take the rings over
    for (kind, _), value in saved_values(state).items():
        if kind == parts.INFLIGHT:
            assert value == []
    return held


def fresh_process_serves(
    tmp: Path, spec: str, saved: Path, held: dict, files: dict[str, bytes], dir_printed: list
) -> list[bytes]:
    """Step 4: a fresh ``emu serve --restore-dir`` over the saved state; what the guest's
    handles get from it. Returns the listing from where the guest's find stands."""
    share = tmp / "share"
    restore = tmp / "restore"
    restore.mkdir()
    shutil.copy(saved, restore / "fs.sock.state")
    (tmp / "fresh").mkdir()
    sock = tmp / "fresh" / "fs.sock"
    proc = emu_serve(sock, spec, tmp / "fresh.log", "--restore-dir", str(restore))
    try:
        fe, fs = take_over(sock, statefile.load(saved))
        try:
            at = AT["big"] * CHUNK  # where the guest's reader stands
            assert fs.read(*held["big.bin"], at, CHUNK) == files["big.bin"][at : at + CHUNK]
            before = (share / "log.txt").read_bytes()
            assert before == b"".join(b"line %d\n" % i for i in range(AT["ap"]))
            assert fs.write(*held["log.txt"], 0, b"fresh\n") == 6  # O_APPEND: at the end
            assert (share / "log.txt").read_bytes() == before + b"fresh\n"
            os.truncate(share / "log.txt", len(before))  # the guest's file as it left it
            for name in ("victim.bin", "scratch.bin"):
                raises(errno.ESTALE, fs.read, *held[name], 0, CHUNK)
                raises(errno.ESTALE, fs.getattr, held[name][0])
            listing: list = []
            while batch := fs.readdir(*held["dir"], listing[-1].off if listing else 0):
                listing += batch
            names = [x.name for x in listing]
            assert names == [b".", b".."] + host_order(share / "dir")
            last = names.index(dir_printed[-1].encode())  # the guest's find stands past it
            rest = listing[: last + 1]
            while batch := fs.readdir(*held["dir"], rest[-1].off):
                rest += batch
            raises(errno.EIO, fs.init)  # the guest's session, not a new one
        finally:
            fe.close()
    finally:
        stop(proc)
    assert "restoring with stale nodes" in (tmp / "fresh.log").read_text()
    return [x.name for x in rest[last + 1 :]]


def test_open_files_of_a_real_guest_across_save_and_restore(microvm_image, tmp_path):
    files = make_share(tmp_path)
    share, state_dir = tmp_path / "share", tmp_path / "state"
    state_dir.mkdir()
    ids = {n: _identity(share / n) for n in ("big.bin", "log.txt", "victim.bin", "scratch.bin")}
    ids["dir"] = _identity(share / "dir")
    sock, qmp, trigger = tmp_path / "fs.sock", tmp_path / "qmp.sock", tmp_path / "reload"
    spec = f"fs:{share},tag={TAG}"
    saved = state_dir / "fs.sock.state"
    serving = emu_serve(
        sock, spec, tmp_path / "serve.log", "--policy", "drain", "--state-dir", str(state_dir),
        hook=[str(trigger), str(saved)],
    )  # fmt: skip
    try:
        script = base64.b64encode(BOOT.encode()).decode()
        append = kernel_args(["script"], {"script": script, "fs.tag": TAG}, True)
        devices = guest_devices("microvm", [spec], [sock])
        guest = Guest(vm.qemu_command(microvm_image, devices, qmp, append, 256), qmp, [])
        try:
            gates = lambda: all(guest.saw(f"EMU-GATE {w}") for w in WORKERS)  # noqa: E731
            wait_for(lambda: gates() or guest.proc.poll() is not None, "gates", vm.WAIT)
            assert gates(), guest.console()
            guest.qmp.execute("stop")  # GET_VRING_BASE on every ring: the state file
            wait_for(saved.exists, "state file")
            held = check_saved_state(statefile.load(saved), ids)
            old_victim = files["victim.bin"]
            (share / "victim.bin").unlink()  # replaced on the host meanwhile
            new_victim = os.urandom(MIB)
            (share / "victim.bin").write_bytes(new_victim)
            printed = [w[0] for w in console_lines(guest, "EMU-DIR ")]
            assert len(printed) == AT["dir"]
            rest = fresh_process_serves(tmp_path, spec, saved, held, files, printed)
            trigger.touch()  # the first emu serve: nodes and handles from the file too
            wait_for((tmp_path / "reloaded").exists, "reload")
            assert (tmp_path / "reloaded").read_text() == "ok"
            (share / "go").touch()
            guest.qmp.execute("cont")
            results = guest.finish()
        finally:
            guest.stop()
            (tmp_path / "console.txt").write_text("\n".join(guest.lines))
    finally:
        stop(serving)
    ends = {w[0]: int(w[1]) for w in console_lines(guest, "EMU-END ")}
    errors = {w[0]: (int(w[1]), " ".join(w[2:])) for w in console_lines(guest, "EMU-RERR ")}
    got = {}
    for name, i, digest in console_lines(guest, "EMU-CHUNK "):
        got.setdefault(name, []).append((int(i), digest))
    # the reader: every chunk is the host file's, to its end
    assert got["big"] == list(enumerate(chunks(files["big.bin"]))) and "big" not in errors
    # the appender: every line once, in order
    lines = b"".join(b"line %d\n" % i for i in range(LINES))
    assert (share / "log.txt").read_bytes() == lines and ends["ap"] == LINES
    assert results["st.log_sha256"] == hashlib.sha256(lines).hexdigest()
    # the listing: every entry once, in the host's order; the rest is what the fresh
    # process listed from the same handle
    printed = [w[0].encode() for w in console_lines(guest, "EMU-DIR ")]
    assert printed == host_order(share / "dir") and ends["dir"] == DIR_ENTRIES
    assert printed[AT["dir"] :] == rest
    # replaced / unlinked: the old bytes while the guest had them cached, then an error,
    # never the new file's bytes
    for name, old in (("victim", old_victim), ("scratch", files["scratch.bin"])):
        n, why = errors[name]
        assert AT[name] <= n < len(old) // CHUNK, (name, n, why)
        assert got[name] == list(enumerate(chunks(old)))[:n], name
        assert "Stale file handle" in why or "I/O error" in why, why
    assert not set(chunks(new_victim)) & {d for _, d in got["victim"]}
    assert results["st.victim_by_name"] == hashlib.sha256(new_victim).hexdigest()


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_qemu_vhost_user_fs_cannot_migrate_or_reconnect(
    microvm_image: GuestImage, tmp_path: Path
) -> None:
    """Why the real-guest test above does not move its guest onto a fresh ``emu serve``
    (docs/fs.md): QEMU 7.2 blocks migrating its vhost-user-fs-device, and cannot realize
    it on a reconnecting chardev."""
    share, sock = tmp_path / "share", tmp_path / "fs.sock"
    share.mkdir()
    spec = f"fs:{share},tag={TAG}"
    serving = emu_serve(sock, spec, tmp_path / "serve.log")
    try:
        devices = guest_devices("microvm", [spec], [sock])
        assert_no_migration_or_reconnect(microvm_image, devices, "vhost-user-fs", tmp_path)
    finally:
        stop(serving)
