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
    assert "host file matches" in res.output  # fs
    assert "host CONNECT 1234 -> b'OK 1073741824\\n'" in res.output  # vsock


def test_demo_offers_the_stop_bit_only_when_asked():
    res = CliRunner().invoke(main, ["demo", "--in-process", "--stop-bit", "47", "rng"])
    assert res.exit_code == 0, res.output
    assert "STOP offered as feature bit 47; the guest stopped rng" in res.output
    assert "stop-bit: resumed, 64 more bytes" in res.output
    res = CliRunner().invoke(main, ["demo", "--in-process", "rng"])
    assert res.exit_code == 0 and "stop-bit" not in res.output
    res = CliRunner().invoke(main, ["demo", "--in-process", "--stop-bit", "43", "rng"])
    assert res.exit_code != 0  # 43 is SUSPEND; only the reserved 44-49


def test_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    assert "demo" in res.output and "state" in res.output


def test_guest_demo_boots_real_kernels_on_emu_devices():
    """The README's main command: UML on emu's blk + console, microvm on blk + rng."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is missing (scripts/install-guest-deps.sh installs it)")
    res = CliRunner().invoke(main, ["demo"])
    assert res.exit_code == 0, res.output
    assert res.output.count("virtio-blk, driver virtio_blk") == 2
    assert res.output.count("-> match") == 2
    assert "virtio-console, driver virtio_console" in res.output
    assert "host received 'hello-from-the-guest" in res.output
    assert "virtio-rng, driver virtio_rng" in res.output
    assert "32 requests in flight" in res.output
    assert "32 completed exactly once, disk matches" in res.output
