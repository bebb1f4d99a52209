import json
import os
import struct

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.state import parts
from emu.state.file import load, save, write_atomic
from emu.state.format import PART_F_OPTIONAL, DeviceState, Part, StateError, decode, encode
from emu.state.schema import Int, Schema, Str


def sample() -> DeviceState:
    return DeviceState(
        2,
        [
            parts.make(parts.DEV_FEATURES, (1 << 32) | (1 << 9)),
            parts.make(parts.DRV_FEATURES, 1 << 32),
            parts.make(parts.DEVICE_STATUS, 0x0F),
            parts.make(
                parts.VQ_CFG,
                dict(size=256, enabled=True, desc=0x1000, driver=0x2000, device=0x3000),
                vq=0,
            ),
            parts.make(
                parts.RING_STATE,
                dict(next_avail=7, next_used=5, avail_wrap=True, used_wrap=False, signalled_used=4),
                vq=0,
            ),
            parts.make(
                parts.INFLIGHT,
                [
                    dict(head=3, ndesc=1, segments=[(0x5000, 16, False), (0x6000, 512, True)]),
                    dict(head=9, ndesc=3, segments=[]),
                ],
                vq=0,
            ),
            parts.make(parts.device_part(2), BLK_STATE),
        ],
    )


BLK_STATE = {
    "capacity": 2048,
    "block_size": 512,
    "readonly": False,
    "num_queues": 1,
    "seg_max": 254,
    "serial": "00" * 20,
    "writeback": 1,
}


def test_round_trip_decodes_every_part():
    st = decode(encode(sample()))
    values = {(p.type, p.vq_index): v for p, v in parts.parse(st)}
    assert values[(parts.DEV_FEATURES, 0)] == (1 << 32) | (1 << 9)
    assert values[(parts.DEVICE_STATUS, 0)] == 0x0F
    assert values[(parts.VQ_CFG, 0)]["driver"] == 0x2000
    assert values[(parts.RING_STATE, 0)]["next_avail"] == 7
    assert values[(parts.RING_STATE, 0)]["used_wrap"] is False
    assert values[(parts.INFLIGHT, 0)][0]["segments"][1] == (0x6000, 512, True)
    assert [c["head"] for c in values[(parts.INFLIGHT, 0)]] == [3, 9]
    assert values[(parts.device_part(2), 0)] == BLK_STATE


def test_part_header_is_the_virtio_16_byte_layout():
    data = encode(DeviceState(2, [parts.make(parts.DEVICE_STATUS, 0x0F)]))
    hdr = data[24:40]
    assert len(hdr) == 16
    assert int.from_bytes(hdr[0:2], "little") == 0x0103
    assert int.from_bytes(hdr[12:16], "little") == 1
    assert data[40] == 0x0F


@pytest.mark.parametrize("cut", [0, 10, 30, 60, -1])
def test_truncated_state_is_refused(cut):
    data = encode(sample())
    with pytest.raises(StateError, match="truncated|shorter"):
        decode(data[:cut])


def test_every_single_byte_corruption_is_refused():
    data = encode(sample())
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(StateError):
            decode(bytes(bad))


def test_wrong_magic_and_version_are_refused():
    data = bytearray(encode(sample()))
    with pytest.raises(StateError, match="magic"):
        decode(b"X" + bytes(data[1:]))
    data[8] = 9
    with pytest.raises(StateError, match="version 9"):
        decode(bytes(data))


def test_unknown_parts_optional_skipped_required_refused():
    opt = Part(0xEF00, b"whatever", flags=PART_F_OPTIONAL)
    st = decode(encode(DeviceState(2, [opt, parts.make(parts.DEVICE_STATUS, 1)])))
    assert [p.type for p, _ in parts.parse(st)] == [parts.DEVICE_STATUS]
    req = Part(0xEF00, b"whatever")
    with pytest.raises(StateError, match="required but unknown"):
        parts.parse(decode(encode(DeviceState(2, [req]))))


