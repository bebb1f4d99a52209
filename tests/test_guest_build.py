"""The guest layer's building blocks: cpio writer, module order, initramfs, command lines.

The cpio writer is checked twice: by a reader written here from the newc spec and by
GNU cpio(1). Module order and initramfs contents use the real Debian packages (fetched into
emu's cache on first use; skipped when no package can be had).
"""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from emu.guest import images, microvm, uml
from emu.guest.console import ConsoleLog
from emu.guest.cpio import CpioWriter
from emu.guest.devices import Device
from emu.guest.images import GuestImage
from emu.guest.init_script import INIT
from emu.guest.modules import Module, canonical, resolve
from emu.guest.packages import PackageError, first_dependency, unpacked
from emu.guest.run import kernel_args, run_guest


def read_newc(data: bytes) -> dict[str, dict]:
    """name -> {mode, rdev, data, nlink}; stops at the trailer, checks padding and magic."""
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        assert data[name_end - 1] == 0
        start = name_end + (-name_end % 4)
        body = data[start : start + filesize]
        pos = start + filesize + (-(start + filesize) % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out[name] = {"mode": f[1], "nlink": f[4], "rdev": (f[9], f[10]), "data": body}


def sample_archive() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.dir("bin")
    w.dir("dev")
    w.dir("tmp", 0o1777)
    w.file("bin/tool", b"x" * 5, 0o755)
    w.file("empty", b"")
    w.symlink("bin/sh", "/bin/tool")
    w.chardev("dev/console", 5, 1)
    w.close()
    return buf.getvalue()


def test_cpio_round_trip():
    entries = read_newc(sample_archive())
    assert list(entries) == ["bin", "dev", "tmp", "bin/tool", "empty", "bin/sh", "dev/console"]
    assert stat.S_ISDIR(entries["bin"]["mode"]) and entries["bin"]["nlink"] == 2
    assert entries["tmp"]["mode"] & 0o7777 == 0o1777
    assert entries["bin/tool"]["data"] == b"xxxxx"
    assert entries["bin/tool"]["mode"] == stat.S_IFREG | 0o755
    assert entries["empty"]["data"] == b""
    assert stat.S_ISLNK(entries["bin/sh"]["mode"]) and entries["bin/sh"]["data"] == b"/bin/tool"
    assert stat.S_ISCHR(entries["dev/console"]["mode"])
    assert entries["dev/console"]["rdev"] == (5, 1)


def test_cpio_is_reproducible_and_refuses_duplicates():
    assert sample_archive() == sample_archive()
    w = CpioWriter(io.BytesIO())
    w.dir("a")
    with pytest.raises(ValueError):
        w.dir("/a/")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_read_by_gnu_cpio():
    res = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=sample_archive(), capture_output=True, check=True
    )
    lines = res.stdout.decode().splitlines()
    assert [line.split()[-1] for line in lines[:5]] == ["bin", "dev", "tmp", "bin/tool", "empty"]
    assert lines[5].startswith("lrwxrwxrwx") and lines[5].endswith("bin/sh -> /bin/tool")
    assert lines[6].startswith("crw-------") and "5," in lines[6]


def _fake_modules(monkeypatch, deps: dict[str, tuple[str, ...]]) -> None:
    monkeypatch.setattr("emu.guest.modules.index", lambda root: {n: Path(n) for n in deps})
    monkeypatch.setattr("emu.guest.modules.load_module", lambda p: Module(p.name, p, deps[p.name]))


def test_resolve_orders_dependencies_first_and_skips_builtins(monkeypatch):
    _fake_modules(monkeypatch, {"a": ("b", "virtio"), "b": ("c",), "c": (), "d": ("c",)})
    order = [m.name for m in resolve(Path("/x"), ["d", "a"], {"virtio"})]
    assert order == ["c", "d", "b", "a"]


def test_resolve_reports_cycles_and_missing(monkeypatch):
    _fake_modules(monkeypatch, {"a": ("b",), "b": ("a",), "c": ("zz",)})
    with pytest.raises(ValueError, match="cycle"):
        resolve(Path("/x"), ["a"])
    with pytest.raises(LookupError, match="zz"):
        resolve(Path("/x"), ["c"])


def _package(name: str) -> Path:
    try:
        return unpacked(name)[0]
    except PackageError as e:
        pytest.skip(f"Debian package {name} unavailable: {e}")


@pytest.fixture(scope="module")
def cloud_modules() -> Path:
    try:
        name = first_dependency("linux-image-cloud-amd64")
    except PackageError as e:
        pytest.skip(f"linux-image-cloud-amd64 unavailable: {e}")
    return next((_package(name) / "lib/modules").iterdir())


def test_module_order_from_real_modinfo(cloud_modules):
    mods = resolve(cloud_modules, images.WANTED["microvm"])
    assert [m.name for m in mods] == [
        "virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover",
        "virtio_net", "virtio_console", "virtio_rng", "vsock",
        "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport", "fuse", "virtiofs",
    ]  # fmt: skip
    byname = {m.name: m for m in mods}
    assert set(byname["virtio_net"].depends) == {"virtio_ring", "virtio", "net_failover"}
    assert byname["virtio_rng"].path.name == "virtio-rng.ko"
    assert canonical("virtio-rng") == "virtio_rng"


def test_uml_virtio_core_is_builtin():
    root = _package("user-mode-linux")
    moddir = next((root / "usr/lib/uml/modules").iterdir())
    names = [
        m.name for m in resolve(moddir, images.WANTED["uml"], images.modules.builtin_names(moddir))
    ]
    assert "virtio" not in names and "virtio_ring" not in names
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")


