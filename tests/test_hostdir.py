"""HostDir: the shared directory in FUSE terms, and the sandbox around it."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from emu.backends.hostdir import ROOT, HostDir


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
