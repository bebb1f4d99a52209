"""virtio-fs end to end: FUSE client -> reference driver -> virtio-mmio -> device -> host dir.

Every opcode Linux 6.1 sends in normal use is sent here over split and packed rings, and
its effect is checked on the host directory (checksums, listings, stat fields); ``ro``
refuses every write-type request with EROFS; a stopped device saved into a fresh one
carries its session, nodes and open handles, and a request answered before a report stop
is not run twice.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from modes import wait_until

from emu.cli import main
from emu.commands.serve import make_devices, serve
from emu.devices import fuse as f
from emu.devices import registry
from emu.devices.base import RunState
from emu.devices.fs import MAX_PAGES_LIMIT, OFFERED, FsDevice
from emu.devices.snapshot import restore_device
from emu.memory import GuestMemory
from emu.queue import Gate
from emu.state import file as statefile
from emu.state.format import StateError
from emu.testing.driver import VirtioMmioDriver
from emu.testing.fs import LINUX_6_1_FLAGS, FuseClient, FuseReplyError
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport
from emu.vhost_user.frontend import connect

ROOT = f.ROOT_ID
RINGS = [
    pytest.param(dict(packed=False), id="split"),
    pytest.param(dict(packed=True), id="packed"),
    pytest.param(dict(packed=False, indirect=False), id="split-direct"),
    pytest.param(dict(packed=True, indirect=False), id="packed-direct"),
]


@pytest.fixture
def mem():
    m = GuestMemory.create(32 << 20)
    yield m
    m.close()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def mount(mem, share):
    """mount(**options) -> (FuseClient, FsDevice) over ``share``; all closed afterwards."""
    made: list[FsDevice] = []

    def _mount(
        *, ro=False, queues=1, tag="emu", queue_size=None, queue_max_size=None, init=True, **rings
    ):
        dev = FsDevice(
            share,
            tag=tag,
            readonly=ro,
            num_request_queues=queues,
            queue_max_size=queue_max_size,
        )
        made.append(dev)
        drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
        return FuseClient.connect(drv, queue_size=queue_size, init=init, **rings), dev

    yield _mount
    for dev in made:
        dev.close()


def raises(code: int, fn, *args, **kw) -> None:
    with pytest.raises(FuseReplyError) as e:
        fn(*args, **kw)
    assert e.value.errno == code, os.strerror(e.value.errno)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- device, config, spec --


def test_device_id_config_and_no_device_features(mount):
    fs, dev = mount(tag="share-tag", queues=3)
    t = fs.drv.transport
    assert t.read(mmio_regs.DEVICE_ID, 4) == 26
    assert fs.drv.features & 0xFFFFFF == 0  # no fs feature bits (no notification queue)
    assert fs.tag == "share-tag"
    assert fs.num_request_queues == 3 and len(dev.queues) == 4
    assert dev.config_bytes()[:9] == b"share-tag" and len(dev.config_bytes()) == 40


def test_spec_options(share):
    (dev,) = registry.make_devices([f"fs:{share},tag=t1,ro,queues=2,packed=off"])
    try:
        assert (dev.tag, dev.readonly, dev.num_request_queues) == ("t1", True, 2)
        assert len(dev.queues) == 3
    finally:
        dev.close()
    (dev,) = registry.make_devices([f"fs:{share}"])
    assert (dev.tag, dev.readonly, dev.num_request_queues) == ("emu", False, 1)
    assert not dev.strict_restore
    dev.close()
    (dev,) = registry.make_devices([f"fs:{share},strict"])
    assert dev.strict_restore
    dev.close()
    spec = registry.parse_spec(f"fs:{share},tag=x,queues=4")
    assert registry.get("fs").frontend(spec) == {"tag": "x", "num-request-queues": "4"}
    for bad, why in (
        (f"fs:{share},tag=" + "x" * 37, "tag"),
        (f"fs:{share},tag=", "tag"),
        (f"fs:{share},queues=0", "queues"),
        (f"fs:{share},ro=maybe", "ro"),
        (f"fs:{share},strict=yes", "strict"),
        (f"fs:{share},colour=red", "colour"),
        (f"fs:{share},tag=a,tag=b", "twice"),
        (f"fs:{share / 'missing'}", "missing"),
        ("fs", "directory"),
        ("rng,tag=x", "tag"),  # a type without options of its own refuses them
    ):
        with pytest.raises(registry.SpecError, match=why):
            registry.make_devices([bad])


# -- INIT --


def test_init_negotiates_only_what_is_served(mount):
    fs, dev = mount(queue_size=128)
    major, minor, readahead, flags, bg, cong, max_write, gran, max_pages, align, flags2 = (
        fs.init_reply
    )
    assert (major, minor) == (7, 37)
    assert flags | flags2 << 32 == LINUX_6_1_FLAGS & OFFERED
    assert flags & f.DO_READDIRPLUS and flags & f.MAX_PAGES and not flags & f.POSIX_LOCKS
    assert not flags & f.WRITEBACK_CACHE and not flags & f.DONT_MASK and flags2 == 0
    assert max_pages == 128 - 8 and max_write == max_pages * 4096
    assert gran == 1 and align == 0 and readahead == 128 << 10
    raises(errno.EIO, fs.init)  # one session at a time


def test_init_lower_minor_and_fewer_flags_win(mount):
    fs, _ = mount(init=False, queue_max_size=1024)
    reply = fs.init(flags=f.ASYNC_READ | f.POSIX_LOCKS, minor=31)
    assert reply[1] == 31 and reply[3] == f.ASYNC_READ and reply[8] == MAX_PAGES_LIMIT


def test_init_refuses_old_protocols_and_answers_newer_majors(mount):
    fs, _ = mount(init=False)
    raises(errno.EIO, fs.getattr, ROOT)  # nothing before INIT
    raises(errno.EPROTO, fs.init, minor=30)
    body = f.INIT_IN.pack(8, 0, 0, 0, 0) + bytes(44)
    reply = f.INIT_OUT.unpack(fs.call(f.Op.INIT, args=[body], reply=64))
    assert reply[:2] == (7, 37)  # the guest is to come back with major 7
    raises(errno.EIO, fs.getattr, ROOT)  # that was no session
    fs.init()
    assert stat.S_ISDIR(fs.getattr(ROOT).mode)


# -- files --


@pytest.mark.parametrize("rings", RINGS)
def test_write_and_read_files(mount, share, rings):
    fs, _ = mount(**rings)
    max_write = fs.init_reply[6]
    data = os.urandom(3 * max_write + 12345)
    entry, fh = fs.create(ROOT, "big.bin", 0o640)
    assert stat.S_ISREG(entry.attr.mode) and entry.attr.mode & 0o777 == 0o640
    for off in range(0, len(data), max_write):
        assert fs.write(entry.node, fh, off, data[off : off + max_write]) == len(
            data[off : off + max_write]
        )
    fs.flush(entry.node, fh)
    fs.fsync(entry.node, fh, datasync=True)
    assert sha((share / "big.bin").read_bytes()) == sha(data)
    back = b"".join(
        fs.read(entry.node, fh, off, max_write) for off in range(0, len(data), max_write)
    )
    assert sha(back) == sha(data)
    assert fs.read(entry.node, fh, len(data) - 10, 4096) == data[-10:]  # short at EOF
    assert fs.read(entry.node, fh, len(data) + 1, 4096) == b""
    assert fs.getattr(entry.node).size == len(data)
    fs.release(entry.node, fh)
    # a file the host put there
    (share / "host.txt").write_bytes(b"from the host\n" * 1000)
    e = fs.lookup(ROOT, "host.txt")
    st = os.stat(share / "host.txt")
    assert (e.attr.ino, e.attr.size, e.attr.mode) == (st.st_ino, st.st_size, st.st_mode)
    assert e.attr.mtime_ns == st.st_mtime_ns and e.attr.nlink == 1
    assert e.entry_valid == 1 and e.attr_valid == 1
    fh = fs.open(e.node, os.O_RDONLY)
    assert fs.read(e.node, fh, 0, 1 << 16) == (share / "host.txt").read_bytes()
    raises(errno.EBADF, fs.write, e.node, fh, 0, b"x")  # opened read-only on the host too
    fs.release(e.node, fh)


def test_open_flags_truncate_and_append(mount, share):
    fs, _ = mount()
    (share / "t.txt").write_bytes(b"old contents")
    e = fs.lookup(ROOT, "t.txt")
    fh = fs.open(e.node, os.O_WRONLY | os.O_TRUNC)  # ATOMIC_O_TRUNC: the open truncates
    assert (share / "t.txt").read_bytes() == b""
    fs.write(e.node, fh, 0, b"new")
    fs.release(e.node, fh)
    assert (share / "t.txt").read_bytes() == b"new"


def test_setattr_mode_size_owner_times(mount, share):
    fs, _ = mount()
    entry, fh = fs.create(ROOT, "a", 0o600)
    fs.write(entry.node, fh, 0, b"0123456789")
    a = fs.setattr(entry.node, mode=0o751)
    assert a.mode & 0o7777 == 0o751 and os.stat(share / "a").st_mode & 0o7777 == 0o751
    a = fs.setattr(entry.node, size=4)
    assert a.size == 4 and (share / "a").read_bytes() == b"0123"
    a = fs.setattr(entry.node, fh=fh, size=2)  # ftruncate through the handle
    assert a.size == 2 and (share / "a").read_bytes() == b"01"
    a = fs.setattr(entry.node, atime_ns=1_000_000_123, mtime_ns=2_000_000_456)
    st = os.stat(share / "a")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert (a.atime_ns, a.mtime_ns) == (1_000_000_123, 2_000_000_456)
    a = fs.setattr(entry.node, atime_now=True, mtime_now=True)
    assert a.mtime_ns > 2_000_000_456 and os.stat(share / "a").st_mtime_ns == a.mtime_ns
    uid, gid = os.getuid(), os.getgid()
    a = fs.setattr(entry.node, uid=uid, gid=gid)
    assert (a.uid, a.gid) == (uid, gid)
    fs.release(entry.node, fh)


def test_fallocate_lseek_copy_file_range(mount, share):
    fs, _ = mount()
    src, fh_src = fs.create(ROOT, "src")
    dst, fh_dst = fs.create(ROOT, "dst")
    fs.fallocate(src.node, fh_src, 0, 1 << 20)
    assert os.stat(share / "src").st_size == 1 << 20
    fs.write(src.node, fh_src, 512 << 10, b"data" * 1024)
    # SEEK_DATA / SEEK_HOLE say what the host file system says (ext4 counts fallocated
    # blocks as a hole, tmpfs as data)
    fd = os.open(share / "src", os.O_RDONLY)
    try:
        for off in (0, 4096, 512 << 10, (512 << 10) + 4000):
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert fs.lseek(src.node, fh_src, off, whence) == os.lseek(fd, off, whence)
    finally:
        os.close(fd)
    assert fs.copy_file_range(src.node, fh_src, 512 << 10, dst.node, fh_dst, 100, 4096) == 4096
    assert (share / "dst").read_bytes() == bytes(100) + b"data" * 1024
    raises(errno.ENXIO, fs.lseek, src.node, fh_src, 2 << 20, os.SEEK_DATA)
    for n, fh in ((src.node, fh_src), (dst.node, fh_dst)):
        fs.release(n, fh)


# -- names and directories --


@pytest.mark.parametrize("rings", RINGS[:2])
def test_directories_and_listings(mount, share, rings):
    fs, _ = mount(**rings)
    d = fs.mkdir(ROOT, "dir", 0o750)
    assert stat.S_ISDIR(d.attr.mode) and os.stat(share / "dir").st_mode & 0o777 == 0o750
    names = [f"file-{i:03d}-{'x' * (i % 40)}" for i in range(150)]
    for n in names:
        (share / "dir" / n).write_bytes(n.encode())
    os.mkdir(share / "dir" / "sub")
    want = sorted([".", "..", "sub", *names])
    # READDIR in small pieces: whole records only, offsets that continue the listing
    listing = fs.listdir(d.node, size=256)
    assert sorted(e.name.decode() for e in listing) == want
    assert len(listing) == len(want)  # nothing twice
    by_name = {e.name.decode(): e for e in listing}
    assert by_name["sub"].type == stat.S_IFDIR >> 12 and by_name[names[0]].type == 8
    assert by_name[names[0]].ino == os.stat(share / "dir" / names[0]).st_ino
    # READDIRPLUS: an entry (with attributes) for everything but . and ..
    plus = fs.listdir(d.node, plus=True, size=4096)
    assert sorted(e.name.decode() for e in plus) == want
    for e in plus:
        name = e.name.decode()
        if name in (".", ".."):
            assert e.entry is None
            continue
        st = os.stat(share / "dir" / name)
        assert (e.entry.attr.ino, e.entry.attr.size, e.entry.attr.mode) == (
            st.st_ino,
            st.st_size,
            st.st_mode,
        )
        assert fs.lookup(d.node, name).node == e.entry.node  # the same node id
    fh = fs.opendir(d.node)
    fs.fsyncdir(d.node, fh)
    assert fs.readdir(d.node, fh, size=8) == []  # no room for one record: none
    fs.releasedir(d.node, fh)
    raises(errno.ENOTEMPTY, fs.rmdir, ROOT, "dir")
    for n in names:
        fs.unlink(d.node, n)
    fs.rmdir(d.node, "sub")
    fs.rmdir(ROOT, "dir")
    assert os.listdir(share) == []
    raises(errno.ENOENT, fs.lookup, ROOT, "dir")


def test_rename_rename2_link_symlink_mknod(mount, share):
    fs, _ = mount()
    a = fs.mkdir(ROOT, "a")
    b = fs.mkdir(ROOT, "b")
    (share / "a" / "one").write_bytes(b"1")
    (share / "b" / "two").write_bytes(b"2")
    fs.rename(a.node, "one", b.node, "uno")
    assert (share / "b" / "uno").read_bytes() == b"1" and not (share / "a" / "one").exists()
    raises(errno.EEXIST, fs.rename, b.node, "uno", b.node, "two", flags=1)  # NOREPLACE
    fs.rename(b.node, "uno", b.node, "two", flags=2)  # EXCHANGE
    assert (share / "b" / "uno").read_bytes() == b"2" and (share / "b" / "two").read_bytes() == b"1"
    fs.rename(b.node, "uno", ROOT, "top", flags=1)
    assert (share / "top").read_bytes() == b"2"
    two = fs.lookup(b.node, "two")
    ln = fs.link(two.node, a.node, "hard")
    assert ln.node == two.node and ln.attr.nlink == 2  # one node per inode
    assert os.stat(share / "a" / "hard").st_ino == os.stat(share / "b" / "two").st_ino
    s = fs.symlink(a.node, "sym", "../b/two")
    assert stat.S_ISLNK(s.attr.mode) and os.readlink(share / "a" / "sym") == "../b/two"
    assert fs.readlink(s.node) == b"../b/two"
    fifo = fs.mknod(ROOT, "fifo", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(fifo.attr.mode) and stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    sock = fs.mknod(ROOT, "sock", stat.S_IFREG | 0o644)
    assert stat.S_ISREG(os.lstat(share / "sock").st_mode) and sock.attr.size == 0


def test_statfs_and_access(mount, share):
    fs, _ = mount()
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _ = fs.statfs()
    v = os.statvfs(share)
    assert (blocks, bsize, namelen, frsize, files) == (
        v.f_blocks,
        v.f_bsize,
        v.f_namemax,
        v.f_frsize,
        v.f_files,
    )
    assert abs(bfree - v.f_bfree) < 4096  # the disk is shared with other tests
    (share / "f").write_bytes(b"")
    e = fs.lookup(ROOT, "f")
    fs.access(e.node, os.F_OK)
    fs.access(e.node, os.R_OK | os.W_OK)
    os.chmod(share / "f", 0o400)
    if os.getuid() != 0:  # root may write anyway
        raises(errno.EACCES, fs.access, e.node, os.W_OK)


def test_xattrs(mount, share):
    fs, _ = mount()
    (share / "x").write_bytes(b"")
    e = fs.lookup(ROOT, "x")
    fs.setxattr(e.node, "user.colour", b"blue")
    assert os.getxattr(share / "x", "user.colour") == b"blue"
    assert fs.getxattr(e.node, "user.colour") == b"blue"
    assert fs.getxattr(e.node, "user.colour", size=0) == 4
    raises(errno.ERANGE, fs.getxattr, e.node, "user.colour", size=2)
    fs.setxattr(e.node, "user.shape", b"round")
    assert sorted(fs.listxattr(e.node)) == [b"user.colour", b"user.shape"]
    assert fs.listxattr(e.node, size=0) == len(b"user.colour\0user.shape\0")
    raises(errno.ERANGE, fs.listxattr, e.node, size=5)
    raises(errno.EEXIST, fs.setxattr, e.node, "user.shape", b"x", os.XATTR_CREATE)
    fs.removexattr(e.node, "user.colour")
    assert os.listxattr(share / "x") == ["user.shape"]
    raises(errno.ENODATA, fs.getxattr, e.node, "user.colour")


# -- the session: forget, interrupt, destroy, unknown requests, more queues --


def test_forget_batch_forget_and_interrupt_get_no_reply(mount, share):
    fs, _ = mount()
    (share / "f").write_bytes(b"")
    (share / "g").write_bytes(b"")
    e = fs.lookup(ROOT, "f")
    assert fs.lookup(ROOT, "f").node == e.node  # looked up twice
    g = fs.lookup(ROOT, "g")
    assert fs.forget(e.node, 1) == 0
    assert fs.getattr(e.node).ino == e.attr.ino  # one lookup left
    assert fs.batch_forget([(e.node, 1), (g.node, 1)]) == 0
    for n in (e.node, g.node):
        with pytest.raises(FuseReplyError) as err:
            fs.getattr(n)
        assert err.value.errno in (errno.ESTALE, errno.EBADF)
    assert fs.interrupt(12345) == 0
    assert fs.forget(ROOT, 1) == 0  # the root is never forgotten
    assert stat.S_ISDIR(fs.getattr(ROOT).mode)


def test_destroy_ends_the_session(mount, share):
    fs, _ = mount()
    (share / "f").write_bytes(b"abc")
    e = fs.lookup(ROOT, "f")
    fh = fs.open(e.node)
    fs.destroy()
    raises(errno.EIO, fs.getattr, ROOT)
    fs.init()
    for call in (lambda: fs.getattr(e.node), lambda: fs.read(e.node, fh, 0, 3)):
        with pytest.raises(FuseReplyError) as err:
            call()
        assert err.value.errno in (errno.ESTALE, errno.EBADF)
    assert fs.lookup(ROOT, "f").attr.size == 3


def test_requests_are_counted_by_opcode_and_logged_at_destroy(mount, share, caplog):
    """The round trips a workload costs, to set beside virtiofsd's -d log: every request
    read is counted by opcode (a value that is no opcode under one key, however many a
    guest sends) and, at debug level, logged, with the counts at DESTROY."""
    caplog.set_level(logging.DEBUG, logger="emu.devices.fs")  # as at INIT: seen then
    fs, dev = mount()
    (share / "f").write_bytes(b"abc")
    e = fs.lookup(ROOT, "f")
    raises(errno.ENOENT, fs.lookup, ROOT, "missing")
    fs.getattr(e.node)
    fs.forget(e.node, 1)
    for op in (7, 99, 2**32 - 1):  # 7: a gap among the opcodes
        raises(errno.ENOSYS, fs.call, op, ROOT, [bytes(64)], 64)
    want = {"INIT": 1, "LOOKUP": 2, "GETATTR": 1, "FORGET": 1, "other": 3}
    assert dev.requests() == want
    fs.destroy()
    assert dev.requests() == {}  # counted afresh from the next INIT
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fs: request ") and "LOOKUP node 1" in m for m in logged)
    assert any(m.endswith(f"error {errno.ENOENT}") for m in logged)
    (summary,) = [m for m in logged if m.startswith("fs: requests: ")]
    assert summary.startswith("fs: requests: other 3, LOOKUP 2, ")
    assert all(k in summary for k in ("INIT 1", "GETATTR 1", "FORGET 1", "DESTROY 1"))


@pytest.mark.parametrize(
    "op", [f.Op.GETLK, f.Op.SETLK, f.Op.SETLKW, f.Op.BMAP, f.Op.IOCTL, f.Op.POLL, f.Op.SYNCFS,
           f.Op.TMPFILE, f.Op.SETUPMAPPING, f.Op.REMOVEMAPPING, f.Op.NOTIFY_REPLY, 99, 4096],
)  # fmt: skip
def test_requests_not_served_are_enosys(mount, op):
    fs, _ = mount()
    raises(errno.ENOSYS, fs.call, op, ROOT, [bytes(64)], 64)
    assert stat.S_ISDIR(fs.getattr(ROOT).mode)


def test_every_request_queue_serves(mount, share):
    fs, _ = mount(queues=3)
    for q in (1, 2, 3):
        fs.queue = q
        e, fh = fs.create(ROOT, f"q{q}")
        fs.write(e.node, fh, 0, b"queue %d" % q)
        fs.release(e.node, fh)
    assert sorted(os.listdir(share)) == ["q1", "q2", "q3"]
    assert (share / "q3").read_bytes() == b"queue 3"


# -- ro --


def test_ro_refuses_every_write_type_request(mount, share):
    (share / "f").write_bytes(b"keep")
    os.mkdir(share / "d")
    os.setxattr(share / "f", "user.k", b"v")
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in share.iterdir()}
    fs, _ = mount(ro=True)
    e = fs.lookup(ROOT, "f")
    d = fs.lookup(ROOT, "d")
    fh = fs.open(e.node, os.O_RDONLY)
    assert fs.read(e.node, fh, 0, 10) == b"keep"
    for call in (
        lambda: fs.setattr(e.node, size=0),
        lambda: fs.setattr(e.node, mode=0o777),
        lambda: fs.symlink(ROOT, "s", "f"),
        lambda: fs.mknod(ROOT, "n", stat.S_IFIFO | 0o600),
        lambda: fs.mkdir(ROOT, "m"),
        lambda: fs.unlink(ROOT, "f"),
        lambda: fs.rmdir(ROOT, "d"),
        lambda: fs.rename(ROOT, "f", d.node, "g"),
        lambda: fs.rename(ROOT, "f", d.node, "g", flags=1),
        lambda: fs.link(e.node, d.node, "h"),
        lambda: fs.create(ROOT, "c"),
        lambda: fs.write(e.node, fh, 0, b"x"),
        lambda: fs.setxattr(e.node, "user.k", b"w"),
        lambda: fs.removexattr(e.node, "user.k"),
        lambda: fs.fallocate(e.node, fh, 0, 100),
        lambda: fs.copy_file_range(e.node, fh, 0, e.node, fh, 10, 4),
        lambda: fs.open(e.node, os.O_WRONLY),
        lambda: fs.open(e.node, os.O_RDWR),
        lambda: fs.open(e.node, os.O_RDONLY | os.O_TRUNC),
    ):
        raises(errno.EROFS, call)
    assert fs.getxattr(e.node, "user.k") == b"v"
    assert sorted(x.name.decode() for x in fs.listdir(ROOT)) == [".", "..", "d", "f"]
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in share.iterdir()}
    assert after == before and (share / "f").read_bytes() == b"keep"
    fs.release(e.node, fh)


# -- stop, save, restore --


def swap_device(fs: FuseClient, mem: GuestMemory, fresh: FsDevice, path: Path) -> FuseClient:
    """Save the (stopped) device behind ``fs`` to ``path``; ``fresh`` takes over."""
    statefile.save(path, fs.drv.transport.save())
    saved = fs.drv.save()
    fs.drv.transport.device.close()
    tr = MmioTransport(fresh, mem)
    drv = VirtioMmioDriver.load(tr, mem, saved)
    tr.restore(statefile.load(path))
    out = FuseClient(drv, fs.num_request_queues)
    out._unique = fs._unique
    return out


@pytest.mark.parametrize("rings", RINGS[:2])
def test_open_handles_survive_save_and_restore(mount, mem, share, tmp_path, rings):
    data = os.urandom(200_000)
    (share / "sub").mkdir()
    (share / "sub" / "data").write_bytes(data)
    fs, dev = mount(**rings)
    sub = fs.lookup(ROOT, "sub")
    e = fs.lookup(sub.node, "data")
    fh = fs.open(e.node, os.O_RDWR)
    assert fs.read(e.node, fh, 0, 1000) == data[:1000]
    dfh = fs.opendir(sub.node)
    first = fs.readdir(sub.node, dfh, 0, size=32)  # a directory being listed
    fs.drv.transport.vmm_stop("report")
    fresh = FsDevice(share)
    fs2 = swap_device(fs, mem, fresh, tmp_path / "fs.state")
    try:
        # no INIT again: the session, the nodes and the handles came along
        assert fs2.read(e.node, fh, 1000, 100_000) == data[1000:101_000]
        assert fs2.write(e.node, fh, 0, b"AFTER") == 5
        assert (share / "sub" / "data").read_bytes()[:5] == b"AFTER"
        assert fs2.getattr(sub.node).ino == os.stat(share / "sub").st_ino
        rest = []
        while batch := fs2.readdir(sub.node, dfh, (rest or first)[-1].off):
            rest += batch
        assert sorted(x.name for x in first + rest) == [b".", b"..", b"data"]
        raises(errno.EIO, fs2.init)  # still the same session
    finally:
        fresh.close()


def test_a_request_answered_before_a_report_stop_is_not_run_again(mount, mem, share, tmp_path):
    fs, dev = mount()
    mkdir, size = dev._ops[f.Op.MKDIR]
    calls = []

    def mkdir_then_stop(h, a, room):  # a VMM's stop arrives while the request runs
        calls.append(h.unique)
        vmm = threading.Thread(target=dev.request_stop, args=("report",))
        vmm.start()
        vmm.join()
        return mkdir(h, a, room)

    dev._ops[f.Op.MKDIR] = (mkdir_then_stop, size)
    q = fs.drv.queues[1]
    unique = fs.next_unique()
    args = [f.MKDIR_IN.pack(0o755, 0), b"made\0"]
    token = q.add([f.IN_HEADER.pack(40 + 8 + 5, f.Op.MKDIR, unique, ROOT, 0, 0, 0, 0), *args],
                  [16, f.ENTRY_OUT.size])  # fmt: skip
    fs.drv.kick(1)
    assert dev.wait_stopped(10)
    assert calls == [unique] and (share / "made").is_dir()
    assert len(dev.queues[1].inflight()) == 1  # ran, but its used entry did not go out
    fresh = FsDevice(share)
    fs2 = swap_device(fs, mem, fresh, tmp_path / "fs.state")
    try:
        (c,) = fs2.drv.wait(1)
        length, error, got = f.OUT_HEADER.unpack_from(c.data)
        assert c.token == token and error == 0 and got == unique  # not EEXIST: not rerun
        assert length == c.length == 16 + f.ENTRY_OUT.size
        assert fs2.lookup(ROOT, "made").attr.ino == os.stat(share / "made").st_ino
    finally:
        fresh.close()


def test_a_stop_asked_inside_a_request_waits_for_its_writes(mount, share):
    """A stop asked from the device thread itself (a handler, a backend callback) runs
    after the pass: STOPPED is never reported while the request still writes."""
    fs, dev = mount()
    mkdir, size = dev._ops[f.Op.MKDIR]
    seen = []

    def stop_then_mkdir(h, a, room):
        dev.request_stop("report")
        reply = mkdir(h, a, room)  # the host directory and the guest's reply buffer
        seen.append(dev.run_state)
        return reply

    dev._ops[f.Op.MKDIR] = (stop_then_mkdir, size)
    q = fs.drv.queues[1]
    hdr = f.IN_HEADER.pack(40 + 8 + 5, f.Op.MKDIR, fs.next_unique(), ROOT, 0, 0, 0, 0)
    q.add([hdr, f.MKDIR_IN.pack(0o755, 0), b"made\0"], [16, f.ENTRY_OUT.size])
    fs.drv.kick(1)
    assert dev.wait_stopped(10) and dev.stopped
    assert seen and seen[0] is not RunState.STOPPED
    assert (share / "made").is_dir() and len(dev.queues[1].inflight()) == 1


def test_a_queue_reset_forgets_answers_its_heads_had(mount, share):
    """A MKDIR answered while the driver resets its queue keeps its used entry back; the
    reset ring hands the same head out again for a new request, which must run, not get
    the old answer."""
    fs, dev = mount()
    mkdir, size = dev._ops[f.Op.MKDIR]
    q_dev = dev.queues[1]
    in_mkdir = threading.Event()

    def mkdir_during_reset(h, a, room):
        in_mkdir.set()
        wait_until(lambda: q_dev.gate is not Gate.OPEN, 5)  # the reset is under way
        return mkdir(h, a, room)

    dev._ops[f.Op.MKDIR] = (mkdir_during_reset, size)
    q = fs.drv.queues[1]
    hdr = f.IN_HEADER.pack(40 + 8 + 6, f.Op.MKDIR, fs.next_unique(), ROOT, 0, 0, 0, 0)
    q.add([hdr, f.MKDIR_IN.pack(0o755, 0), b"first\0"], [16, f.ENTRY_OUT.size])
    fs.drv.kick(1)
    assert in_mkdir.wait(5)
    fs.drv._write(mmio_regs.QUEUE_SEL, 1)
    fs.drv._write(mmio_regs.QUEUE_RESET, 1)  # returns once the device is off the queue
    assert (share / "first").is_dir()
    dev._ops[f.Op.MKDIR] = (mkdir, size)
    fs.drv.setup_queue(1, 64)
    second = fs.mkdir(ROOT, "second")  # the same head as the first, after the reset
    assert second.attr.ino == os.stat(share / "second").st_ino


def test_restore_onto_another_share_is_refused(mount, mem, share, tmp_path):
    fs, dev = mount(tag="one")
    fs.drv.transport.vmm_stop("drain")
    state = fs.drv.transport.save()
    other = FsDevice(share, tag="two")
    try:
        with pytest.raises(StateError, match="tag"):
            restore_device(other, state)
    finally:
        other.close()


def test_demo_in_process():
    res = CliRunner().invoke(main, ["demo", "--in-process", "fs"])
    assert res.exit_code == 0, res.output
    assert "host file matches" in res.output and "data.bin" in res.output


def test_files_deleted_or_replaced_before_the_restore_answer_estale(mount, mem, share, tmp_path):
    (share / "gone").write_bytes(b"gone data")
    (share / "swapped").write_bytes(b"old data")
    (share / "kept").write_bytes(b"kept data")
    fs, _ = mount()
    opened = {}
    for n in ("gone", "swapped", "kept"):
        e = fs.lookup(ROOT, n)
        opened[n] = (e.node, fs.open(e.node, os.O_RDONLY))
    fs.drv.transport.vmm_stop("report")
    statefile.save(tmp_path / "strict.state", fs.drv.transport.save())
    (share / "gone").unlink()
    (share / "swapped").unlink()
    (share / "swapped").write_bytes(b"NEW DATA, another inode")
    (strict,) = registry.make_devices([f"fs:{share},strict"])  # as emu serve makes it
    try:
        with pytest.raises(StateError, match="gone|swapped"):
            restore_device(strict, statefile.load(tmp_path / "strict.state"))
    finally:
        strict.close()
    fresh = FsDevice(share)
    fs2 = swap_device(fs, mem, fresh, tmp_path / "fs.state")
    try:
        for n in ("gone", "swapped"):
            node, fh = opened[n]
            raises(errno.ESTALE, fs2.read, node, fh, 0, 100)
            raises(errno.ESTALE, fs2.getattr, node)
            fs2.release(node, fh)  # the guest can still let go of it
        node, fh = opened["kept"]
        assert fs2.read(node, fh, 0, 100) == b"kept data"
        assert fs2.read(*fs2_open(fs2, "swapped"), 0, 100) == b"NEW DATA, another inode"
    finally:
        fresh.close()


def fs2_open(fs: FuseClient, n: str) -> tuple[int, int]:
    e = fs.lookup(ROOT, n)
    return e.node, fs.open(e.node)


# -- over vhost-user, as `emu serve` serves real guests --


class Served:
    """``emu serve``'s code for ``specs`` on a thread of this process."""

    def __init__(self, specs: list[str], sock: Path) -> None:
        self.devices = make_devices(specs)
        self.done = threading.Event()
        args = (self.devices, [str(sock)], self.done)
        self.thread = threading.Thread(target=serve, args=args, daemon=True)
        self.thread.start()
        wait_until(sock.exists)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


