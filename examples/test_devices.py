"""Devices in-process: what a virtio driver or VMM test suite checks against emu's devices."""

import hashlib

import pytest

from emu.testing.pytest_plugin import device_params


def test_default_device_is_an_rng(emu_device):
    a, b = emu_device.read(64), emu_device.read(64)
    assert len(a) == len(b) == 64 and a != b


@pytest.mark.parametrize("emu_device", device_params(types=["blk"]), indirect=True)
def test_blk_writes_reach_the_disk_file(emu_device):
    data = hashlib.sha256(b"example").digest() * 128  # 4 KiB
    assert emu_device.write(16, data) == 0  # VIRTIO_BLK_S_OK
    assert emu_device.read(16, 8) == data
    with open(emu_device.host, "rb") as disk:  # the host side: the backing file
        disk.seek(16 * 512)
        assert disk.read(len(data)) == data
    # the param took effect: the ring format negotiated, the ring core the device runs
    assert emu_device.packed == (emu_device.param.ring == "packed")
    expected = {"cython": "emu._ring", "python": "emu.pyring"}[emu_device.param.core]
    assert emu_device.ring_modules == {expected}


@pytest.mark.parametrize("emu_device", ["console-packed", "console-split-python"], indirect=True)
def test_console_both_ways(emu_device):
    emu_device.write(0, b"from the guest\n")
    assert emu_device.host.wait_output(15) == b"from the guest\n"
    emu_device.host.feed(b"from the host\n")
    assert emu_device.read(0, 14) == b"from the host\n"


@pytest.mark.parametrize("emu_device", ["net", "net-packed-python"], indirect=True)
def test_net_frames_both_ways(emu_device):
    peer = bytes.fromhex("525400aaaaaa")
    out = peer + emu_device.mac + b"\x88\xb5" + b"guest to host"
    emu_device.send(out)
    assert emu_device.host.recv() == out
    back = emu_device.mac + peer + b"\x88\xb5" + b"host to guest"
    emu_device.host.send(back)
    _header, frame = emu_device.recv()
    assert frame == back
