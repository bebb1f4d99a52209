"""Real guests mount a virtio-fs share: emu's fs device (UML and microvm) and Debian's C
virtiofsd (microvm; UML cannot use it: no VHOST_USER_GET_CONFIG), running the same check.

The `fs` workload's check pass (emu/guest/init_fs.py) writes files of several sizes from
a file the host put in the share, renames, links, chmods, chowns, truncates, appends,
overwrites in place, makes a fifo, removes, reads an unlinked open file, then unmounts
and mounts again and compares the share with a tmpfs mirror of the same operations. Here:
the guest saw no difference; its listing equals the host's own view of the directory;
the checksums the host computes are there; and emu's run agrees with virtiofsd's, entry
by entry. Small sizes keep each boot to seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.devices import registry
from emu.guest import GuestImage, build_image, run_guest, virtiofsd
from emu.guest.backends import emu_backends, guest_devices
from emu.guest.devices import Device
from emu.guest.fscheck import (
    CHECK_DIR,
    HOST_FILE,
    TOUCHED_MTIME,
    expected_sha256,
    guest_listing,
    host_data,
    host_listing,
)
from emu.guest.microvm import command as microvm_command
from emu.guest.packages import PackageError
from emu.guest.run import needs_fio, with_fs_tag
from emu.guest.uml import command as uml_command

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = {"uml": 60.0, "microvm": 120.0}
#: results that depend only on what the pass did, not on the backend
SAME = (
    "fs.host_size",
    "fs.host_sha256",
    "fs.unlinked_open_read",
    "fs.hardlink_same_ino",
    "fs.many_count",
    "fs.entries",
    "fs.mtime_touched",
)


def _image(kind: str) -> GuestImage:
    if kind == "microvm" and shutil.which("qemu-system-x86_64") is None:
        subprocess.run([str(ROOT / "scripts/install-guest-deps.sh")], capture_output=True)
        if shutil.which("qemu-system-x86_64") is None:
            pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    try:
        return build_image(kind)
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


def _need_emu_fs() -> None:
    try:
        registry.get("fs")
    except registry.SpecError:
        pytest.skip("emu has no fs device type")


@pytest.fixture(scope="module")
def data() -> bytes:
    return host_data()


def _share(root: Path, data: bytes) -> Path:
    share = root / "share"
    share.mkdir()
    (share / HOST_FILE).write_bytes(data)
    return share


def _explain(res) -> str:
    return f"rc={res.rc} timed_out={res.timed_out}\n{res.console[-4000:]}"


def _checked(results: dict[str, str], share: Path, data: bytes) -> dict[str, str]:
    """The assertions every backend must pass; the guest's listing."""
    assert results.get("fs.check_bad") == "0", results
    assert results["fs.host_sha256"] == hashlib.sha256(data).hexdigest()
    assert results["fs.unlinked_open_read"] == "ok"
    assert results["fs.hardlink_same_ino"] == "1"
    assert results["fs.many_count"] == "300"
    assert results["fs.mtime_touched"] == str(TOUCHED_MTIME)
    listing = guest_listing(results)
    assert len(listing) == int(results["fs.entries"]) - 300
    assert listing == host_listing(share / CHECK_DIR)
    for size in (4096, 1048576, 3000000):  # unchanged after they were written
        assert listing[f"f{size}"].endswith(":" + expected_sha256(data, size)), size
    assert listing["hard"] == listing["f4096"]
    assert listing["f1"].split(":")[:4] == ["f", "751", "1000", "1000"]  # chmod, then chown
    assert listing["sym"] == "l:777:0:0:9:1:sub/b.txt"
    assert len(list((share / CHECK_DIR / "many").iterdir())) == 300
    assert (share / CHECK_DIR / "f4096").stat().st_ino == (share / CHECK_DIR / "hard").stat().st_ino
    return listing


@pytest.fixture(scope="module")
def virtiofsd_run(tmp_path_factory, data) -> tuple[dict[str, str], dict[str, str]]:
    """The check pass under microvm on virtiofsd, through `emu guest run --virtiofsd
    DIR,tag=NAME`: (its results, its listing)."""
    if not virtiofsd.available():
        pytest.skip(f"{virtiofsd.VIRTIOFSD} missing (scripts/install-guest-deps.sh)")
    _image("microvm")
    tmp = tmp_path_factory.mktemp("virtiofsd")
    share = _share(tmp, data)
    results = _cli(["--kind", "microvm", "--virtiofsd", f"{share},tag=vfsd"], tmp)
    assert results["fs.mounted"] == "vfsd"
    return results, _checked(results, share, data)


def _cli(args: list[str], tmp: Path) -> dict[str, str]:
    """`emu guest run ARGS --run fs`: the guest's results."""
    out = tmp / "res.json"
    kind = args[args.index("--kind") + 1]
    args = ["guest", "run", *args, "--run", "fs", "--timeout", str(TIMEOUT[kind])]
    cli = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert cli.exit_code == 0, cli.output[-4000:]
    return json.loads(out.read_text())["results"]


def test_virtiofsd_microvm_check(virtiofsd_run):
    results, listing = virtiofsd_run
    assert "f3000000" in listing


