import shutil

import pytest
from click.testing import CliRunner

from emu.cli import main


@pytest.mark.parametrize(
    "args", [["--in-process"], ["--in-process", "--packed", "--ring", "python", "--no-event-idx"]]
)
def test_demo_drives_every_device(args):
    res = CliRunner().invoke(main, ["demo", *args])
    assert res.exit_code == 0, res.output
    assert "backing file matches" in res.output
    assert "delivered intact" in res.output
    assert "host -> guest b'host says hi\\n'" in res.output
    assert "rng: 64 bytes" in res.output


def test_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    assert "demo" in res.output and "state" in res.output


def test_guest_demo_boots_microvm_on_emu_devices():
    """The README's main command: a real kernel on emu's vhost-user blk and rng."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is missing (scripts/install-guest-deps.sh installs it)")
    res = CliRunner().invoke(main, ["demo", "--kind", "microvm"])
    assert res.exit_code == 0, res.output
    assert "virtio-blk, driver virtio_blk" in res.output
    assert "-> match" in res.output
    assert "virtio-rng, driver virtio_rng" in res.output
