import pytest
from click.testing import CliRunner

from emu.cli import main


@pytest.mark.parametrize("args", [[], ["--packed", "--ring", "python", "--no-event-idx"]])
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