def test_newer_extension_version_refused_unless_optional():
    future = parts.make(
        parts.RING_STATE,
        dict(next_avail=0, next_used=0, avail_wrap=1, used_wrap=1, signalled_used=0),
        vq=1,
    )
    for major, minor, message in [(2, 0, "another major"), (1, 1, "newer minor")]:
        future.flags = 0
        future.value = struct.pack("<HH", major, minor) + future.value[4:]
        with pytest.raises(StateError, match=f"RING_STATE is version {major}.{minor}, .*{message}"):
            parts.parse(DeviceState(2, [future]))
        future.flags = PART_F_OPTIONAL
        assert parts.parse(DeviceState(2, [future])) == []


#: a device part at version 1.2: ``b`` came in 1.1 (a default does), ``a`` was ``old_a``
#: in 1.0 (an upgrade renames it)
TOY = Schema(
    "toy state",
    1,
    2,
    {"a": Int(0, 9), "b": Int(0, 9, default=3), "c": Str(default="x")},
    upgrades={0: lambda v: {"a": v.pop("old_a"), **v}},
)


def toy_part(value: dict, major: int, minor: int) -> DeviceState:
    raw = struct.pack("<HH", major, minor) + json.dumps(value).encode()
    return DeviceState(0x7E, [Part(parts.device_part(0x7E), raw)])


@pytest.mark.parametrize(
    "value, version, loaded",
    [
        ({"a": 1, "b": 2, "c": "y"}, (1, 2), {"a": 1, "b": 2, "c": "y"}),
        ({"a": 1, "b": 2}, (1, 1), {"a": 1, "b": 2, "c": "x"}),
        ({"old_a": 4}, (1, 0), {"a": 4, "b": 3, "c": "x"}),
    ],
)
def test_older_minor_loads_with_defaults_and_upgrades(value, version, loaded):
    ((_, got),) = parts.parse(toy_part(value, *version), {parts.device_part(0x7E): TOY})
    assert got == loaded


@pytest.mark.parametrize(
    "version, message",
    [
        (
            (1, 3),
            r"DEVICE_126 \(toy state\) is version 1.3, "
            r"a newer minor version than this emu reads \(up to 1.2\)",
        ),
        ((2, 0), r"\(toy state\) is version 2.0, of another major version"),
        ((0, 9), r"\(toy state\) is version 0.9, of another major version"),
    ],
)
def test_newer_minor_or_other_major_refused_saying_which(version, message):
    with pytest.raises(StateError, match=message):
        parts.parse(toy_part({"a": 1}, *version), {parts.device_part(0x7E): TOY})


def test_device_part_without_a_schema_is_unknown_to_a_restorer():
    state = toy_part({"a": 1}, 1, 2)
    with pytest.raises(StateError, match="required but unknown"):
        parts.parse(state, {})
    assert parts.parse(state)[0][1] == {"a": 1}  # shown as plain JSON


@pytest.mark.parametrize(
    "ptype,value",
    [
        (parts.VQ_CFG, b"\x00" * 5),
        (parts.DEVICE_STATUS, b""),
        (parts.DEV_FEATURES, b"\x01\x02\x03"),
        (
            parts.RING_STATE,
            (1).to_bytes(2, "little") + b"\x00\x00" + b"\x00" * 4 + b"\x07\x00" + b"\x00\x00",
        ),
        (parts.INFLIGHT, (1).to_bytes(2, "little") + b"\x00\x00" + (5).to_bytes(4, "little")),
        (parts.device_part(1), (1).to_bytes(2, "little") + b"\x00\x00" + b"{not json"),
    ],
)
def test_malformed_values_refused(ptype, value):
    with pytest.raises(StateError):
        parts.parse(DeviceState(2, [Part(ptype, value)]))


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "dev.state"
    save(path, sample())
    before = path.read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_atomic(path, b"new contents")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dev.state"]


def test_state_show_prints_json_and_refuses_corrupt(tmp_path):
    path = tmp_path / "dev.state"
    save(path, sample())
    assert load(path).device_type == 2
    res = CliRunner().invoke(main, ["state", "show", "--json", str(path)])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["device_type"] == 2
    names = [p["name"] for p in shown["parts"]]
    assert names[:4] == ["DEV_FEATURES", "DRV_FEATURES", "DEVICE_STATUS", "VQ_CFG"]
    assert shown["parts"][4]["value"]["next_avail"] == 7
    path.write_bytes(path.read_bytes()[:-3])
    res = CliRunner().invoke(main, ["state", "show", str(path)])
    assert res.exit_code != 0
    assert "truncated" in res.output
