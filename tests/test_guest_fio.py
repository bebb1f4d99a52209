"""fio in the guest: the image layer that carries it, its knobs, and real runs on emu's blk.

The layer is checked without booting: every DT_NEEDED of every ELF file in it must be in
it, and the layer's fio must run on the host with only the layer's libraries and loader.
The boot test runs fio jobs with each ioengine in a UML and a microvm guest on emu's
vhost-user blk and checks fio's report against what was asked and the disk file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_guest_build import read_newc

from emu.commands.serve import make_devices
from emu.guest import images
from emu.guest.fio import FioError, FioJob, jobs_of, kernel_params, parse_report, run_fio
from emu.guest.images import FIO_BIN, FIO_LIBDIR
from emu.guest.libs import _read_elf
from emu.guest.packages import PackageError
from emu.vhost_user.backend import VhostUserServer

DISK_MIB = 32
TIMEOUT = {"uml": 60.0, "microvm": 90.0}


@pytest.fixture(scope="module")
def fio_files() -> dict[str, Path]:
    try:
        return images.fio_files()[0]
    except PackageError as e:
        pytest.skip(f"fio packages unavailable: {e}")


def test_fio_layer_holds_every_library_fio_loads(fio_files):
    interp = _read_elf(fio_files[FIO_BIN]).interpreter
    assert interp in fio_files
    present = {Path(p).name for p in fio_files if p.startswith(FIO_LIBDIR + "/")}
    present.add(Path(interp).name)
    assert {"libaio.so.1", "libc.so.6", "libz.so.1"} <= present
    for guest_path, path in fio_files.items():
        info = _read_elf(path)
        assert info is not None, guest_path
        missing = set(info.needed) - present
        assert not missing, f"{guest_path} needs {missing}"


def test_layer_fio_runs_with_only_its_own_libraries(fio_files, tmp_path):
    libdir = tmp_path / "lib"
    libdir.mkdir()
    for guest_path, path in fio_files.items():
        if guest_path.startswith(FIO_LIBDIR + "/"):
            (libdir / Path(guest_path).name).symlink_to(path)
    interp = fio_files[_read_elf(fio_files[FIO_BIN]).interpreter]
    res = subprocess.run(
        [str(interp), "--library-path", str(libdir), str(fio_files[FIO_BIN]), "--version"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("fio-3.")


def test_fio_image_is_base_plus_layer(fio_files):
    base = images.build_image("uml")
    with_fio = images.build_image("uml", fio=True)
    assert with_fio.kernel == base.kernel and "fio" in with_fio.packages
    data = with_fio.initrd.read_bytes()
    head = base.initrd.read_bytes()
    assert data.startswith(head)
    pad = -len(head) % 4
    assert data[len(head) : len(head) + pad] == b"\0" * pad
    layer = read_newc(data[len(head) + pad :])
    assert layer[FIO_BIN.strip("/")]["data"] == fio_files[FIO_BIN].read_bytes()
    assert set(layer) >= {p.strip("/") for p in fio_files}
    for name in layer:  # the kernel needs each parent directory before its children
        parent = name.rpartition("/")[0]
        assert not parent or parent in layer, name


def test_kernel_params():
    jobs = [
        FioJob("qd1", rw="randread", bs="4k", iodepth=1),
        FioJob("seq", rw="write", bs="1m", ioengine="io_uring", runtime=3),
    ]
    assert kernel_params(jobs, size="8m") == {
        "fio.size": "8m",
        "fio.jobs": "qd1:rw=randread:bs=4k:iodepth=1/"
        "seq:rw=write:bs=1m:ioengine=io_uring:time_based=1:runtime=3",
    }
    for bad in (FioJob("x", ioengine="sync"), FioJob("a b"), FioJob("x", bs="4k:rw=write")):
        with pytest.raises(ValueError):
            kernel_params([bad])


def test_parse_report_tolerates_console_noise():
    console = (
        "EMU-STEP fio\r\n[  1.2] virtio_blk: noise EMU-FIO-JSON-BEGIN\r\n"
        "fio: a note before the report\n"
        '{"jobs": [{"jobname": "a", "error": 0, "job_runtime": 5,\n'
        '  "read": {"io_bytes": 4096, "total_ios": 1, "iops": 200.0, "bw_bytes": 819200,\n'
        '           "lat_ns": {"mean": 5000.0},\n'
        '           "clat_ns": {"percentile": {"99.000000": 6000}}},\n'
        '  "write": {"io_bytes": 0, "total_ios": 0, "iops": 0, "bw_bytes": 0}}]}\n'
        "EMU-FIO-JSON-END\nEMU-RESULT fio.rc 0\n"
    )
    (job,) = jobs_of(parse_report(console)).values()
    assert job.read.ios == 1 and job.read.io_bytes == 4096
    assert job.read.lat_mean_us == 5.0 and job.read.lat_p99_us == 6.0
    assert job.write.ios == 0
    with pytest.raises(FioError):
        parse_report("EMU-DONE rc=0\n")
    with pytest.raises(FioError):
        parse_report("EMU-FIO-JSON-BEGIN\n{not json\nEMU-FIO-JSON-END\n")


@pytest.mark.parametrize("kind", ["uml", "microvm"])
def test_fio_on_emu_blk(kind: str, fio_files, tmp_path: Path) -> None:
    if kind == "microvm" and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    jobs = [
        FioJob("w", rw="randwrite", bs="4k", iodepth=4, size="1m", ioengine="libaio"),
        FioJob("r", rw="read", bs="64k", iodepth=1, size="2m", ioengine="psync"),
        FioJob("u", rw="randread", bs="4k", iodepth=8, size="4m", ioengine="io_uring", runtime=1),
    ]
    (dev,) = make_devices([f"blk:{disk}"])
    server = VhostUserServer(dev, tmp_path / "blk.sock").start()
    try:
        res = run_fio(kind, [f"blk:{server.path}"], jobs, timeout=TIMEOUT[kind])
    finally:
        server.close()
        dev.close()
    w, r, u = (res.jobs[n] for n in "wru")
    assert [j.error for j in (w, r, u)] == [0, 0, 0]
    assert (w.write.io_bytes, w.write.ios, w.read.ios) == (1 << 20, 256, 0)
    assert (r.read.io_bytes, r.read.ios, r.write.ios) == (2 << 20, 32, 0)
    assert u.read.ios > 0 and u.read.iops > 0 and u.write.ios == 0
    assert 900 <= u.runtime_ms <= 3000  # time based: ran for its second, not to `size`
    engines = {j["jobname"]: j["job options"]["ioengine"] for j in res.report["jobs"]}
    assert engines == {"w": "libaio", "r": "psync", "u": "io_uring"}
    options = res.report["global options"]
    assert options["filename"] == "/dev/vda" and options["direct"] == "1"
    # fio's random write buffers reached the file (only its first MiB was written)
    data = disk.read_bytes()
    assert data[: 1 << 20].count(0) < (1 << 20) // 2
    assert data[1 << 20 :].count(0) == len(data) - (1 << 20)
