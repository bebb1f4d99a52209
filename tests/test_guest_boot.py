"""Real Linux guests drive a vhost-user-blk backend (qemu-storage-daemon for now).

Each boot checks that the guest's virtio_blk bound the device, that data the host put on
the disk reaches the guest intact, and that data the guest wrote lands in the backing
file. The guest kernels come from Debian packages (fetched into emu's cache); the host
tools from scripts/install-guest-deps.sh, which is run once if they are missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.guest import GuestImage, build_image, run_guest
from emu.guest.packages import PackageError
from emu.guest.qsd import blk_export

ROOT = Path(__file__).resolve().parents[1]
DISK_MIB = 64
PATTERN_MIB = 4


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        subprocess.run([str(ROOT / "scripts/install-guest-deps.sh")], capture_output=True)
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing and scripts/install-guest-deps.sh could not install it")


@pytest.fixture(scope="module", params=["uml", "microvm"])
def image(request) -> GuestImage:
    _need("qemu-storage-daemon")
    if request.param == "microvm":
        _need("qemu-system-x86_64")
    try:
        return build_image(request.param)
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


@pytest.fixture
def disk(tmp_path) -> tuple[Path, str]:
    """A raw disk whose first PATTERN_MIB hold a host-known pattern; (path, its sha256)."""
    block = b"".join(hashlib.sha256(b"emu %d" % i).digest() for i in range(128))  # 4 KiB
    head = block * (PATTERN_MIB << 8)
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(DISK_MIB << 20)
    return path, hashlib.sha256(head).hexdigest()


def _head_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(PATTERN_MIB << 20)).hexdigest()


def _explain(res) -> str:
    return f"rc={res.rc} exit={res.exit_status} timed_out={res.timed_out}\n{res.console}"


def test_blk_round_trip(image, disk, tmp_path):
    path, host_sha = disk
    sock = tmp_path / "blk.sock"
    with blk_export(path, sock):
        res = run_guest(
            image.kind,
            [("blk", sock)],
            ["devices", "blk"],
            params={"blk.mib": PATTERN_MIB},
            image=image,
            timeout=60,
        )
    assert res.ok, _explain(res)
    assert res.log.devices["virtio0"]["device"] == "0x0002"
    assert res.log.devices["virtio0"]["driver"] == "virtio_blk"
    # bit 32 (VERSION_1) in the sysfs feature string: the modern transport was negotiated
    assert res.log.devices["virtio0"]["features"][32] == "1"
    assert res.results["blk.sectors"] == str(DISK_MIB << 11)
    assert res.results["blk.read_sha256"] == host_sha  # host -> guest
    written = res.results["blk.write_sha256"]
    assert res.results["blk.readback_sha256"] == written  # guest -> device -> guest
    assert _head_sha256(path) == written != host_sha  # guest -> host file
    assert res.boot_s is not None and res.boot_s < 20


def test_cli_runs_guest_on_external_socket(image, disk, tmp_path):
    path, _ = disk
    sock, out = tmp_path / "blk.sock", tmp_path / "res.json"
    with blk_export(path, sock):
        cli = CliRunner().invoke(
            main,
            ["guest", "run", "--kind", image.kind, "--device", f"blk:{sock}", "--run",
             "blkbench", "--param", "blkbench.mib=16", "--param", "blkbench.ops=256",
             "--json", str(out)],
        )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "EMU-DONE rc=0" in cli.output
    summary = json.loads(out.read_text())
    bench = summary["bench"]
    assert set(bench) == {"blk_write_1m", "blk_read_1m", "blk_write_4k", "blk_read_4k"}
    assert all(b["value"] > 0 for b in bench.values())


def test_microvm_qemu_devices(tmp_path):
    """The other workloads, on QEMU's own net/rng/console, until emu serves them."""
    _need("qemu-system-x86_64")
    try:
        image = build_image("microvm")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")
    hvc = tmp_path / "hvc.out"
    res = run_guest(
        "microvm",
        ["qemu-net:user", "qemu-rng:/dev/urandom", f"qemu-console:{hvc}"],
        ["devices", "net", "rng", "hvc"],
        params={"hvc.marker": "hello-from-guest"},
        image=image,
        timeout=60,
    )
    assert res.ok, _explain(res)
    drivers = {d["driver"] for d in res.log.devices.values()}
    assert drivers == {"virtio_net", "virtio_rng", "virtio_console"}
    assert res.results["net.ping_rc"] == "0"
    assert res.results["rng.bytes"] == "16384" and res.results["rng.distinct"] == "256"
    assert hvc.read_text() == "hello-from-guest\n"


def test_timeout_kills_guest(tmp_path):
    """A guest that never finishes is ended, and the result says so."""
    try:
        image = build_image("uml")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")
    res = run_guest(
        "uml",
        [],
        ["script"],
        params={"script": base64.b64encode(b"sleep 30").decode()},
        image=image,
        timeout=3,
    )
    assert res.timed_out and res.rc is None and res.exit_status is None
    assert res.log.steps == ["script"]


def _pids_with(needle: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_guest_dies_with_killed_parent(tmp_path):
    """A test runner killed mid-boot leaves no guest, nor any of UML's helpers, behind."""
    try:
        build_image("uml")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")
    tag = f"emu.tag={tmp_path.name}"
    code = (
        "import base64, sys\n"
        "from emu.guest import run_guest\n"
        "run_guest('uml', [], ['script'], timeout=60, params={'tag': sys.argv[1],"
        " 'script': base64.b64encode(b'sleep 30').decode()},"
        " on_output=lambda t: print(t, end='', flush=True))\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, tag.partition("=")[2]], stdout=subprocess.PIPE, text=True
    )
    for line in parent.stdout:
        if "EMU-STEP script" in line:
            break
    assert _pids_with(tag), "the guest is not running"
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while _pids_with(tag):
        assert time.monotonic() < deadline, f"guest outlived its parent: {_pids_with(tag)}"
        time.sleep(0.05)
