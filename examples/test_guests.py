"""Real guests on emu's devices: two boots in all (a UML guest, a QEMU microvm guest)."""

import pytest


@pytest.mark.emu_guest(kind="uml")
def test_commands_in_a_uml_guest(emu_guest):
    rc, out = emu_guest.run("uname -sr")
    assert rc == 0 and out.startswith("Linux 6.1")
    # the disk is emu's virtio-blk; what the guest writes is in the host's file
    rc, _ = emu_guest.run(
        "echo written-by-the-guest | dd of=/dev/vda bs=512 conv=sync oflag=direct"
    )
    assert rc == 0
    assert emu_guest.disk.read_bytes()[:21] == b"written-by-the-guest\n"
    assert emu_guest.run("cat /no/such/file") == (
        1,
        "cat: can't open '/no/such/file': No such file or directory\n",
    )


@pytest.mark.emu_guest(kind="microvm")
def test_microvm_snapshot_and_restore(emu_guest, tmp_path):
    assert emu_guest.run("echo one > /tmp/state")[0] == 0
    snapshot = emu_guest.snapshot(tmp_path / "snap")  # the guest runs on
    assert emu_guest.run("echo two > /tmp/state; cat /tmp/state") == (0, "two\n")
    emu_guest.restore(snapshot)
    assert emu_guest.run("cat /tmp/state") == (0, "one\n")
    assert emu_guest.stop() == 0  # powered off cleanly
