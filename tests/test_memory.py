import os

import numpy as np
import pytest

from emu.memory import PAGE_SIZE, GuestMemory, GuestMemoryError


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0x0, 0x10000)
    m.add_region(0x100000, 0x4000, "anon")
    yield m
    m.close()


def test_read_write_round_trip_and_numpy_view(mem):
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"
    assert bytes(mem.array(0x1234, 5)) == b"hello"
    mem.write_int(0x100010, 4, 0xDEADBEEF)
    assert mem.read_int(0x100010, 4) == 0xDEADBEEF
    assert mem.regions[1].array[0x10:0x14].tobytes() == (0xDEADBEEF).to_bytes(4, "little")


@pytest.mark.parametrize(
    "gpa,length",
    [
        (0x10000, 1),  # one past the end of region 0
        (0xFFFF, 2),  # straddles the end
        (0x20000, 4),  # in the hole
        (0x103FFF, 2),  # straddles the end of region 1
        (0xFFFFFFFFFFFFFFF0, 0x20),  # wraps past 2^64
        (-1, 1),
        (0x0, -1),
    ],
)
def test_translate_refuses_outside_ram(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)


def test_regions_cannot_overlap(mem):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(0xF000, 0x2000)


def test_view_is_zero_copy_and_marks_dirty(mem, tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = mem.view(0x3000, 8192, write=True)
        assert os.preadv(fd, [view], 0) == 8192
    finally:
        os.close(fd)
    assert mem.read(0x3000, 8192) == b"x" * 8192
    assert mem.get_and_clear_dirty() == [3, 4]
    assert mem.get_and_clear_dirty() == []


def test_dirty_tracking_is_page_granular_across_regions(mem):
    mem.write(PAGE_SIZE - 1, b"ab")  # touches pages 0 and 1
    mem.write_int(0x100000 + 2 * PAGE_SIZE, 8, 1)
    mem.read(0x5000, 100)  # reads never dirty
    assert mem.get_and_clear_dirty() == [0, 1, (0x100000 >> 12) + 2]
    mem.write(0x0, b"z")
    bitmaps = mem.dirty_bitmap()
    assert bitmaps[0][0] == 1 and not bitmaps[0][1:].any()
    assert not bitmaps[0x100000].any()
    assert not np.any(mem.regions[0].dirty)


def test_memfd_region_is_shareable_by_fd(mem):
    region = mem.regions[0]
    assert region.fd >= 0
    other = GuestMemory()
    other.add_fd_region(0x0, 0x10000, os.dup(region.fd))
    mem.write(0x42, b"shared")
    assert other.read(0x42, 6) == b"shared"
    other.close()


def test_fd_region_beyond_end_of_file_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="beyond the end"):
        GuestMemory().add_fd_region(0x0, 0x20000, os.dup(mem.regions[0].fd))


def test_file_backed_region(tmp_path):
    m = GuestMemory.create(0x2000, gpa=0x4000, backing=tmp_path / "ram")
    m.write(0x4001, b"persist")
    m.close()
    assert (tmp_path / "ram").read_bytes()[1:8] == b"persist"


def test_remove_region(mem):
    mem.remove_region(0x100000, 0x4000)
    with pytest.raises(GuestMemoryError):
        mem.read(0x100000, 1)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(0x100000, 0x4000)


def test_discard_gives_back_whole_pages_inside_guest_ram_only():
    m = GuestMemory()
    try:
        for gpa in (0, 0x10000, 0x40000):  # two regions back to back, a hole, a third
            m.add_region(gpa, 0x10000).mm[:] = b"\x11" * 0x10000
        blocks = lambda: [os.fstat(r.fd).st_blocks for r in m.regions]  # noqa: E731
        before = blocks()
        # from the last page of region 0 (less 1 byte) through region 1, into the hole
        assert m.discard(0xF001, 0x31000) == 0x10000
        assert [b - a for b, a in zip(before, blocks(), strict=True)] == [0, 0x80, 0]
        assert m.read(0xF000, 0x1000) == b"\x11" * 0x1000  # a page only partly inside
        assert m.discard(0x20000, 0x10000) == 0  # the hole
        assert m.discard(0x40000, 0x1000) == 0x1000 and m.read(0x40000, 4) == bytes(4)
        assert m.allocated() == 512 * sum(blocks())
        with pytest.raises(ValueError):
            m.discard(-1, 10)
    finally:
        m.close()
    assert GuestMemory().allocated() is None
    anon = GuestMemory.create(0x10000, backing="anon")
    assert anon.allocated() is None
    assert anon.discard(0, 0x10000) == 0x10000  # shared anonymous memory releases too
    anon.close()