def _agrees(results: dict[str, str], listing: dict[str, str], reference) -> None:
    ref_results, ref_listing = reference
    assert {k: results[k] for k in SAME} == {k: ref_results[k] for k in SAME}
    assert listing == ref_listing


def test_emu_microvm_check(tmp_path, data, virtiofsd_run):
    _need_emu_fs()
    image = _image("microvm")
    share = _share(tmp_path, data)
    with emu_backends("microvm", [f"fs:{share},tag=emu-fs"], tmp_path) as devices:
        res = run_guest("microvm", devices, ["fs"], image=image, timeout=TIMEOUT["microvm"])
    assert res.ok, _explain(res)
    assert res.results["fs.mounted"] == "emu-fs"
    _agrees(res.results, _checked(res.results, share, data), virtiofsd_run)


def test_emu_uml_check_through_cli(tmp_path, data, virtiofsd_run):
    """`emu guest run --kind uml --emu fs:DIR,tag=NAME`: the guest mounts NAME."""
    _need_emu_fs()
    _image("uml")
    share = _share(tmp_path, data)
    results = _cli(["--kind", "uml", "--emu", f"fs:{share},tag=uml-share"], tmp_path)
    assert results["fs.mounted"] == "uml-share"
    _agrees(results, _checked(results, share, data), virtiofsd_run)


def test_emu_uml_read_only(tmp_path, data):
    """`fs:DIR,ro`: the guest reads, and every write kind is refused with EROFS."""
    _need_emu_fs()
    image = _image("uml")
    share = _share(tmp_path, data)
    before = sorted(p.name for p in share.iterdir())
    with emu_backends("uml", [f"fs:{share},ro"], tmp_path) as devices:
        res = run_guest("uml", devices, ["fs"], params={"fs.do": "ro"}, image=image, timeout=60)
    assert res.ok, _explain(res)
    assert res.results["fs.ro_refused"] == "5"
    assert sorted(p.name for p in share.iterdir()) == before


# the wiring, without a guest


def test_fs_tag_on_the_command_lines(tmp_path):
    image = GuestImage("microvm", tmp_path / "k", tmp_path / "i", "", {})
    tagged, plain = Device.parse("fs:/s1,tag=docs"), Device.parse("fs:/s2")
    assert (tagged.tag, plain.tag) == ("docs", None)
    cmd = " ".join(microvm_command(image, [tagged, plain], [], 512))
    assert "vhost-user-fs-device,chardev=vu0,tag=docs " in cmd
    assert "vhost-user-fs-device,chardev=vu1,tag=emu " in cmd
    args = uml_command(image, [tagged], [], 256)
    assert "virtio_uml.device=/s1:26" in args
    with pytest.raises(ValueError, match="no device options"):
        uml_command(image, [Device.parse("fs:/s1,queue-size=64")], [], 256)
    # the guest mounts the tag its device has, unless told otherwise
    assert with_fs_tag([plain, tagged], {})["fs.tag"] == "docs"
    assert with_fs_tag([tagged], {"fs.tag": "x"})["fs.tag"] == "x"
    assert "fs.tag" not in with_fs_tag([plain], {})


def test_emu_fs_spec_becomes_a_tagged_device():
    _need_emu_fs()
    for kind in ("uml", "microvm"):
        (dev,) = guest_devices(kind, ["fs:/srv,tag=t1"], [Path("/s.sock")])
        assert (dev.type, dev.path, dev.tag) == ("fs", "/s.sock", "t1")
        (dev,) = guest_devices(kind, ["fs:/srv"], [Path("/s.sock")])
        assert dev.tag == "emu"


def test_rand_pass_needs_the_fio_layer():
    assert needs_fio(["fs"], {"fs.do": "check,rand"})
    assert not needs_fio(["fs"], {"fs.do": "check,seq"})
    assert not needs_fio(["blk"], {"fs.do": "rand"})
    assert needs_fio(["fio"], {})


def test_virtiofsd_refused_for_uml(tmp_path):
    cli = CliRunner().invoke(main, ["guest", "run", "--kind", "uml", "--virtiofsd", str(tmp_path)])
    assert cli.exit_code != 0 and "virtiofsd serves QEMU only" in cli.output


def test_virtiofsd_command_and_refusals(tmp_path):
    cmd = virtiofsd.command(tmp_path, tmp_path / "s.sock", options=["cache=none"])
    assert cmd[1:] == [
        f"--socket-path={tmp_path / 's.sock'}",
        *("-o", f"source={tmp_path}", "-o", "sandbox=chroot", "-o", "cache=none"),
    ]
    with pytest.raises(ValueError, match="sandbox"):
        virtiofsd.command(tmp_path, tmp_path / "s.sock", sandbox="none")
    if virtiofsd.available():
        with pytest.raises(NotADirectoryError):
            with virtiofsd.serve(tmp_path / "missing", tmp_path / "s.sock"):
                pass


def test_emu_backends_waits_for_its_own_socket(tmp_path):
    """A socket file left by an earlier `emu serve` in the same directory does not pass
    for the new one listening (a second boot would find nothing there)."""
    _need_emu_fs()
    share = tmp_path / "share"
    share.mkdir()
    for _ in range(2):
        with emu_backends("uml", [f"fs:{share}"], tmp_path) as (dev,):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(dev.path)
            finally:
                probe.close()
