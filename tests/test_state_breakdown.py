"""``emu state show --breakdown``: every part, standard or emu's, with its bytes; a device
part's fields, its lists of objects as tables (the fs device's nodes and handles)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.devices import registry
from emu.state.breakdown import breakdown, file_bytes
from emu.state.file import load

GOLDEN = sorted((Path(__file__).parent / "golden").glob("v*/*.state"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_part_is_counted_once(path):
    state = load(path)
    lines = breakdown(state, registry.schemas())
    assert file_bytes(state) == path.stat().st_size
    assert f"{path.stat().st_size} bytes" in lines[0]
    total = 0
    for label in ("virtio 1.4 parts:", "emu extension parts:", "container:"):
        (line,) = [ln for ln in lines if ln.startswith(label)]
        total += int(re.search(r"(\d+) bytes", line).group(1))
    assert total == path.stat().st_size
    rows = [ln for ln in lines if re.match(r"0x[0-9a-f]{4} ", ln)]
    assert len(rows) == len(state.parts)
    for row, part in zip(rows, state.parts, strict=True):
        assert f"16+{len(part.value)}" in row
        assert ("virtio 1.4" in row) == (part.type < 0xE000)


def test_the_fs_part_lists_nodes_and_handles():
    path = next(p for p in GOLDEN if p.stem == "fs-split")
    res = CliRunner().invoke(main, ["state", "show", "--breakdown", str(path)])
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    assert any(
        re.match(r"0xe11a DEVICE_26 +emu extension 1\.0 +16\+\d+ +JSON: tag", ln) for ln in out
    )
    assert any(ln.startswith("0x0101 DRV_FEATURES") and "VERSION_1" in ln for ln in out)
    nodes = out.index(next(ln for ln in out if "dir.nodes: 2 entries" in ln))
    assert out[nodes + 1].split() == ["id", "dev", "file_handle", "ino", "nlookup", "path", "bytes"]
    root, golden = out[nodes + 2].split(), out[nodes + 3].split()
    assert root[0] == "1" and root[5] == '""'
    assert golden[0] == "2" and golden[4:6] == ["5", '"golden"']
    handles = out.index(next(ln for ln in out if "dir.handles: 1 entry," in ln))
    assert out[handles + 1].split() == ["fh", "dir", "flags", "node", "bytes"]
    assert out[handles + 2].split()[:4] == ["1", "no", "0x0", "2"]
    assert any("session: minor 37" in ln for ln in out)


def test_a_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "bad.state"
    data = bytearray(next(iter(GOLDEN)).read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["state", "show", "--breakdown", str(path)])
    assert res.exit_code != 0 and "checksum" in res.output
