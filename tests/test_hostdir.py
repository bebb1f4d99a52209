"""HostDir: the shared directory in FUSE terms, and the sandbox around it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emu.backends.hostdir import (
    FD_RESERVE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    XATTR_CREATE,
    XATTR_REPLACE,
    HostDir,
    HostDirStateError,
)


@contextlib.contextmanager
def err(code: int) -> Iterator[pytest.ExceptionInfo[OSError]]:
    """pytest.raises for an OSError carrying exactly ``code``."""
    with pytest.raises(OSError) as info:
        yield info
    got = info.value.errno
    assert got == code, f"{errno.errorcode.get(got, got)}, expected {errno.errorcode[code]}"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_bytes(b"hello\n")
    (root / "d").mkdir()
    (root / "d" / "inner").write_bytes(b"inner\n")
    return root


@pytest.fixture
def hd(tree: Path):
    h = HostDir(tree)
    yield h
    h.close()


def names(h: HostDir, fh: int, offset: int = 0) -> list[bytes]:
    return [name for _, _, _, name in h.readdir(fh, offset)]


# -- nodes ------------------------------------------------------------------------------


def test_lookup_gives_the_entry_and_its_attributes(hd: HostDir, tree: Path) -> None:
    node, st = hd.lookup(ROOT, b"f")
    host = os.lstat(tree / "f")
    assert node != ROOT
    assert (st.st_ino, st.st_size, st.st_mode) == (host.st_ino, 6, host.st_mode)
    assert hd.getattr(node).st_ino == host.st_ino
    assert hd.getattr(ROOT).st_ino == os.stat(tree).st_ino


def test_lookup_counts_and_forget(hd: HostDir) -> None:
    a, _ = hd.lookup(ROOT, b"f")
    assert hd.lookup(ROOT, b"f")[0] == a  # the same inode keeps its node id
    hd.forget(a, 1)
    hd.getattr(a)  # one lookup left
    hd.forget(a, 1)
    with err(errno.ESTALE):
        hd.getattr(a)
    b, _ = hd.lookup(ROOT, b"f")
    assert b != a  # ids are never reused


def test_forget_of_root_unknown_or_too_many_is_harmless(hd: HostDir) -> None:
    hd.forget(ROOT, 10)
    hd.forget(12345, 1)
    hd.forget(-1, 1)
    node, _ = hd.lookup(ROOT, b"d")
    hd.forget(node, 0)
    hd.forget(node, -5)
    hd.getattr(node)
    hd.forget(node, 1 << 64)
    with err(errno.ESTALE):
        hd.getattr(node)
    assert hd.getattr(ROOT).st_ino  # ROOT never goes


def test_lookup_of_a_missing_name_and_under_a_file(hd: HostDir) -> None:
    with err(errno.ENOENT):
        hd.lookup(ROOT, b"nope")
    f, _ = hd.lookup(ROOT, b"f")
    with err(errno.ENOTDIR):
        hd.lookup(f, b"x")
    with err(errno.ENOTDIR):
        hd.lookup(f, b"..")


def test_statfs_is_the_host_file_systems(hd: HostDir, tree: Path) -> None:
    got, want = hd.statfs(ROOT), os.statvfs(tree)
    assert (got.f_bsize, got.f_blocks, got.f_namemax) == (want.f_bsize, want.f_blocks, 255)


def test_mkdir_unlink_rmdir(hd: HostDir, tree: Path) -> None:
    node, st = hd.mkdir(ROOT, b"sub", 0o755)
    assert stat.S_ISDIR(st.st_mode) and (tree / "sub").is_dir()
    assert hd.lookup(ROOT, b"sub")[0] == node
    with err(errno.EEXIST):
        hd.mkdir(ROOT, b"sub", 0o755)
    d, _ = hd.lookup(ROOT, b"d")
    with err(errno.ENOTEMPTY):
        hd.rmdir(ROOT, b"d")
    with err(errno.EISDIR):
        hd.unlink(ROOT, b"d")
    hd.unlink(d, b"inner")
    hd.rmdir(ROOT, b"d")
    hd.rmdir(ROOT, b"sub")
    assert sorted(os.listdir(tree)) == ["f"]
    hd.getattr(node)  # the guest still holds it: attributes of the removed directory
    with err(errno.ENOENT):
        hd.rmdir(ROOT, b"sub")


def test_new_entries_get_the_guests_mode_not_the_host_umask(hd: HostDir, tree: Path) -> None:
    old = os.umask(0o077)
    try:
        _, st = hd.mkdir(ROOT, b"open", 0o777)
        _, st2, fh = hd.create(ROOT, b"file", 0o664, os.O_WRONLY)
    finally:
        os.umask(old)
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert stat.S_IMODE(os.stat(tree / "file").st_mode) == stat.S_IMODE(st2.st_mode) == 0o664
    hd.release(fh)


# -- files ------------------------------------------------------------------------------


def test_open_read_write_release(hd: HostDir, tree: Path) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(node, os.O_RDWR)
    fd = hd.fd(fh)
    assert os.pread(fd, 100, 0) == b"hello\n"
    os.pwrite(fd, b"J", 0)
    hd.release(fh)
    assert (tree / "f").read_bytes() == b"Jello\n"
    with err(errno.EBADF):
        hd.fd(fh)
    with err(errno.EBADF):
        hd.release(fh)


def test_open_with_o_trunc_and_o_append(hd: HostDir, tree: Path) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(node, os.O_WRONLY | os.O_APPEND)
    os.write(hd.fd(fh), b"more\n")
    hd.release(fh)
    assert (tree / "f").read_bytes() == b"hello\nmore\n"
    hd.release(hd.open(node, os.O_WRONLY | os.O_TRUNC))
    assert (tree / "f").read_bytes() == b""


def test_open_refuses_what_is_not_a_regular_file(hd: HostDir, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    os.symlink("f", tree / "link")
    d, _ = hd.lookup(ROOT, b"d")
    with err(errno.EISDIR):
        hd.open(d, os.O_RDONLY)
    with err(errno.ELOOP):
        hd.open(hd.lookup(ROOT, b"link")[0], os.O_RDONLY)
    with err(errno.ENXIO):  # a host open of a FIFO would block the device thread
        hd.open(hd.lookup(ROOT, b"fifo")[0], os.O_RDONLY)
    with err(errno.EINVAL):
        hd.open(hd.lookup(ROOT, b"f")[0], os.O_ACCMODE)


def test_create_new_existing_and_exclusive(hd: HostDir, tree: Path) -> None:
    node, st, fh = hd.create(ROOT, b"new", 0o600, os.O_RDWR)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    os.pwrite(hd.fd(fh), b"data", 0)
    assert hd.lookup(ROOT, b"new")[0] == node
    with err(errno.EEXIST):
        hd.create(ROOT, b"new", 0o600, os.O_RDWR | os.O_EXCL)
    node2, st2, fh2 = hd.create(ROOT, b"new", 0o600, os.O_RDONLY)  # opens what is there
    assert node2 == node and st2.st_size == 4
    assert os.pread(hd.fd(fh2), 10, 0) == b"data"
    with err(errno.EISDIR):
        hd.create(ROOT, b"d", 0o600, os.O_RDONLY)
    hd.release(fh)
    hd.release(fh2)


@pytest.mark.parametrize("swap", ["replaced", "removed"])
def test_create_holds_the_inode_it_created_when_the_host_swaps_the_name(
    hd: HostDir, tree: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """create reopens the new file by name for its node; a host that replaced (or
    removed) the entry right after the creation must not make the node another file."""
    real_open = os.open

    def swapping_open(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if path == b"new" and flags & os.O_PATH:  # the reopen after the creation
            if swap == "replaced":
                (tree / "other").write_bytes(b"not the created file")
                os.rename(tree / "other", tree / "new")
            else:
                os.unlink(tree / "new")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", swapping_open)
    node, st, fh = hd.create(ROOT, b"new", 0o600, os.O_RDWR)
    monkeypatch.setattr(os, "open", real_open)
    created = os.fstat(hd.fd(fh))
    assert (st.st_ino, hd.getattr(node).st_ino) == (created.st_ino, created.st_ino)
    assert created.st_nlink == 0  # the created file is the one whose name went
    if swap == "replaced":
        assert os.stat(tree / "new").st_ino != created.st_ino
    hd.release(fh)
    hd.forget(node, 1)


def test_a_node_outlives_its_forget_while_a_handle_is_open(hd: HostDir) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(node, os.O_RDONLY)
    hd.forget(node, 1)
    assert os.pread(hd.fd(fh), 5, 0) == b"hello"
    hd.getattr(node)
    hd.release(fh)
    with err(errno.ESTALE):
        hd.getattr(node)


# -- directories ------------------------------------------------------------------------


def test_readdir_lists_dots_and_entries_with_types(hd: HostDir, tree: Path) -> None:
    os.symlink("f", tree / "link")
    fh = hd.opendir(ROOT)
    got = list(hd.readdir(fh, 0))
    assert [(off, name) for _, off, _, name in got[:2]] == [(1, b"."), (2, b"..")]
    assert [off for _, off, _, _ in got] == list(range(1, len(got) + 1))
    types = {name: dtype for _, _, dtype, name in got}
    assert types == {b".": 4, b"..": 4, b"f": 8, b"d": 4, b"link": 10}
    inos = {name: ino for ino, _, _, name in got}
    assert inos[b"f"] == os.lstat(tree / "f").st_ino
    assert inos[b".."] == inos[b"."] == os.stat(tree).st_ino  # ROOT's parent is ROOT
    hd.releasedir(fh)


def test_readdir_resumes_at_any_offset_it_gave(hd: HostDir, tree: Path) -> None:
    for i in range(50):
        (tree / f"n{i:02}").write_bytes(b"")
    fh = hd.opendir(ROOT)
    full = list(hd.readdir(fh, 0))
    # as the device does: take some, drop the one that did not fit, ask again from there
    pieces: list[tuple[int, int, int, bytes]] = []
    offset = 0
    while True:
        it = hd.readdir(fh, offset)
        batch = [e for _, e in zip(range(7), it, strict=False)]
        if not batch:
            break
        pieces += batch[:-1] if len(batch) == 7 else batch
        offset = pieces[-1][1]
    assert pieces == full
    assert list(hd.readdir(fh, 20)) == full[20:]  # and a jump back
    assert list(hd.readdir(fh, 40)) == full[40:]  # and forward
    assert list(hd.readdir(fh, len(full) + 10)) == []
    hd.releasedir(fh)


def test_readdir_from_zero_sees_what_changed(hd: HostDir, tree: Path) -> None:
    fh = hd.opendir(ROOT)
    before = set(names(hd, fh))
    (tree / "later").write_bytes(b"")
    assert set(names(hd, fh)) == before | {b"later"}
    hd.releasedir(fh)


def test_readdir_of_a_subdirectory_gives_its_parent(hd: HostDir, tree: Path) -> None:
    d, _ = hd.lookup(ROOT, b"d")
    fh = hd.opendir(d)
    got = {name: ino for ino, _, _, name in hd.readdir(fh, 0)}
    assert got == {
        b".": os.stat(tree / "d").st_ino,
        b"..": os.stat(tree).st_ino,
        b"inner": os.stat(tree / "d" / "inner").st_ino,
    }
    hd.releasedir(fh)


def test_handles_are_of_one_kind(hd: HostDir) -> None:
    dh = hd.opendir(ROOT)
    fh = hd.open(hd.lookup(ROOT, b"f")[0], os.O_RDONLY)
    with err(errno.EBADF):
        hd.fd(dh)
    with err(errno.EBADF):
        hd.readdir(fh, 0)
    with err(errno.EBADF):
        hd.release(dh)
    with err(errno.EBADF):
        hd.releasedir(fh)
    with err(errno.ENOTDIR):
        hd.opendir(hd.lookup(ROOT, b"f")[0])
    with err(errno.EINVAL):
        hd.readdir(dh, -1)
    hd.releasedir(dh)
    hd.release(fh)


def test_readdirplus_entry(hd: HostDir) -> None:
    assert hd.readdirplus_entry(ROOT, b".") is None
    assert hd.readdirplus_entry(ROOT, b"..") is None
    assert hd.readdirplus_entry(ROOT, b"gone") is None
    got = hd.readdirplus_entry(ROOT, b"f")
    assert got is not None
    node, st = got
    assert hd.lookup(ROOT, b"f")[0] == node
    hd.forget(node, 2)
    with err(errno.ESTALE):  # the READDIRPLUS entry took exactly one lookup
        hd.getattr(node)
    with err(errno.ESTALE):
        hd.readdirplus_entry(999, b"f")


def test_close_closes_every_fd(tree: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    h = HostDir(tree)
    h.lookup(ROOT, b"f")
    h.open(h.lookup(ROOT, b"f")[0], os.O_RDONLY)
    dh = h.opendir(ROOT)
    list(h.readdir(dh, 0))
    assert len(os.listdir("/proc/self/fd")) > before
    h.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with err(errno.ESTALE):
        h.getattr(ROOT)
    with err(errno.ESTALE):
        h.save()
    h.forget_all()
    h.close()


# -- attributes -------------------------------------------------------------------------


def test_setattr_mode_owner_size(hd: HostDir, tree: Path) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    st = hd.setattr(node, None, mode=0o100640)
    assert stat.S_IMODE(st.st_mode) == 0o640 == stat.S_IMODE(os.stat(tree / "f").st_mode)
    st = hd.setattr(node, None, uid=1234, gid=5678)
    assert (st.st_uid, st.st_gid) == (1234, 5678) == (os.stat(tree / "f").st_uid, st.st_gid)
    st = hd.setattr(node, None, gid=42)  # uid unchanged
    assert (st.st_uid, st.st_gid) == (1234, 42)
    st = hd.setattr(node, None, size=2)
    assert st.st_size == 2 and (tree / "f").read_bytes() == b"he"
    st = hd.setattr(node, None, size=1 << 20)
    assert os.stat(tree / "f").st_size == 1 << 20
    with err(errno.EINVAL):
        hd.setattr(node, None, size=-1)
    with err(errno.EINVAL):
        hd.setattr(node, None, size=1 << 64)
    with err(errno.EINVAL):
        hd.setattr(node, None, uid=1 << 32)
    d, _ = hd.lookup(ROOT, b"d")
    with err(errno.EISDIR):
        hd.setattr(d, None, size=0)
    assert hd.setattr(node, None).st_size == 1 << 20  # nothing asked: the attributes


def test_setattr_truncate_through_a_handle_of_an_unlinked_file(hd: HostDir, tree: Path) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(node, os.O_RDWR)
    hd.unlink(ROOT, b"f")
    assert hd.setattr(node, fh, size=3).st_size == 3
    assert os.pread(hd.fd(fh), 10, 0) == b"hel"
    other = hd.opendir(ROOT)
    with err(errno.EBADF):  # a handle of another node
        hd.setattr(node, other, size=0)
    with err(errno.EBADF):
        hd.setattr(node, 999, size=0)
    ro = hd.open(node, os.O_RDONLY)
    with err(errno.EINVAL):  # the host's answer for ftruncate of a read-only fd
        hd.setattr(node, ro, size=0)
    for h in (fh, ro):
        hd.release(h)
    hd.releasedir(other)


def test_setattr_times_explicit_now_and_omitted(hd: HostDir, tree: Path) -> None:
    node, _ = hd.lookup(ROOT, b"f")
    st = hd.setattr(node, None, atime_ns=1_000_000_123, mtime_ns=2_000_000_456)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    st = hd.setattr(node, None, mtime_ns=5_000_000_000)  # atime left alone
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 5_000_000_000)
    before = time.time_ns()
    st = hd.setattr(node, None, atime_now=True)  # the host kernel's clock
    assert st.st_atime_ns >= before - 20_000_000 and st.st_mtime_ns == 5_000_000_000
    st = hd.setattr(node, None, mtime_ns=-1_500_000_000)  # before 1970
    assert st.st_mtime_ns == -1_500_000_000 == os.stat(tree / "f").st_mtime_ns
    fh = hd.open(node, os.O_RDONLY)
    st = hd.setattr(node, fh, atime_ns=7, mtime_now=True)
    assert st.st_atime_ns == 7 and st.st_mtime_ns >= before - 20_000_000
    hd.release(fh)
    with err(errno.EINVAL):
        hd.setattr(node, None, atime_ns=1 << 100)


def test_setattr_on_a_symlink_changes_the_link(hd: HostDir, tree: Path) -> None:
    os.symlink("f", tree / "link")
    link, _ = hd.lookup(ROOT, b"link")
    target = os.stat(tree / "f")
    st = hd.setattr(link, None, uid=77, mtime_ns=3_000_000_000)
    assert stat.S_ISLNK(st.st_mode) and st.st_uid == 77 and st.st_mtime_ns == 3_000_000_000
    after = os.stat(tree / "f")
    assert (after.st_uid, after.st_mtime_ns) == (target.st_uid, target.st_mtime_ns)
    with err(errno.EOPNOTSUPP):
        hd.setattr(link, None, mode=0o600)
    with err(errno.EINVAL):
        hd.setattr(link, None, size=0)


# -- links and special files ------------------------------------------------------------


def test_symlink_and_readlink(hd: HostDir, tree: Path) -> None:
    node, st = hd.symlink(ROOT, b"s", b"/etc/passwd")
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(tree / "s") == "/etc/passwd"
    assert hd.readlink(node) == b"/etc/passwd"
    assert hd.lookup(ROOT, b"s")[0] == node
    with err(errno.EINVAL):
        hd.readlink(hd.lookup(ROOT, b"f")[0])
    with err(errno.EEXIST):
        hd.symlink(ROOT, b"f", b"x")
    with err(errno.EINVAL):
        hd.symlink(ROOT, b"t", b"a\0b")
    with err(errno.ENOENT):
        hd.symlink(ROOT, b"t", b"")


def test_mknod_kinds(hd: HostDir, tree: Path) -> None:
    _, st = hd.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o640, 0)
    assert stat.S_ISFIFO(os.lstat(tree / "fifo").st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    _, st = hd.mknod(ROOT, b"reg", 0o600, 0)  # type 0 is a regular file
    assert stat.S_ISREG(st.st_mode)
    _, st = hd.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o600, 0)
    assert stat.S_ISSOCK(st.st_mode)
    with err(errno.EPERM):  # a host device node: never
        hd.mknod(ROOT, b"sda", stat.S_IFBLK | 0o666, os.makedev(8, 0))
    with err(errno.EPERM):
        hd.mknod(ROOT, b"mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    with err(errno.EINVAL):
        hd.mknod(ROOT, b"dir", stat.S_IFDIR | 0o755, 0)
    assert not (tree / "sda").exists() and not (tree / "mem").exists()


def test_rename_plain_noreplace_exchange(hd: HostDir, tree: Path) -> None:
    d, _ = hd.lookup(ROOT, b"d")
    f, _ = hd.lookup(ROOT, b"f")
    hd.rename(ROOT, b"f", d, b"moved")
    assert (tree / "d" / "moved").read_bytes() == b"hello\n" and not (tree / "f").exists()
    assert hd.lookup(d, b"moved")[0] == f  # same inode, same node
    with err(errno.EEXIST):
        hd.rename(d, b"moved", d, b"inner", RENAME_NOREPLACE)
    hd.rename(d, b"moved", d, b"inner", RENAME_EXCHANGE)
    assert (tree / "d" / "inner").read_bytes() == b"hello\n"
    assert (tree / "d" / "moved").read_bytes() == b"inner\n"
    hd.rename(d, b"moved", ROOT, b"back", RENAME_NOREPLACE)
    assert (tree / "back").read_bytes() == b"inner\n"
    hd.rename(ROOT, b"back", d, b"inner")  # replaces
    assert (tree / "d" / "inner").read_bytes() == b"inner\n"
    for bad in (4, 8, RENAME_NOREPLACE | RENAME_EXCHANGE):  # 4 is RENAME_WHITEOUT
        with err(errno.EINVAL):
            hd.rename(d, b"inner", ROOT, b"x", bad)
    with err(errno.EINVAL):  # a directory into itself
        hd.rename(ROOT, b"d", d, b"loop")
    with err(errno.ENOTDIR):
        hd.rename(ROOT, b"d", f, b"x")


def test_link_shares_the_node(hd: HostDir, tree: Path) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    d, _ = hd.lookup(ROOT, b"d")
    node, st = hd.link(f, d, b"again")
    assert node == f and st.st_nlink == 2
    assert os.stat(tree / "d" / "again").st_ino == os.stat(tree / "f").st_ino
    hd.forget(f, 3)  # lookup, link, and nothing more: gone
    with err(errno.ESTALE):
        hd.getattr(f)
    with err(errno.EPERM):
        hd.link(d, ROOT, b"dirlink")
    with err(errno.EEXIST):
        hd.link(hd.lookup(ROOT, b"f")[0], ROOT, b"d")


def test_access_as_this_process(hd: HostDir, tree: Path) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    os.chmod(tree / "f", 0o644)
    hd.access(f, os.R_OK | os.W_OK)
    hd.access(f, os.F_OK)
    if os.geteuid() == 0:  # root passes R and W always; X needs some x bit
        with err(errno.EACCES):
            hd.access(f, os.X_OK)
        os.chmod(tree / "f", 0o100)
        hd.access(f, os.R_OK | os.W_OK | os.X_OK)
    else:
        os.chmod(tree / "f", 0o000)
        with err(errno.EACCES):
            hd.access(f, os.R_OK)
    hd.access(ROOT, os.X_OK)
    with err(errno.EINVAL):
        hd.access(f, 8)


# -- file operations --------------------------------------------------------------------


def test_flush_drops_this_processs_posix_locks(hd: HostDir, tree: Path) -> None:
    fh = hd.open(hd.lookup(ROOT, b"f")[0], os.O_RDWR)
    fcntl.lockf(hd.fd(fh), fcntl.LOCK_EX | fcntl.LOCK_NB)
    probe = [
        sys.executable,
        "-c",
        "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
        str(tree / "f"),
    ]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # locked
    hd.flush(fh)
    assert subprocess.run(probe, capture_output=True).returncode == 0
    os.pwrite(hd.fd(fh), b"still open", 0)  # the handle itself stays usable
    hd.fsync(fh, False)
    hd.fsync(fh, True)
    hd.release(fh)
    dh = hd.opendir(ROOT)
    hd.fsyncdir(dh, True)
    with err(errno.EBADF):
        hd.fsync(dh, False)
    with err(errno.EBADF):
        hd.flush(12345)
    hd.releasedir(dh)


def test_fallocate_and_seek_data_hole(hd: HostDir, tree: Path) -> None:
    node, _, fh = hd.create(ROOT, b"sparse", 0o644, os.O_RDWR)
    hd.fallocate(fh, 0, 0, 8192)
    assert os.stat(tree / "sparse").st_size == 8192
    hd.fallocate(fh, 1, 8192, 1 << 20)  # KEEP_SIZE
    assert os.stat(tree / "sparse").st_size == 8192
    assert os.stat(tree / "sparse").st_blocks * 512 >= 8192 + (1 << 20)
    blocks = os.stat(tree / "sparse").st_blocks
    hd.fallocate(fh, 3, 0, 4096)  # PUNCH_HOLE | KEEP_SIZE
    assert os.stat(tree / "sparse").st_blocks == blocks - 4096 // 512
    hd.setattr(node, fh, size=4 << 20)
    os.pwrite(hd.fd(fh), b"x" * 4096, 0)
    os.pwrite(hd.fd(fh), b"x" * 4096, 3 << 20)
    assert hd.lseek(fh, 0, os.SEEK_DATA) == 0
    hole = hd.lseek(fh, 0, os.SEEK_HOLE)
    assert 4096 <= hole < 3 << 20  # unwritten (fallocated) ranges read as holes
    assert hd.lseek(fh, hole, os.SEEK_DATA) == 3 << 20
    assert hd.lseek(fh, 0, os.SEEK_END) == 4 << 20
    with err(errno.ENXIO):
        hd.lseek(fh, 5 << 20, os.SEEK_DATA)
    for bad in ((0, 99), (-1 << 64, os.SEEK_SET)):
        with err(errno.EINVAL):
            hd.lseek(fh, *bad)
    for offset, length in ((0, 0), (-1, 10), (1 << 63, 1), (1, (1 << 63) - 1)):
        with err(errno.EINVAL):
            hd.fallocate(fh, 0, offset, length)
    with err(errno.EOPNOTSUPP):
        hd.fallocate(fh, 0x100, 0, 1)
    hd.release(fh)


def test_copy_file_range(hd: HostDir, tree: Path) -> None:
    src = hd.open(hd.lookup(ROOT, b"f")[0], os.O_RDONLY)
    _, _, dst = hd.create(ROOT, b"copy", 0o644, os.O_WRONLY)
    assert hd.copy_file_range(src, 1, dst, 10, 1 << 40, 0) == 5  # up to the end of src
    assert (tree / "copy").read_bytes() == b"\0" * 10 + b"ello\n"
    with err(errno.EINVAL):
        hd.copy_file_range(src, 0, dst, 0, 1, 1)
    with err(errno.EINVAL):
        hd.copy_file_range(src, -1, dst, 0, 1, 0)
    with err(errno.EBADF):  # the host refuses to write through a read-only handle
        hd.copy_file_range(dst, 0, src, 0, 1, 0)
    hd.release(src)
    hd.release(dst)


def test_xattrs(hd: HostDir, tree: Path) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    hd.setxattr(f, b"user.colour", b"blue", 0)
    assert os.getxattr(tree / "f", "user.colour") == b"blue"
    assert hd.getxattr(f, b"user.colour") == b"blue"
    assert b"user.colour" in hd.listxattr(f)
    with err(errno.EEXIST):
        hd.setxattr(f, b"user.colour", b"red", XATTR_CREATE)
    with err(errno.ENODATA):
        hd.setxattr(f, b"user.size", b"1", XATTR_REPLACE)
    hd.removexattr(f, b"user.colour")
    with err(errno.ENODATA):
        hd.getxattr(f, b"user.colour")
    for ns in (b"trusted.x", b"security.capability", b"system.posix_acl_access"):
        with err(errno.EPERM):
            hd.setxattr(f, ns, b"\x01", 0)
        with err(errno.EPERM):
            hd.removexattr(f, ns)
    with err(errno.EINVAL):
        hd.setxattr(f, b"user.x", b"", 4)
    with err(errno.EINVAL):
        hd.getxattr(f, b"user.\0x")
    with err(errno.ERANGE):
        hd.getxattr(f, b"")
    with err(errno.ERANGE):
        hd.getxattr(f, b"user." + b"x" * 300)


def test_forget_all_drops_every_node_and_handle_but_root(hd: HostDir) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(f, os.O_RDONLY)
    dh = hd.opendir(ROOT)
    hd.forget_all()
    with err(errno.ESTALE):
        hd.getattr(f)
    with err(errno.EBADF):
        hd.fd(fh)
    with err(errno.EBADF):
        hd.releasedir(dh)
    assert hd.getattr(ROOT).st_ino
    assert hd.lookup(ROOT, b"f")[0] not in (f, ROOT)


# -- save / load ------------------------------------------------------------------------


def roundtrip(state: dict) -> dict:
    """As a snapshot carries it: through JSON text."""
    return json.loads(json.dumps(state))


def test_save_load_round_trip_with_open_files(tree: Path) -> None:
    os.symlink("f", tree / "link")
    os.link(tree / "f", tree / "d" / "hard")
    for i in range(30):
        (tree / "d" / f"e{i:02}").write_bytes(b"")
    old = HostDir(tree)
    d, _ = old.lookup(ROOT, b"d")
    f, _ = old.lookup(ROOT, b"f")
    assert old.lookup(d, b"hard")[0] == f
    inner, _ = old.lookup(d, b"inner")
    link, _ = old.lookup(ROOT, b"link")
    reader = old.open(f, os.O_RDONLY)
    appender = old.open(inner, os.O_WRONLY | os.O_APPEND)
    lister = old.opendir(d)
    listing = list(old.readdir(lister, 0))
    head = listing[:10]
    state = roundtrip(old.save())
    old.close()

    new = HostDir(tree)
    new.load(state)
    assert new.getattr(f).st_ino == os.stat(tree / "f").st_ino
    assert new.lookup(d, b"hard")[0] == f  # identity survives
    assert new.readlink(link) == b"f"
    assert os.pread(new.fd(reader), 3, 2) == b"llo"
    os.write(new.fd(appender), b"appended\n")
    assert (tree / "d" / "inner").read_bytes() == b"inner\nappended\n"
    with err(errno.EBADF):  # still read-only
        os.write(new.fd(reader), b"x")
    assert list(new.readdir(lister, head[-1][1])) == listing[10:]  # the listing goes on
    again = new.save()
    assert again["handles"] == state["handles"]
    assert [e for e in again["nodes"] if e["id"] != f] == [
        e for e in state["nodes"] if e["id"] != f
    ]
    # lookup counts came along: f had 2 (its lookup, the lookup of "hard") + 1 just now
    new.forget(f, 3)
    new.getattr(f)  # ``reader`` still holds it
    new.release(reader)
    with err(errno.ESTALE):
        new.getattr(f)
    assert new.lookup(ROOT, b"f")[0] > max(e["id"] for e in state["nodes"])
    assert new.open(inner, os.O_RDONLY) > max(h["fh"] for h in state["handles"])
    new.close()


def test_save_load_of_names_that_are_not_utf8(tree: Path) -> None:
    name = b"caf\xe9 \xff"
    fd = os.open(os.fsencode(tree / "d") + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    old = HostDir(tree)
    node, _ = old.lookup(old.lookup(ROOT, b"d")[0], name)
    state = roundtrip(old.save())
    old.close()
    new = HostDir(tree)
    new.load(state)
    assert new.getattr(node).st_ino == os.stat(os.fsencode(tree / "d") + b"/" + name).st_ino
    new.close()


def test_load_checks_the_file_handle_beyond_the_inode_number(tree: Path) -> None:
    """(st_dev, st_ino) alone cannot tell a deleted file from a new one that got its
    inode number; the saved name_to_handle_at handle (with the generation) can."""
    old = HostDir(tree)
    f, _ = old.lookup(ROOT, b"f")
    state = roundtrip(old.save())
    old.close()
    entry = next(e for e in state["nodes"] if e["id"] == f)
    assert entry["file_handle"]  # ext4 and tmpfs have one
    good = entry["file_handle"]
    forged = {**entry, "file_handle": good[:-1] + ("1" if good[-1] == "0" else "0")}
    other = {**state, "nodes": [forged if e is entry else e for e in state["nodes"]]}
    new = HostDir(tree)
    with pytest.raises(HostDirStateError, match="another inode"):
        new.load(other)
    new.load({**state, "nodes": [{**e, "file_handle": None} for e in state["nodes"]]})
    assert new.getattr(f).st_ino == entry["ino"]  # no handle saved: dev and ino decide
    new.close()


def test_load_refuses_a_changed_tree(tree: Path) -> None:
    old = HostDir(tree)
    f, _ = old.lookup(ROOT, b"f")
    fh = old.open(f, os.O_RDONLY)
    state = roundtrip(old.save())
    old.close()
    (tree / "f").unlink()
    (tree / "f").write_bytes(b"another file, same name\n")  # a new inode
    new = HostDir(tree)
    with pytest.raises(HostDirStateError, match=r"node \d+ \('f'\) is another inode"):
        new.load(state)
    new.load(state, strict=False)  # the instance stayed fresh: it loads, stale
    with err(errno.ESTALE):
        new.getattr(f)
    with err(errno.ESTALE):  # never the new file's data
        new.fd(fh)
    new.release(fh)
    new.forget(f, 1)
    assert new.lookup(ROOT, b"f")[0] != f
    new.close()


@pytest.mark.parametrize("change", ["removed", "moved", "dir_became_symlink"])
def test_load_refuses_a_node_whose_path_is_gone(tree: Path, tmp_path: Path, change: str) -> None:
    old = HostDir(tree)
    d, _ = old.lookup(ROOT, b"d")
    old.lookup(d, b"inner")
    old.forget(d, 1)  # the state holds d/inner alone
    state = roundtrip(old.save())
    old.close()
    if change == "removed":
        (tree / "d" / "inner").unlink()
    elif change == "moved":
        (tree / "d" / "inner").rename(tree / "elsewhere")
    else:  # the same inode, reachable only by following a symlink: not reopened
        (tree / "d").rename(tmp_path / "outside")
        os.symlink(tmp_path / "outside", tree / "d")
    new = HostDir(tree)
    with pytest.raises(HostDirStateError, match=r"'d/inner'\) cannot be reopened"):
        new.load(state)
    new.close()


def test_save_of_an_open_unlinked_file_cannot_be_loaded(tree: Path) -> None:
    old = HostDir(tree)
    f, _ = old.lookup(ROOT, b"f")
    fh = old.open(f, os.O_RDONLY)
    old.unlink(ROOT, b"f")
    state = roundtrip(old.save())
    old.close()
    assert [e["path"] for e in state["nodes"] if e["id"] == f] == [None]
    new = HostDir(tree)
    with pytest.raises(HostDirStateError, match="no path in the shared directory"):
        new.load(state)
    new.load(state, strict=False)
    with err(errno.ESTALE):
        new.fd(fh)
    new.close()


def test_save_keeps_a_path_that_only_looks_deleted(tree: Path) -> None:
    (tree / "x (deleted)").write_bytes(b"")
    old = HostDir(tree)
    x, _ = old.lookup(ROOT, b"x (deleted)")
    state = roundtrip(old.save())
    old.close()
    assert [e["path"] for e in state["nodes"] if e["id"] == x] == ["x (deleted)"]


def test_load_needs_the_same_directory_and_a_fresh_instance(tree: Path, tmp_path: Path) -> None:
    old = HostDir(tree)
    old.lookup(ROOT, b"f")
    state = roundtrip(old.save())
    with pytest.raises(HostDirStateError, match="fresh"):
        old.load(state)
    old.close()
    other = tmp_path / "other"
    other.mkdir()
    new = HostDir(other)
    with pytest.raises(HostDirStateError, match="not the one saved"):
        new.load(state)
    new.close()


def test_load_refuses_a_write_handle_into_a_read_only_instance(tree: Path) -> None:
    old = HostDir(tree)
    fh = old.open(old.lookup(ROOT, b"f")[0], os.O_RDWR)
    state = roundtrip(old.save())
    old.close()
    new = HostDir(tree, readonly=True)
    with pytest.raises(HostDirStateError, match=f"handle {fh}.*Read-only"):
        new.load(state)
    new.close()


def hostile_states(state: dict) -> list[tuple[str, dict]]:
    """(what is wrong, the state) pairs built from a good one."""
    node = state["nodes"][1]

    def with_node(**kw: object) -> dict:
        return {**state, "nodes": [state["nodes"][0], {**node, **kw}]}

    return [
        ("version", {**state, "version": 2}),
        ("not a dict", [state]),  # type: ignore[list-item]
        ("no lists", {**state, "nodes": {}}),
        ("dotdot", with_node(path="../outside")),
        ("dotdot inside", with_node(path="d/../../outside")),
        ("absolute", with_node(path="/etc/passwd")),
        ("empty component", with_node(path="d//inner")),
        ("dot", with_node(path="./f")),
        ("empty for a non-root", with_node(path="")),
        ("not a string", with_node(path=7)),
        ("bad surrogate", with_node(path="\ud800")),
        ("NUL", with_node(path="f\0")),
        ("bool id", with_node(id=True)),
        ("id zero", with_node(id=0)),
        ("huge id", with_node(id=1 << 64)),
        ("negative count", with_node(nlookup=-1)),
        ("duplicate id", {**state, "nodes": state["nodes"] + [node]}),
        ("no root", {**state, "nodes": [node]}),
        ("handle on unknown node", {**state, "handles": [{**state["handles"][0], "node": 999}]}),
        ("handle flags", {**state, "handles": [{**state["handles"][0], "flags": os.O_CREAT}]}),
        ("handle dir", {**state, "handles": [{**state["handles"][0], "dir": 1}]}),
        ("file handle on a dir", {**state, "handles": [{**state["handles"][0], "node": ROOT}]}),
        ("too many", {**state, "nodes": state["nodes"] + [{**node, "id": 9}] * 70000}),
    ]


def test_load_refuses_malformed_or_hostile_states(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_bytes(b"secret")
    old = HostDir(tree)
    old.open(old.lookup(ROOT, b"f")[0], os.O_RDONLY)
    state = roundtrip(old.save())
    old.close()
    for what, bad in hostile_states(state):
        new = HostDir(tree)
        with pytest.raises(HostDirStateError):
            new.load(bad)
        assert new.save()["nodes"] == [state["nodes"][0]], what  # nothing applied
        new.close()


# -- the sandbox ------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the shared one, with a file the guest must never reach."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"outside secret\n")
    (out / "inner").write_bytes(b"outside inner\n")
    return out


def test_dotdot_chains_stay_in_the_tree(hd: HostDir, tree: Path) -> None:
    (tree / "d" / "a" / "b").mkdir(parents=True)
    node = ROOT
    for _ in range(20):
        node, st = hd.lookup(node, b"..")
        assert node == ROOT and st.st_ino == os.stat(tree).st_ino
    d, _ = hd.lookup(ROOT, b"d")
    a, _ = hd.lookup(d, b"a")
    b, _ = hd.lookup(a, b"b")
    chain = [b]
    for _ in range(6):
        chain.append(hd.lookup(chain[-1], b"..")[0])
    assert chain == [b, a, d, ROOT, ROOT, ROOT, ROOT]
    assert hd.lookup(b, b".")[0] == b


def test_dotdot_of_a_directory_moved_out_on_the_host(
    hd: HostDir, tree: Path, outside: Path
) -> None:
    """A held node follows its inode out of the tree (documented); ``..`` from it does not
    lead any further."""
    d, _ = hd.lookup(ROOT, b"d")
    (tree / "d").rename(outside / "d")
    with err(errno.EACCES):
        hd.lookup(d, b"..")
    fh = hd.opendir(d)
    got = {name: ino for ino, _, _, name in hd.readdir(fh, 0)}
    assert set(got) == {b".", b"..", b"inner"}
    hd.releasedir(fh)


BAD_NAMES = [
    (b"", errno.EINVAL),
    (b"a/b", errno.EINVAL),
    (b"../../etc/passwd", errno.EINVAL),
    (b"/etc", errno.EINVAL),
    (b"x\0y", errno.EINVAL),
    (b"\0", errno.EINVAL),
    (b"n" * 256, errno.ENAMETOOLONG),
]


def name_calls(hd: HostDir, d: int, f: int) -> dict[str, object]:
    """Every call that takes an entry name, with the name as its one free argument."""
    return {
        "lookup": lambda n: hd.lookup(d, n),
        "mkdir": lambda n: hd.mkdir(d, n, 0o755),
        "create": lambda n: hd.create(d, n, 0o644, os.O_RDWR),
        "mknod": lambda n: hd.mknod(d, n, stat.S_IFIFO | 0o644, 0),
        "symlink": lambda n: hd.symlink(d, n, b"target"),
        "unlink": lambda n: hd.unlink(d, n),
        "rmdir": lambda n: hd.rmdir(d, n),
        "rename from": lambda n: hd.rename(d, n, ROOT, b"x"),
        "rename to": lambda n: hd.rename(ROOT, b"f", d, n),
        "link": lambda n: hd.link(f, d, n),
    }


@pytest.mark.parametrize(("name", "code"), BAD_NAMES)
def test_bad_names_are_refused_by_every_call(
    hd: HostDir, tree: Path, name: bytes, code: int
) -> None:
    before = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    d, _ = hd.lookup(ROOT, b"d")
    f, _ = hd.lookup(ROOT, b"f")
    for what, call in name_calls(hd, d, f).items():
        with err(code):
            call(name)  # type: ignore[operator]
        assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == before, what


def test_dot_names_only_look_up(hd: HostDir, tree: Path) -> None:
    d, _ = hd.lookup(ROOT, b"d")
    f, _ = hd.lookup(ROOT, b"f")
    for what, call in name_calls(hd, d, f).items():
        if what == "lookup":
            continue
        for dots in (b".", b".."):
            with err(errno.EINVAL):
                call(dots)  # type: ignore[operator]
    assert (tree / "d" / "inner").exists() and (tree / "f").exists()
    assert sorted(os.listdir(tree)) == ["d", "f"]


def test_the_longest_name_is_fine(hd: HostDir, tree: Path) -> None:
    name = b"n" * 255
    node, _, fh = hd.create(ROOT, name, 0o644, os.O_RDWR)
    assert hd.lookup(ROOT, name)[0] == node and (tree / name.decode()).exists()
    hd.release(fh)


def test_a_symlink_pointing_outside_is_only_ever_the_link(
    hd: HostDir, tree: Path, outside: Path
) -> None:
    os.symlink(outside / "secret", tree / "tofile")
    os.symlink(outside, tree / "todir")
    secret = os.stat(outside / "secret")
    link, st = hd.lookup(ROOT, b"tofile")
    assert stat.S_ISLNK(st.st_mode) and st.st_ino == os.lstat(tree / "tofile").st_ino
    assert stat.S_ISLNK(hd.getattr(link).st_mode)
    assert hd.readlink(link) == os.fsencode(outside / "secret")
    with err(errno.ELOOP):
        hd.open(link, os.O_RDONLY)
    with err(errno.ELOOP):  # create without O_EXCL opens what is there: not through it
        hd.create(ROOT, b"tofile", 0o644, os.O_RDWR)
    with err(errno.ELOOP):
        hd.create(ROOT, b"tofile", 0o644, os.O_RDWR | os.O_TRUNC)
    dlink, _ = hd.lookup(ROOT, b"todir")
    for call in (
        lambda: hd.lookup(dlink, b"secret"),
        lambda: hd.opendir(dlink),
        lambda: hd.create(dlink, b"planted", 0o644, os.O_RDWR),
        lambda: hd.mkdir(dlink, b"planted", 0o755),
        lambda: hd.unlink(dlink, b"secret"),
        lambda: hd.rename(ROOT, b"f", dlink, b"planted"),
        lambda: hd.rename(dlink, b"secret", ROOT, b"stolen"),
        lambda: hd.link(hd.lookup(ROOT, b"f")[0], dlink, b"planted"),
        lambda: hd.symlink(dlink, b"planted", b"x"),
    ):
        with err(errno.ENOTDIR):
            call()
    hd.setattr(link, None, uid=4321, atime_ns=0, mtime_ns=0)  # acts on the link
    after = os.stat(outside / "secret")
    assert (after.st_uid, after.st_mtime_ns, after.st_size) == (
        secret.st_uid,
        secret.st_mtime_ns,
        secret.st_size,
    )
    assert sorted(os.listdir(outside)) == ["inner", "secret"]
    assert (outside / "secret").read_bytes() == b"outside secret\n"
    assert not (tree / "stolen").exists() and not (tree / "planted").exists()


def test_a_hard_link_cannot_reach_an_outside_inode(hd: HostDir, tree: Path, outside: Path) -> None:
    """Every node comes from a lookup inside the tree; the only way to name an outside
    file is a symlink, and linking that node links the symlink itself."""
    os.symlink(outside / "secret", tree / "tofile")
    link, _ = hd.lookup(ROOT, b"tofile")
    node, st = hd.link(link, ROOT, b"hard")
    assert node == link and stat.S_ISLNK(st.st_mode) and st.st_nlink == 2
    assert os.stat(outside / "secret").st_nlink == 1  # the outside file got no new name
    assert os.readlink(tree / "hard") == str(outside / "secret")
    for unknown in (0, -1, 999, 1 << 64):
        with err(errno.ESTALE):
            hd.link(unknown, ROOT, b"other")
    assert ROOT == hd.lookup(ROOT, b"..")[0]  # and no lookup climbs to an outside inode


def test_rename_out_of_the_tree_is_impossible(hd: HostDir, tree: Path, outside: Path) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    os.symlink(outside, tree / "todir")
    dlink, _ = hd.lookup(ROOT, b"todir")
    with err(errno.ESTALE):  # the new parent must be a node: all nodes are inside
        hd.rename(ROOT, b"f", 999, b"x")
    with err(errno.ENOTDIR):  # a file node, a symlink node: not directories
        hd.rename(ROOT, b"f", f, b"x")
    with err(errno.ENOTDIR):
        hd.rename(ROOT, b"f", dlink, b"x")
    for newname in (b"../outside/x", b"../../x", b".."):
        with err(errno.EINVAL):
            hd.rename(ROOT, b"f", ROOT, newname)
    with err(errno.EINVAL):  # nor can ROOT itself be named to move it
        hd.rename(ROOT, b".", ROOT, b"x")
    assert sorted(os.listdir(outside)) == ["inner", "secret"]
    assert (tree / "f").read_bytes() == b"hello\n"


def test_a_symlink_swapped_in_for_a_directory_between_lookups(
    hd: HostDir, tree: Path, outside: Path
) -> None:
    d, st = hd.lookup(ROOT, b"d")
    assert stat.S_ISDIR(st.st_mode)
    (tree / "d").rename(tree / "was_d")
    os.symlink(outside, tree / "d")
    again, st = hd.lookup(ROOT, b"d")
    assert again != d and stat.S_ISLNK(st.st_mode)
    with err(errno.ENOTDIR):
        hd.lookup(again, b"inner")
    inner, _ = hd.lookup(d, b"inner")  # the held node is still the directory it was
    fh = hd.open(inner, os.O_RDONLY)
    assert os.pread(hd.fd(fh), 100, 0) == b"inner\n"
    hd.release(fh)


def test_a_symlink_swapped_in_for_a_file_after_its_lookup(
    hd: HostDir, tree: Path, outside: Path
) -> None:
    f, _ = hd.lookup(ROOT, b"f")
    (tree / "f").unlink()
    os.symlink(outside / "secret", tree / "f")
    fh = hd.open(f, os.O_RDWR)  # the node's own inode, by /proc/self/fd: not the name
    assert os.pread(hd.fd(fh), 100, 0) == b"hello\n"
    hd.setattr(f, None, size=0)
    assert (outside / "secret").read_bytes() == b"outside secret\n"
    hd.release(fh)


def test_racing_a_directory_against_a_symlink_never_reaches_outside(
    hd: HostDir, tree: Path, outside: Path
) -> None:
    """A host thread swaps "d" between a directory and a symlink to outside as fast as it
    can while the guest side looks up d/inner and reads it: every read that succeeds
    reads the inside file; the others fail with ENOTDIR (the link) or ENOENT."""
    os.symlink(outside, tree / "swap")
    host = HostDir(tree)  # the host user, on its own instance
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            host.rename(ROOT, b"d", ROOT, b"swap", RENAME_EXCHANGE)
            swaps += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    seen = {"inside": 0, "ENOTDIR": 0, "ENOENT": 0}
    try:
        for _ in range(3000):
            try:
                d, _ = hd.lookup(ROOT, b"d")
                inner, _ = hd.lookup(d, b"inner")
                fh = hd.open(inner, os.O_RDONLY)
            except OSError as e:
                seen[errno.errorcode[e.errno]] += 1
                continue
            assert os.pread(hd.fd(fh), 100, 0) == b"inner\n"
            hd.release(fh)
            seen["inside"] += 1
    finally:
        stop.set()
        thread.join()
        host.close()
    assert swaps > 100 and seen["inside"] > 0 and seen["ENOTDIR"] > 0, (swaps, seen)


def node_calls(hd: HostDir) -> dict[str, object]:
    """Every call that takes a node id, with the node as its one free argument."""
    return {
        "lookup": lambda n: hd.lookup(n, b"f"),
        "lookup ..": lambda n: hd.lookup(n, b".."),
        "readdirplus_entry": lambda n: hd.readdirplus_entry(n, b"f"),
        "getattr": lambda n: hd.getattr(n),
        "setattr": lambda n: hd.setattr(n, None, mode=0o644),
        "readlink": lambda n: hd.readlink(n),
        "symlink": lambda n: hd.symlink(n, b"s", b"t"),
        "mknod": lambda n: hd.mknod(n, b"m", stat.S_IFIFO | 0o644, 0),
        "mkdir": lambda n: hd.mkdir(n, b"m", 0o755),
        "unlink": lambda n: hd.unlink(n, b"f"),
        "rmdir": lambda n: hd.rmdir(n, b"d"),
        "rename from": lambda n: hd.rename(n, b"f", ROOT, b"g"),
        "rename to": lambda n: hd.rename(ROOT, b"f", n, b"g"),
        "link": lambda n: hd.link(n, ROOT, b"g"),
        "link to": lambda n: hd.link(hd.lookup(ROOT, b"f")[0], n, b"g"),
        "access": lambda n: hd.access(n, os.R_OK),
        "statfs": lambda n: hd.statfs(n),
        "open": lambda n: hd.open(n, os.O_RDONLY),
        "create": lambda n: hd.create(n, b"c", 0o644, os.O_RDWR),
        "opendir": lambda n: hd.opendir(n),
        "getxattr": lambda n: hd.getxattr(n, b"user.x"),
        "setxattr": lambda n: hd.setxattr(n, b"user.x", b"1", 0),
        "listxattr": lambda n: hd.listxattr(n),
        "removexattr": lambda n: hd.removexattr(n, b"user.x"),
    }


def handle_calls(hd: HostDir) -> dict[str, object]:
    """Every call that takes a handle, with the handle as its one free argument."""
    return {
        "fd": lambda h: hd.fd(h),
        "release": lambda h: hd.release(h),
        "flush": lambda h: hd.flush(h),
        "fsync": lambda h: hd.fsync(h, False),
        "fallocate": lambda h: hd.fallocate(h, 0, 0, 1),
        "lseek": lambda h: hd.lseek(h, 0, os.SEEK_DATA),
        "copy_file_range in": lambda h: hd.copy_file_range(h, 0, h, 0, 1, 0),
        "readdir": lambda h: hd.readdir(h, 0),
        "releasedir": lambda h: hd.releasedir(h),
        "fsyncdir": lambda h: hd.fsyncdir(h, False),
        "setattr": lambda h: hd.setattr(ROOT, h, size=0),
    }


def test_unknown_nodes_are_estale_and_unknown_handles_ebadf(hd: HostDir, tree: Path) -> None:
    before = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    f, _ = hd.lookup(ROOT, b"f")
    hd.forget(f, 1)  # a forgotten node is unknown too
    for node in (0, -1, 2**64 - 1, 2**70, 12345, f):
        for what, call in node_calls(hd).items():
            with err(errno.ESTALE):
                call(node)  # type: ignore[operator]
            assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == before, what
    fh = hd.open(hd.lookup(ROOT, b"f")[0], os.O_RDONLY)
    hd.release(fh)  # a released handle is unknown too
    for h in (0, -1, 2**64, 777, fh):
        for call in handle_calls(hd).values():
            with err(errno.EBADF):
                call(h)  # type: ignore[operator]


def fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_node_limit_is_enfile(tree: Path) -> None:
    for i in range(5):
        (tree / f"x{i}").write_bytes(b"")
    before = fds_open()
    hd = HostDir(tree, max_nodes=3)  # ROOT and two more
    a, _ = hd.lookup(ROOT, b"x0")
    hd.lookup(ROOT, b"x1")
    assert hd.lookup(ROOT, b"x0")[0] == a  # a known inode needs no room
    for call in (
        lambda: hd.lookup(ROOT, b"x2"),
        lambda: hd.readdirplus_entry(ROOT, b"x2"),
        lambda: hd.mkdir(ROOT, b"new", 0o755),
        lambda: hd.create(ROOT, b"new", 0o644, os.O_RDWR),
        lambda: hd.symlink(ROOT, b"new", b"t"),
        lambda: hd.mknod(ROOT, b"new", stat.S_IFIFO | 0o644, 0),
    ):
        with err(errno.ENFILE):
            call()
    assert not os.path.lexists(tree / "new")  # refused before anything was made
    hd.forget(a, 2)
    hd.lookup(ROOT, b"x2")  # room again
    assert fds_open() == before + 3
    hd.close()
    assert fds_open() == before


def test_no_fd_is_kept_at_the_ceiling(tree: Path) -> None:
    """Lookups, opens and listings are checked after their open (no probe), calls that
    make an entry before it: either way ENFILE at the ceiling, nothing made, no fd left."""
    hd = HostDir(tree)
    f, _ = hd.lookup(ROOT, b"f")
    probe = os.dup(0)  # the lowest free fd: the next open's number
    os.close(probe)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(x) for x in os.listdir("/proc/self/fd"))
    assert probe + FD_RESERVE > highest and (probe + FD_RESERVE) // 8 <= FD_RESERVE
    before = fds_open()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + FD_RESERVE, hard))  # at probe
        for call in (
            lambda: hd.lookup(ROOT, b"d"),
            lambda: hd.readdirplus_entry(ROOT, b"d"),
            lambda: hd.open(f, os.O_RDONLY),
            lambda: hd.open(f, os.O_RDWR | os.O_TRUNC),
            lambda: hd.opendir(ROOT),
            lambda: hd.create(ROOT, b"new", 0o644, os.O_RDWR),
            lambda: hd.mkdir(ROOT, b"new", 0o755),
        ):
            with err(errno.ENFILE):
                call()
        assert fds_open() == before
        assert not os.path.lexists(tree / "new") and (tree / "f").read_bytes() == b"hello\n"
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1 + FD_RESERVE, hard))
        with err(errno.ENFILE):
            hd.opendir(ROOT)  # two fds: its own and scandir's while listed
        hd.release(hd.open(f, os.O_RDONLY))
        d, _ = hd.lookup(ROOT, b"d")
        assert fds_open() == before + 1
        hd.forget(d, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    hd.releasedir(hd.opendir(ROOT))
    hd.close()


def test_the_handle_limit_is_enfile(hd: HostDir, tree: Path) -> None:
    hd.close()
    before = fds_open()
    hd = HostDir(tree, max_handles=2)
    f, _ = hd.lookup(ROOT, b"f")
    fh = hd.open(f, os.O_RDONLY)
    hd.opendir(ROOT)
    for call in (
        lambda: hd.open(f, os.O_RDONLY),
        lambda: hd.opendir(ROOT),
        lambda: hd.create(ROOT, b"new", 0o644, os.O_RDWR),
    ):
        with err(errno.ENFILE):
            call()
    assert not (tree / "new").exists()
    hd.release(fh)
    hd.release(hd.open(f, os.O_RDONLY))
    hd.close()
    assert fds_open() == before


def test_readonly_refuses_every_write(tree: Path) -> None:
    (tree / "d" / "empty").mkdir()
    os.setxattr(tree / "f", "user.x", b"1")
    before = {p: (p.lstat().st_mode, p.lstat().st_mtime_ns) for p in tree.rglob("*")}
    content = (tree / "f").read_bytes()
    hd = HostDir(tree, readonly=True)
    f, _ = hd.lookup(ROOT, b"f")
    d, _ = hd.lookup(ROOT, b"d")
    rd = hd.open(f, os.O_RDONLY)
    writes = {
        "chmod": lambda: hd.setattr(f, None, mode=0o600),
        "chown": lambda: hd.setattr(f, None, uid=1),
        "truncate": lambda: hd.setattr(f, None, size=0),
        "ftruncate": lambda: hd.setattr(f, rd, size=0),
        "utimens": lambda: hd.setattr(f, None, mtime_ns=0),
        "utimens now": lambda: hd.setattr(f, None, atime_now=True),
        "symlink": lambda: hd.symlink(ROOT, b"s", b"t"),
        "mknod": lambda: hd.mknod(ROOT, b"m", stat.S_IFIFO | 0o644, 0),
        "mkdir": lambda: hd.mkdir(ROOT, b"m", 0o755),
        "unlink": lambda: hd.unlink(ROOT, b"f"),
        "rmdir": lambda: hd.rmdir(d, b"empty"),
        "rename": lambda: hd.rename(ROOT, b"f", ROOT, b"g"),
        "rename2": lambda: hd.rename(ROOT, b"f", d, b"inner", RENAME_EXCHANGE),
        "link": lambda: hd.link(f, ROOT, b"g"),
        "create": lambda: hd.create(ROOT, b"c", 0o644, os.O_RDONLY),
        "create existing": lambda: hd.create(ROOT, b"f", 0o644, os.O_RDONLY),
        "open wronly": lambda: hd.open(f, os.O_WRONLY),
        "open rdwr": lambda: hd.open(f, os.O_RDWR),
        "open trunc": lambda: hd.open(f, os.O_RDONLY | os.O_TRUNC),
        "fallocate": lambda: hd.fallocate(rd, 0, 0, 4096),
        "copy_file_range": lambda: hd.copy_file_range(rd, 0, rd, 100, 1, 0),
        "setxattr": lambda: hd.setxattr(f, b"user.y", b"1", 0),
        "removexattr": lambda: hd.removexattr(f, b"user.x"),
        "access W_OK": lambda: hd.access(f, os.W_OK),
    }
    for what, call in writes.items():
        try:
            call()
        except OSError as e:
            assert e.errno == errno.EROFS, what
        else:
            raise AssertionError(f"{what} went through")
    # reading goes on
    assert os.pread(hd.fd(rd), 5, 0) == b"hello"
    assert hd.getxattr(f, b"user.x") == b"1"
    hd.access(f, os.R_OK)
    dh = hd.opendir(ROOT)
    assert {b"f", b"d"} <= set(names(hd, dh))
    assert hd.setattr(f, None).st_size == len(content)  # asking nothing is a getattr
    hd.close()
    assert {p: (p.lstat().st_mode, p.lstat().st_mtime_ns) for p in tree.rglob("*")} == before
    assert (tree / "f").read_bytes() == content


def test_hard_links_are_one_node(hd: HostDir, tree: Path) -> None:
    os.link(tree / "f", tree / "d" / "same")
    f, _ = hd.lookup(ROOT, b"f")
    d, _ = hd.lookup(ROOT, b"d")
    assert hd.lookup(d, b"same")[0] == f
    fh = hd.opendir(d)
    plus = {name: hd.readdirplus_entry(d, name) for _, _, _, name in hd.readdir(fh, 0)}
    hd.releasedir(fh)
    assert plus[b"same"] is not None and plus[b"same"][0] == f
    hd.unlink(ROOT, b"f")
    assert hd.lookup(d, b"same")[0] == f  # the other name still leads to it
    hd.forget(f, 3)
    hd.getattr(f)
    hd.forget(f, 1)  # lookup, lookup, readdirplus, lookup: four in all
    with err(errno.ESTALE):
        hd.getattr(f)