@pytest.fixture(scope="module")
def microvm_image() -> GuestImage:
    try:
        return images.build_image("microvm")
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


def test_initramfs_contents(microvm_image):
    entries = read_newc(gzip.decompress(microvm_image.initrd.read_bytes()))
    assert entries["init"]["data"].decode() == INIT
    assert entries["init"]["mode"] == stat.S_IFREG | 0o755
    assert entries["dev/console"]["rdev"] == (5, 1)
    assert entries["bin/sh"]["data"] == b"/bin/busybox"
    for applet in ("sbin/insmod", "sbin/poweroff", "usr/bin/sha256sum", "sbin/ip", "bin/ping"):
        assert stat.S_ISLNK(entries[applet]["mode"]), applet
    order = entries["etc/emu/modules"]["data"].decode().split()
    assert order[:3] == ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko"]
    assert all(f"lib/modules/{m}" in entries for m in order)
    for name in entries:  # the kernel needs each parent directory before its children
        parent = name.rpartition("/")[0]
        assert not parent or stat.S_ISDIR(entries[parent]["mode"]), name


def test_init_script_parses_under_busybox():
    busybox = _package("busybox-static") / "bin/busybox"
    res = subprocess.run([str(busybox), "sh", "-n"], input=INIT.encode(), capture_output=True)
    assert res.returncode == 0, res.stderr.decode()


def test_console_markers():
    log = ConsoleLog()
    lines = [
        "[    1.0] random kernel line",
        "EMU-INIT-START",
        "EMU-STEP devices",
        "EMU-DEV virtio0 device=0x0002 vendor=0xffffffff driver=virtio_blk features=0110",
        "[    2.0] virtio_blk: noise EMU-RESULT blk.sectors 131072\r",
        "EMU-BENCH blk_read_4k 7000 IOPS",
        "EMU-WARN /dev/hvc0 did not appear",
        "EMU-DONE rc=3",
    ]
    kinds = [log.feed(line) for line in lines]
    assert kinds == [None, "INIT-START", "STEP", "DEV", "RESULT", "BENCH", "WARN", "DONE"]
    assert log.started and log.rc == 3 and log.steps == ["devices"]
    assert log.devices["virtio0"]["driver"] == "virtio_blk"
    assert log.results == {"blk.sectors": "131072"}
    assert log.bench == {"blk_read_4k": (7000.0, "IOPS")}
    assert log.warnings == ["/dev/hvc0 did not appear"]


def test_kernel_args():
    args = kernel_args(["devices", "blk"], {"blk.mib": 8, "emu.net.ip": "10.0.0.2/24"}, True)
    assert args == ["quiet", "emu.run=devices,blk", "emu.blk.mib=8", "emu.net.ip=10.0.0.2/24"]
    with pytest.raises(ValueError):
        kernel_args([], {"x": "a b"}, False)


def test_device_parse():
    assert Device.parse("blk:/run/b.sock") == Device("blk", "/run/b.sock")
    assert Device.parse(("net", Path("/n"))) == Device("net", "/n")
    assert Device.parse("blk:/s,packed=on").options == ("packed=on",)
    for bad in ("blk", "blk:", "floppy:/x"):
        with pytest.raises(ValueError):
            Device.parse(bad)


FAKE = GuestImage("uml", Path("/k/linux"), Path("/k/initrd"), "6.1", {})


def test_uml_command():
    cmd = uml.command(FAKE, [Device("blk", "/b"), Device("console", "/c")], ["emu.run=blk"], 256)
    assert cmd[0] == "/k/linux" and "mem=256M" in cmd and "initrd=/k/initrd" in cmd
    assert "con0=fd:0,fd:1" in cmd and cmd[-1] == "emu.run=blk"
    assert "virtio_uml.device=/b:2" in cmd and "virtio_uml.device=/c:3" in cmd
    with pytest.raises(ValueError):
        uml.command(FAKE, [Device("qemu-blk", "/img")], [], 256)
    with pytest.raises(ValueError, match="one CPU"):
        uml.command(FAKE, [], [], 256, cpus=2)


def test_microvm_command():
    devs = [Device("blk", "/b", ("packed=on",)), Device("net", "/n"), Device("qemu-rng", "/r")]
    cmd = microvm.command(FAKE, devs, ["emu.run=blk"], 512)
    line = " ".join(cmd)
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in line
    assert "virtio-mmio.force-legacy=false" in line
    assert "-device vhost-user-blk,chardev=vu0,packed=on" in line
    assert "-netdev vhost-user,id=net1,chardev=vu1" in line
    assert "virtio-rng-device,rng=rng2" in line
    # one vCPU, and room for two: TCG keeps the guest's barriers (microvm's docstring)
    assert "-smp 1,maxcpus=2" in line
    assert "-smp 4,maxcpus=4" in " ".join(microvm.command(FAKE, [], [], 512, cpus=4))
    append = cmd[cmd.index("-append") + 1]
    assert f"tsc_early_khz={microvm.host_tsc_khz()}" in append and append.endswith("emu.run=blk")
    assert 100_000 < microvm.host_tsc_khz() < 10_000_000
    with pytest.raises(ValueError, match="console"):
        microvm.command(FAKE, [Device("console", "/c")], [], 512)


def test_run_guest_refuses_missing_socket_before_booting(tmp_path):
    with pytest.raises(FileNotFoundError, match="blk backend socket"):
        run_guest("uml", [("blk", tmp_path / "nobody.sock")], image=FAKE)
    with pytest.raises(ValueError, match="spaces"):
        run_guest("uml", [], params={"x": "a b"}, image=FAKE)
