"""virtio-fs against a hostile guest: malformed FUSE requests get an errno, never a crash.

Truncated headers, ``in.len`` lying either way, argument structs cut short, names without
their NUL or with a '/', huge READ and READDIR sizes, bogus node ids and handles, chains
with no room for the answer, unknown opcodes: each gets the answer the module docstring
of emu.devices.fs promises, nothing of a refused request is executed, and the very next
good request is served. Only what the rings refuse (a buffer outside guest RAM) makes the
device need a reset.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from emu.devices import fuse as f
from emu.devices.base import RunState
from emu.devices.fs import MAX_IO, FsDevice
from emu.memory import GuestMemory
from emu.ringlayout import DESC
from emu.state.format import StateError
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.testing.fs import FuseClient, FuseReplyError, in_header, name, parse_dirents
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

ROOT = f.ROOT_ID
OUT = f.OUT_HEADER.size


@pytest.fixture
def mem():
    m = GuestMemory.create(32 << 20)
    yield m
    m.close()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "file").write_bytes(b"0123456789" * 100)
    (d / "dir").mkdir()
    return d


@pytest.fixture
def fs(mem, share):
    dev = FsDevice(share, queue_max_size=1024)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    client = FuseClient.connect(drv)
    client.dev = dev
    yield client
    dev.close()


def answer(c) -> tuple[int, int, int]:
    """(out.len, -error, unique) of a completion; out.len must be the used length."""
    length, error, unique = f.OUT_HEADER.unpack_from(c.data)
    assert length == c.length
    return length, -error, unique


def send(fs: FuseClient, op: int, args: bytes, reply: int = 4096, nodeid: int = ROOT, **kw):
    """One request with a true header; the completion."""
    u = fs.next_unique()
    return fs.raw([in_header(op, nodeid, u, len(args), **kw) + args], [OUT + reply])


def errno_of(fs: FuseClient, op: int, args: bytes, reply: int = 4096, nodeid: int = ROOT) -> int:
    return answer(send(fs, op, args, reply, nodeid))[1]


def still_serves(fs: FuseClient) -> None:
    """The device thread is alive and answers a good request."""
    assert fs.dev.run_state is RunState.RUNNING and fs.dev.broken is None
    assert fs.lookup(ROOT, "file").attr.size == 1000


# -- headers and lengths --


@pytest.mark.parametrize("readable", [0, 1, 16, 39])
def test_truncated_in_header_is_eio(fs, readable):
    c = fs.raw([bytes(readable)] if readable else [], [OUT + 64])
    assert answer(c) == (OUT, errno.EIO, 0)
    still_serves(fs)


def test_in_len_lying_either_way(fs, share):
    args = name("file")
    u = fs.next_unique()
    for lie in (len(args) + 41, 1 << 31, 0, 39):  # more than sent, less than a header
        hdr = f.IN_HEADER.pack(lie, f.Op.LOOKUP, u, ROOT, 0, 0, 0, 0)
        assert answer(fs.raw([hdr + args], [OUT + 128])) == (OUT, errno.EINVAL, u)
    # fewer than sent: the request is what in.len says; here that cuts the name's NUL
    hdr = f.IN_HEADER.pack(40 + len(args) - 1, f.Op.LOOKUP, u, ROOT, 0, 0, 0, 0)
    assert answer(fs.raw([hdr + args], [OUT + 128]))[1] == errno.EINVAL
    # bytes past a true in.len are not part of the request
    hdr = f.IN_HEADER.pack(40 + len(args), f.Op.LOOKUP, u, ROOT, 0, 0, 0, 0)
    c = fs.raw([hdr + args + b"garbage/../\0"], [OUT + 128])
    assert answer(c)[:2] == (OUT + 128, 0)
    still_serves(fs)


# every request with a fixed argument struct, and the struct's size
STRUCTS = {
    f.Op.INIT: f.INIT_IN_OLD.size,
    f.Op.GETATTR: f.GETATTR_IN.size,
    f.Op.SETATTR: f.SETATTR_IN.size,
    f.Op.MKNOD: f.MKNOD_IN.size,
    f.Op.MKDIR: f.MKDIR_IN.size,
    f.Op.RENAME: f.RENAME_IN.size,
    f.Op.RENAME2: f.RENAME2_IN.size,
    f.Op.LINK: f.LINK_IN.size,
    f.Op.OPEN: f.OPEN_IN.size,
    f.Op.CREATE: f.CREATE_IN.size,
    f.Op.READ: f.READ_IN.size,
    f.Op.WRITE: f.WRITE_IN.size,
    f.Op.RELEASE: f.RELEASE_IN.size,
    f.Op.FLUSH: f.FLUSH_IN.size,
    f.Op.FSYNC: f.FSYNC_IN.size,
    f.Op.SETXATTR: f.SETXATTR_IN.size,
    f.Op.GETXATTR: f.GETXATTR_IN.size,
    f.Op.LISTXATTR: f.GETXATTR_IN.size,
    f.Op.ACCESS: f.ACCESS_IN.size,
    f.Op.OPENDIR: f.OPEN_IN.size,
    f.Op.READDIR: f.READ_IN.size,
    f.Op.READDIRPLUS: f.READ_IN.size,
    f.Op.RELEASEDIR: f.RELEASE_IN.size,
    f.Op.FSYNCDIR: f.FSYNC_IN.size,
    f.Op.FALLOCATE: f.FALLOCATE_IN.size,
    f.Op.LSEEK: f.LSEEK_IN.size,
    f.Op.COPY_FILE_RANGE: f.COPY_FILE_RANGE_IN.size,
}


@pytest.mark.parametrize("op", list(STRUCTS), ids=lambda op: op.name)
@pytest.mark.parametrize("cut", [0, 1, 7])
def test_argument_structs_cut_short_are_einval(fs, share, op, cut):
    size = STRUCTS[op]
    if op == f.Op.INIT:
        fs.destroy()  # so INIT is not refused as a second one
    before = sorted(os.listdir(share))
    assert errno_of(fs, op, bytes(max(0, size - 1 - cut)) if cut < size else b"") == errno.EINVAL
    assert sorted(os.listdir(share)) == before
    if op == f.Op.INIT:
        fs.init()
    still_serves(fs)


def test_names_without_nul_or_with_slashes(fs, share, tmp_path):
    def mkdir_args(n: bytes) -> bytes:
        return f.MKDIR_IN.pack(0o755, 0) + n

    for op, args in (
        (f.Op.LOOKUP, b"file"),
        (f.Op.MKDIR, mkdir_args(b"new")),
        (f.Op.UNLINK, b"file"),
        (f.Op.RMDIR, b"dir"),
        (f.Op.SYMLINK, name("s") + b"target"),  # the target's NUL is missing
        (f.Op.RENAME, f.RENAME_IN.pack(ROOT) + name("file") + b"moved"),
        (f.Op.SETXATTR, f.SETXATTR_IN.pack(1, 0) + b"user.x"),
        (f.Op.GETXATTR, f.GETXATTR_IN.pack(64, 0) + b"user.x"),
        (f.Op.CREATE, f.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"c"),
    ):
        assert errno_of(fs, op, args) == errno.EINVAL, op.name
    for bad, code in (
        (b"a/b", errno.EINVAL),
        (b"../../etc", errno.EINVAL),
        (b"/etc", errno.EINVAL),
        (b"", errno.EINVAL),
        (b"x" * 256, errno.ENAMETOOLONG),
    ):
        assert errno_of(fs, f.Op.LOOKUP, bad + b"\0") == code
        assert errno_of(fs, f.Op.MKDIR, mkdir_args(bad + b"\0")) == code
        args = f.RENAME_IN.pack(ROOT) + name("file") + bad + b"\0"
        assert errno_of(fs, f.Op.RENAME, args) == code
    for dots in (b".", b".."):
        assert errno_of(fs, f.Op.MKDIR, mkdir_args(dots + b"\0")) == errno.EINVAL
        assert errno_of(fs, f.Op.UNLINK, dots + b"\0") == errno.EINVAL
    # ".." at the root is the root, never the directory above the share
    assert fs.lookup(ROOT, "..").attr.ino == os.stat(share).st_ino
    assert sorted(os.listdir(share)) == ["dir", "file"]
    assert sorted(os.listdir(tmp_path)) == ["share"]
    still_serves(fs)


# -- sizes --


def test_huge_read_sizes_are_capped(fs, share):
    data = os.urandom(MAX_IO + 12345)
    (share / "big").write_bytes(data)
    e = fs.lookup(ROOT, "big")
    fh = fs.open(e.node)
    u = fs.next_unique()
    args = f.READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0)
    c = fs.raw([in_header(f.Op.READ, e.node, u, len(args)) + args], [OUT, 4096])
    assert answer(c) == (OUT + 4096, 0, u)  # the room, not the size asked
    assert c.data[OUT:] == data[:4096]
    c = fs.raw([in_header(f.Op.READ, e.node, u, len(args)) + args], [OUT, 2 * MAX_IO])
    assert answer(c) == (OUT + MAX_IO, 0, u)  # at most MAX_IO, whatever the room
    assert c.data[OUT : OUT + MAX_IO] == data[:MAX_IO]
    # offsets no file has (u64s the host reads as negative; -1 is not "the file position")
    for offset in (1 << 63, (1 << 64) - 1):
        args = f.READ_IN.pack(fh, offset, 10, 0, 0, 0, 0)
        assert errno_of(fs, f.Op.READ, args, nodeid=e.node) == errno.EINVAL
    still_serves(fs)


def test_huge_readdir_sizes_are_capped(fs, share):
    for i in range(300):
        (share / "dir" / f"entry-{i:04d}").write_bytes(b"")
    d = fs.lookup(ROOT, "dir")
    fh = fs.opendir(d.node)
    for plus in (False, True):
        op = f.Op.READDIRPLUS if plus else f.Op.READDIR
        args = f.READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0)
        c = send(fs, op, args, reply=1000, nodeid=d.node)
        length, err, _ = answer(c)
        assert err == 0 and length <= OUT + 1000
        got = parse_dirents(c.data[OUT:length], plus)
        assert sum(f.dirent_size(e.name, plus) for e in got) == length - OUT  # whole records
        (after, *_) = fs.readdir(d.node, fh, got[-1].off, size=4096, plus=plus)
        assert length - OUT + f.dirent_size(after.name, plus) > 1000  # no room for the next
    fs.releasedir(d.node, fh)
    still_serves(fs)


def test_write_sizes_must_match_the_data(fs, share):
    e = fs.lookup(ROOT, "file")
    fh = fs.open(e.node, os.O_RDWR)
    max_write = fs.init_reply[6]
    for size, sent in ((10, 5), (max_write + 1, max_write + 1)):
        args = f.WRITE_IN.pack(fh, 0, size, 0, 0, 0, 0) + b"Z" * sent
        assert errno_of(fs, f.Op.WRITE, args, nodeid=e.node) == errno.EINVAL
    assert (share / "file").read_bytes()[:10] == b"0123456789"
    # less declared than sent: only what was declared is written
    args = f.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0) + b"ABCDEFG"
    c = send(fs, f.Op.WRITE, args, nodeid=e.node)
    assert answer(c)[1] == 0 and f.WRITE_OUT.unpack_from(c.data, OUT)[0] == 3
    assert (share / "file").read_bytes()[:10] == b"ABC3456789"
    for offset in (1 << 63, (1 << 64) - 1):  # negative on the host: not "the file position"
        args = f.WRITE_IN.pack(fh, offset, 3, 0, 0, 0, 0) + b"XYZ"
        assert errno_of(fs, f.Op.WRITE, args, nodeid=e.node) == errno.EINVAL
    assert (share / "file").read_bytes() == b"ABC3456789" + b"0123456789" * 99
    fs.release(e.node, fh)
    still_serves(fs)


def test_xattr_and_readlink_sizes_bounded_by_the_room(fs, share):
    os.setxattr(share / "file", "user.v", b"v" * 100)
    os.symlink("t" * 200, share / "link")
    e = fs.lookup(ROOT, "file")
    args = f.GETXATTR_IN.pack(0xFFFFFFFF, 0) + name("user.v")
    assert errno_of(fs, f.Op.GETXATTR, args, reply=50, nodeid=e.node) == errno.ERANGE
    c = send(fs, f.Op.GETXATTR, args, reply=100, nodeid=e.node)
    assert answer(c)[:2] == (OUT + 100, 0) and c.data[OUT:] == b"v" * 100
    link = fs.lookup(ROOT, "link")
    assert errno_of(fs, f.Op.READLINK, b"", reply=199, nodeid=link.node) == errno.ENAMETOOLONG
    assert fs.readlink(link.node, size=200) == b"t" * 200
    still_serves(fs)


def test_bad_times_are_einval(fs, share):
    e = fs.lookup(ROOT, "file")
    before = os.stat(share / "file").st_mtime_ns
    args = f.SETATTR_IN.pack(f.FATTR_MTIME, 0, 0, 0, 0, 0, 5, 0, 0, 10**9, 0, 0, 0, 0, 0, 0)
    assert errno_of(fs, f.Op.SETATTR, args, nodeid=e.node) == errno.EINVAL
    assert os.stat(share / "file").st_mtime_ns == before


# -- no room for the answer --


def test_no_writable_part_means_not_executed(fs, share):
    args = f.MKDIR_IN.pack(0o755, 0) + name("ghost")
    c = fs.raw([in_header(f.Op.MKDIR, ROOT, fs.next_unique(), len(args)) + args], [])
    assert c.length == 0 and not (share / "ghost").exists()
    c = fs.raw([in_header(f.Op.MKDIR, ROOT, fs.next_unique(), len(args)) + args], [15])
    assert c.length == 0 and not (share / "ghost").exists()
    # room for the header but not the entry: EINVAL, and still nothing made
    c = fs.raw([in_header(f.Op.MKDIR, ROOT, fs.next_unique(), len(args)) + args], [OUT + 100])
    assert answer(c)[:2] == (OUT, errno.EINVAL) and not (share / "ghost").exists()
    still_serves(fs)


def test_lookup_without_room_takes_no_lookup_count(fs, share):
    e = fs.lookup(ROOT, "file")
    c = fs.raw([in_header(f.Op.LOOKUP, ROOT, fs.next_unique(), 5) + name("file")], [])
    assert c.length == 0
    fs.forget(e.node, 1)  # the one lookup that was answered
    with pytest.raises(FuseReplyError) as err:
        fs.getattr(e.node)
    assert err.value.errno == errno.ESTALE


# -- node ids and handles --


@pytest.mark.parametrize("node", [0, 2, 12345, 2**63, 2**64 - 1])
def test_bogus_node_ids(fs, share, node):
    for op, args in (
        (f.Op.GETATTR, f.GETATTR_IN.pack(0, 0, 0)),
        (f.Op.LOOKUP, name("file")),
        (f.Op.MKDIR, f.MKDIR_IN.pack(0o755, 0) + name("x")),
        (f.Op.OPEN, f.OPEN_IN.pack(os.O_RDONLY, 0)),
        (f.Op.OPENDIR, f.OPEN_IN.pack(os.O_RDONLY, 0)),
        (f.Op.STATFS, b""),
        (f.Op.RENAME, f.RENAME_IN.pack(node) + name("file") + name("gone")),
        (f.Op.LINK, f.LINK_IN.pack(node) + name("x")),
    ):
        nodeid = ROOT if op in (f.Op.RENAME, f.Op.LINK) else node
        assert errno_of(fs, op, args, nodeid=nodeid) == errno.ESTALE, op.name
    assert fs.forget(node, 1) == 0  # harmless
    assert fs.batch_forget([(node, 5), (ROOT, 5)]) == 0
    assert sorted(os.listdir(share)) == ["dir", "file"]
    still_serves(fs)


@pytest.mark.parametrize("fh", [0, 7777, 2**64 - 1])
def test_bogus_handles(fs, share, fh):
    e = fs.lookup(ROOT, "file")
    d = fs.lookup(ROOT, "dir")
    read = f.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0)
    for op, node, args in (
        (f.Op.READ, e.node, read),
        (f.Op.WRITE, e.node, f.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x"),
        (f.Op.RELEASE, e.node, f.RELEASE_IN.pack(fh, 0, 0, 0)),
        (f.Op.FLUSH, e.node, f.FLUSH_IN.pack(fh, 0, 0, 0)),
        (f.Op.FSYNC, e.node, f.FSYNC_IN.pack(fh, 0, 0)),
        (f.Op.LSEEK, e.node, f.LSEEK_IN.pack(fh, 0, os.SEEK_END, 0)),
        (f.Op.FALLOCATE, e.node, f.FALLOCATE_IN.pack(fh, 0, 10, 0, 0)),
        (f.Op.READDIR, d.node, read),
        (f.Op.READDIRPLUS, d.node, read),
        (f.Op.RELEASEDIR, d.node, f.RELEASE_IN.pack(fh, 0, 0, 0)),
        (f.Op.FSYNCDIR, d.node, f.FSYNC_IN.pack(fh, 0, 0)),
    ):
        assert errno_of(fs, op, args, nodeid=node) == errno.EBADF, op.name
    still_serves(fs)


def test_handles_of_the_wrong_kind(fs):
    e = fs.lookup(ROOT, "file")
    d = fs.lookup(ROOT, "dir")
    fh = fs.open(e.node)
    dfh = fs.opendir(d.node)
    read = f.READ_IN.pack
    assert errno_of(fs, f.Op.READDIR, read(fh, 0, 4096, 0, 0, 0, 0), nodeid=d.node) == errno.EBADF
    assert errno_of(fs, f.Op.READ, read(dfh, 0, 10, 0, 0, 0, 0), nodeid=e.node) == errno.EBADF
    assert errno_of(fs, f.Op.RELEASE, f.RELEASE_IN.pack(dfh, 0, 0, 0)) == errno.EBADF
    assert fs.read(e.node, fh, 0, 4) == b"0123"
    still_serves(fs)


def test_batch_forget_with_a_lying_count_forgets_nothing(fs):
    e = fs.lookup(ROOT, "file")
    body = f.BATCH_FORGET_IN.pack(1000, 0) + f.FORGET_ONE.pack(e.node, 1)
    assert fs.no_reply(f.Op.BATCH_FORGET, 0, body) == 0
    assert fs.getattr(e.node).size == 1000  # its one lookup is still held
    assert fs.no_reply(f.Op.FORGET, e.node, b"\1") == 0  # cut short: ignored too
    assert fs.getattr(e.node).size == 1000
    assert fs.no_reply(f.Op.FORGET, e.node, f.FORGET_IN.pack(1) + bytes(4096)) == 0
    with pytest.raises(FuseReplyError):
        fs.getattr(e.node)


# -- special files and symlinks on the host --


def test_special_files_and_symlinks_are_never_opened_on_the_host(fs, share):
    os.mkfifo(share / "fifo")
    os.symlink("/etc/passwd", share / "abs")
    os.symlink("..", share / "up")
    for n, code in (("fifo", errno.ENXIO), ("abs", errno.ELOOP)):
        e = fs.lookup(ROOT, n)
        assert errno_of(fs, f.Op.OPEN, f.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=e.node) == code
    up = fs.lookup(ROOT, "up")
    assert stat.S_ISLNK(up.attr.mode)
    assert errno_of(fs, f.Op.LOOKUP, name("etc"), nodeid=up.node) == errno.ENOTDIR
    if os.geteuid() == 0:  # a device node the guest asks to open: never opened
        os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        e = fs.lookup(ROOT, "null")
        args = f.OPEN_IN.pack(os.O_RDWR, 0)
        assert errno_of(fs, f.Op.OPEN, args, nodeid=e.node) == errno.ENXIO
    still_serves(fs)


# -- opcodes --


def test_unknown_opcodes_are_enosys(fs):
    for op in (0, 7, 19, 52, 4096, 0xFFFFFFFF):
        assert errno_of(fs, op, b"whatever\0" * 3) == errno.ENOSYS
    still_serves(fs)


def test_hiprio_queue_serves_what_arrives_there(fs):
    c = fs.raw([in_header(f.Op.LOOKUP, ROOT, 8, 5) + name("file")], [OUT + 128], queue=0)
    assert answer(c)[:2] == (OUT + 128, 0)


# -- what the rings refuse --


def test_buffer_outside_guest_ram_needs_reset_and_device_recovers(fs, mem):
    q = fs.drv.queues[1]
    args = name("file")
    token = q.add([in_header(f.Op.LOOKUP, ROOT, 2, len(args)) + args], [OUT + 128], indirect=False)
    req = next(r for r in q._inflight.values() if r.token == token)
    slot = q.desc + 16 * req.descs[-1]
    _, length, flags, nxt = DESC.unpack(mem.read(slot, 16))
    mem.write(slot, DESC.pack(mem.size + (1 << 20), length, flags, nxt))
    fs.drv.kick(1)
    with pytest.raises(DeviceNeedsReset):
        fs.drv.wait(1, timeout=5)
    assert fs.drv.status & mmio_regs.S_DEVICE_NEEDS_RESET and fs.dev.broken
    again = FuseClient.connect(fs.drv)  # reset, negotiate, INIT: a new session
    again.dev = fs.dev
    still_serves(again)


def test_many_bad_requests_in_one_batch_then_good_ones(fs):
    q = fs.drv.queues[1]
    junk = [
        [b""],
        [bytes(39)],
        [struct.pack("<II", 1 << 31, f.Op.READ) + bytes(32)],
        [in_header(f.Op.LOOKUP, 999, 2, 4) + b"abc\0"],
        [in_header(f.Op.GETATTR, ROOT, 4, 0)],
        [in_header(77, ROOT, 6, 0)],
    ]
    for out in junk:
        q.add([b for b in out if b] or [bytes(1)], [OUT + 128])
    fs.drv.kick(1)
    done = fs.drv.wait(1, count=len(junk))
    errs = [answer(c)[1] for c in sorted(done, key=lambda c: c.token)]
    assert errs == [errno.EIO, errno.EIO, errno.EINVAL, errno.ESTALE, errno.EINVAL, errno.ENOSYS]
    still_serves(fs)


def test_write_without_room_for_its_answer_writes_nothing(fs, share):
    e = fs.lookup(ROOT, "file")
    fh = fs.open(e.node, os.O_RDWR)
    args = f.WRITE_IN.pack(fh, 0, 4, 0, 0, 0, 0) + b"XXXX"
    c = fs.raw([in_header(f.Op.WRITE, e.node, fs.next_unique(), len(args)) + args], [OUT + 7])
    assert answer(c)[:2] == (OUT, errno.EINVAL)
    assert (share / "file").read_bytes()[:4] == b"0123"
    args = f.GETXATTR_IN.pack(0, 0)  # LISTXATTR asking for the length, 8 bytes
    assert errno_of(fs, f.Op.LISTXATTR, args, reply=7, nodeid=e.node) == errno.EINVAL
    still_serves(fs)


# -- a hostile snapshot --


def _session(**kw) -> dict:
    return {"minor": 37, "flags": 0, "max_write": 4096, "max_pages": 1, "max_readahead": 0, **kw}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(replied={"9": [[0, 16]]}), "queue '9'"),
        (dict(replied={"x": [[0, 16]]}), "queue 'x'"),
        (dict(replied={"1": [[5000, 16]]}), "head"),
        (dict(replied={"1": [[1]]}), r"\[head, length\]"),
        (dict(replied={"1": [[1, 1 << 30]]}), "length"),
        (dict(session=_session(minor=99)), "minor"),
        (dict(session=_session(max_pages=0)), "max_pages"),
        (dict(session=_session(surprise=1)), "unknown"),
        (dict(dir=[]), "dir"),
        (dict(dir={"version": 99, "nodes": [], "handles": []}), "version"),
        (dict(tag="other"), "tag"),
        (dict(readonly=True), "readonly"),
        (dict(num_request_queues=2), "num_request_queues"),
    ],
)
def test_bad_states_are_refused_whole(share, change, message):
    dev = FsDevice(share)
    state = dev.save_state()
    dev.close()
    state.update(change)
    fresh = FsDevice(share)
    try:
        with pytest.raises(StateError, match=message):
            fresh.load_state(state)
        assert fresh.session is None and fresh.save_state()["replied"] == {}
    finally:
        fresh.close()
