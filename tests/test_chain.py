"""ChainReader / ChainWriter: bytes in and out of a chain across segment boundaries, never
past what the chain holds, and nothing moved by a request that does not fit."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from emu.devices._chain import (
    Chain,
    ChainError,
    ChainReader,
    ChainWriter,
    _chains,
    chains,
    gather,
    scatter,
)
from emu.memory import GuestMemory, GuestMemoryError
from emu.ringdefs import Batch


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def chain(mem: GuestMemory) -> Chain:
    """Readable "hello" + "" + " world!" (three segments, one empty); writable 3 + 0 + 5."""
    mem.write(0x1000, b"hello")
    mem.write(0x2000, b" world!")
    return Chain(
        7,
        [(0x1000, 5), (0x1800, 0), (0x2000, 7)],
        [(0x3000, 3), (0x3800, 0), (0x4000, 5)],
    )


def test_reads_cross_segments_and_refuse_what_is_not_there(mem):
    r = ChainReader(mem, chain(mem))
    assert r.left == 12
    assert r.read(3) == b"hel"
    assert r.read(4) == b"lo w"  # across the empty segment too
    with pytest.raises(ChainError, match="5 readable bytes left, 6 needed"):
        r.read(6)
    assert r.left == 5  # the refused read took nothing
    assert r.read_upto(100) == b"orld!"
    assert r.read(0) == b"" and r.left == 0
    with pytest.raises(ChainError):
        r.skip(1)


def test_unpack_skip_and_take(mem):
    c = chain(mem)
    r = ChainReader(mem, c)
    r.skip(4)
    assert r.unpack(struct.Struct("<2s")) == (b"o ",)
    assert r.take(4) == [(0x2001, 4)]
    assert r.read(2) == b"d!"


def test_writes_cross_segments_and_count_the_used_length(mem):
    w = ChainWriter(mem, chain(mem))
    assert w.room == 8
    w.write(b"ab")
    w.pack(struct.Struct("<H"), 0x6463)  # "cd", across the segment boundary
    assert w.written == 4 and w.room == 4
    with pytest.raises(ChainError, match="4 writable bytes left, 5 needed"):
        w.write(b"12345")
    assert w.written == 4 and mem.read(0x4001, 4) == bytes(4)  # nothing written
    assert w.write_upto(b"efghij") == 4
    assert (mem.read(0x3000, 3), mem.read(0x4000, 5)) == (b"abc", b"defgh")
    assert w.written == 8 and w.room == 0


def test_gather_and_scatter_keep_their_contract(mem):
    c = chain(mem)
    assert gather(mem, c, 12) == b"hello world!"
    assert gather(mem, c, 11) is None
    assert scatter(mem, c, b"0123456789") == 8
    assert mem.read(0x4000, 5) == b"34567"


def test_a_segment_outside_guest_ram_fails_in_memory_not_beyond_it(mem):
    c = Chain(1, [(mem.size - 2, 4)], [(mem.size, 1)])
    with pytest.raises(GuestMemoryError):
        ChainReader(mem, c).read(4)
    with pytest.raises(GuestMemoryError):
        ChainWriter(mem, c).write(b"x")


def test_chains_split_in_c_as_in_python():
    """The ring core's split_chains gives exactly the Python split, for batches of every
    shape a pop or a resubmission makes (empty chains, empty batches, mixed order)."""
    rng = np.random.default_rng(10)
    batches = [Batch.empty()]
    for _ in range(200):
        counts = rng.integers(0, 5, rng.integers(1, 6))
        segs = [
            [(int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**32)), bool(w))
             for w in rng.integers(0, 2, k)]
            for k in counts
        ]  # fmt: skip
        heads = rng.choice(1024, len(segs), replace=False).tolist()
        batches.append(Batch.from_chains(list(zip(heads, segs, strict=True))))
    for batch in batches:
        got = chains(batch)
        assert got == _chains(batch)
        assert all(type(c) is Chain for c in got)
    odd = Batch.empty()
    odd.heads = odd.heads.astype(np.int64)  # not what a pop makes: split in Python
    assert chains(odd) == []