def test_served_over_vhost_user_and_restored_in_a_fresh_server(share, tmp_path):
    data = os.urandom(300_000)
    (share / "f").write_bytes(data)
    sock = tmp_path / "fs.sock"
    spec = f"fs:{share},tag=vu-tag"
    first = Served([spec], sock)
    fe = VhostUserDriver(sock)
    try:
        fs = FuseClient.connect(fe, queue_size=64)
        assert fs.tag == "vu-tag" and fs.num_request_queues == 1
        assert fs.init_reply[8] == 64 - 8  # max_pages from the ring the frontend made
        e = fs.lookup(ROOT, "f")
        fh = fs.open(e.node, os.O_RDWR)
        assert fs.read(e.node, fh, 0, 4096) == data[:4096]
        bases = {i: fe.stop_ring(i) for i in (0, 1)}  # QEMU's stop
        state = fe.save_state()
        first.close()
        second = Served([spec], sock)
        try:
            fe.sock.close()
            fe.sock = connect(sock)
            fe.init()
            fe.load_state(state)
            for i, base in bases.items():
                fe.restart_ring(i, base)
            # the same session, node and handle in another server
            assert fs.read(e.node, fh, 4096, 200_000) == data[4096:204_096]
            assert fs.write(e.node, fh, 0, b"from vhost-user") == 15
            assert (share / "f").read_bytes()[:15] == b"from vhost-user"
            raises(errno.EIO, fs.init)
        finally:
            second.close()
    finally:
        fe.close()
