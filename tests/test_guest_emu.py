"""Real Linux guests (UML, QEMU microvm) on emu's own vhost-user backends.

Per guest kind and ring mode, two guests boot at once. Guest A has emu's blk, net and
console (UML) or rng (microvm; QEMU 7.2 has no vhost-user console, UML no virtio-rng
driver); guest B has only a net device, joined to A's by emu's cable. Checked: every
device is bound by its Linux driver; the features the guest negotiated are the ring
mode's (seen by the guest in sysfs and by the backend in SET_FEATURES); the pattern the
guest wrote through virtio-blk is in the host file; hvc0 output reaches the host; rng
bytes reach the guest; the two guests ping each other across the cable.

Ring features are withheld the way `emu serve` does it (spec options `packed=off`,
`event_idx=off`, `indirect=off`); UML's virtio_uml hands the backend's features to its
guest as they are. QEMU's devices also get the mode as their own properties (see
guest_device).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from emu.backends.chardev import BufferChar
from emu.backends.tap import host_tap as tap_interface
from emu.commands.serve import make_devices
from emu.devices.base import VirtioDevice
from emu.devices.console import ConsoleDevice
from emu.devices.net import NetDevice
from emu.devices.registry import parse_spec
from emu.guest import GuestImage, GuestResult, build_image, run_guest
from emu.guest.devices import Device
from emu.guest.packages import PackageError
from emu.ringdefs import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED
from emu.vhost_user.backend import VhostUserServer

DISK_MIB = 64
PATTERN_MIB = 4
HVC_MARKER = "hello-from-emu-guest"
TIMEOUT = {"uml": 30.0, "microvm": 45.0}
RING_BITS = {"packed": F_RING_PACKED, "event_idx": F_EVENT_IDX, "indirect": F_INDIRECT_DESC}


@dataclass(frozen=True)
class Mode:
    """Which ring features the backends offer (the guest takes all that are offered)."""

    packed: bool
    event_idx: bool
    indirect: bool

    @property
    def options(self) -> str:
        """`emu serve` spec options withholding what this mode leaves out."""
        return "".join(f",{name}=off" for name in RING_BITS if not getattr(self, name))

    def check(self, features: int, what: str) -> None:
        for name, bit in RING_BITS.items():
            assert bool(features >> bit & 1) == getattr(self, name), f"{what}: {name}"


MODES = [
    pytest.param(Mode(packed=True, event_idx=True, indirect=True), id="packed"),
    pytest.param(Mode(packed=False, event_idx=False, indirect=False), id="split-plain"),
    pytest.param(Mode(packed=True, event_idx=False, indirect=False), id="packed-plain"),
    pytest.param(Mode(packed=False, event_idx=True, indirect=True), id="split"),
]

#: guest /init script (the `script` workload): address eth0, ping the peer until it
#: answers three times, then stay up until the peer has had three answers from us
PAIR_SCRIPT = r"""
echos() {
  awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i }
                  else { print $c; exit } }' /proc/net/snmp
}
ip link set lo up
wait_for /sys/class/net/eth0 || return 1
ip link set eth0 up && ip addr add "$(arg emu.pair.ip x)" dev eth0 || return 1
result pair.mac "$(cat /sys/class/net/eth0/address)"
ping -c 3 -i 0.2 -w 30 "$(arg emu.pair.peer x)" > /tmp/ping 2>&1; rc=$?
tail -n 2 /tmp/ping
result pair.ping_rc $rc
n=0
while [ "$(echos)" -lt 3 ]; do
  n=$((n + 1)); [ $n -gt 600 ] && { warn "the peer never pinged"; return 1; }
  sleep 0.05
done
result pair.echos "$(echos)"
return $rc
"""


@pytest.fixture(scope="module", params=["uml", "microvm"])
def image(request: pytest.FixtureRequest) -> GuestImage:
    if request.param == "microvm" and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    try:
        return build_image(request.param)
    except PackageError as e:
        pytest.skip(f"guest packages unavailable: {e}")


@contextmanager
def serving(devices: dict[str, VirtioDevice], tmp: Path) -> Iterator[dict[str, VhostUserServer]]:
    """One in-process vhost-user server per device, on ``tmp/<name>.sock``."""
    with ExitStack() as stack:
        servers = {}
        for name, dev in devices.items():
            stack.callback(dev.close)
            servers[name] = VhostUserServer(dev, tmp / f"{name}.sock").start()
            stack.callback(servers[name].close)
        yield servers


def guest_device(kind: str, mode: Mode, server: VhostUserServer, dev: VirtioDevice) -> Device:
    """What run_guest attaches. QEMU's devices get the mode as properties: it offers packed
    rings only with packed=on, and its vhost-user-rng offers its guest whatever its own
    properties say without asking the backend. Its virtio-net keeps its own MAC, which
    must be the one emu's device filters on."""
    vtype = {1: "net", 2: "blk", 3: "console", 4: "rng"}[dev.device_id]
    options: list[str] = []
    if kind == "microvm":
        on = {True: "on", False: "off"}
        options += [f"packed={on[mode.packed]}", f"event_idx={on[mode.event_idx]}"]
        options.append(f"indirect_desc={on[mode.indirect]}")
        if isinstance(dev, NetDevice):
            options.append("mac=" + dev.default_mac.hex(":"))
    return Device(vtype, server.path, tuple(options))


def boot_pair(
    kind: str, image: GuestImage, mode: Mode, disk: Path, tmp: Path
) -> tuple[GuestResult, GuestResult, dict[str, VhostUserServer], BufferChar]:
    """Boots guests A and B at once on fresh backends; returns both results."""
    opts = mode.options
    blk, net_a, net_b = make_devices([f"blk:{disk}{opts}", f"net:cable{opts}", f"net:cable{opts}"])
    devices: dict[str, VirtioDevice] = {"blk": blk, "net_a": net_a, "net_b": net_b}
    chardev = BufferChar()
    if kind == "uml":
        devices["console"] = console = ConsoleDevice(chardev, queue_max_size=1024)
        console.features &= ~parse_spec(f"console{opts}").withheld
    else:
        (devices["rng"],) = make_devices([f"rng{opts}"])
    script = base64.b64encode(PAIR_SCRIPT.encode()).decode()
    with serving(devices, tmp) as servers:
        attach = {n: guest_device(kind, mode, servers[n], d) for n, d in devices.items()}
        extra = "hvc" if kind == "uml" else "rng"
        a_devices = [attach[n] for n in devices if n != "net_b"]
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(
                run_guest,
                kind,
                a_devices,
                ["devices", "blk", extra, "script"],
                params={
                    "blk.mib": PATTERN_MIB,
                    "hvc.marker": HVC_MARKER,
                    "pair.ip": "10.0.9.1/24",
                    "pair.peer": "10.0.9.2",
                    "script": script,
                },
                image=image,
                timeout=TIMEOUT[kind],
            )
            b = pool.submit(
                run_guest,
                kind,
                [attach["net_b"]],
                ["devices", "script"],
                params={"pair.ip": "10.0.9.2/24", "pair.peer": "10.0.9.1", "script": script},
                image=image,
                timeout=TIMEOUT[kind],
            )
            return a.result(), b.result(), servers, chardev


def explain(res: GuestResult) -> str:
    return (
        f"{res.kind}: rc={res.rc} exit={res.exit_status} timed_out={res.timed_out} "
        f"boot={res.boot_s} wall={res.wall_s:.1f}\n{res.console}"
    )


def guest_features(res: GuestResult, driver: str) -> int:
    """The features the guest's driver negotiated (sysfs: one '0'/'1' per bit)."""
    (bits,) = [d["features"] for d in res.log.devices.values() if d["driver"] == driver]
    return sum(1 << i for i, c in enumerate(bits) if c == "1")


@pytest.mark.parametrize("mode", MODES)
def test_guests_on_emu_backends(image: GuestImage, tmp_path: Path, mode: Mode) -> None:
    kind = image.kind
    block = b"".join(hashlib.sha256(b"emu %d" % i).digest() for i in range(128))
    head = block * (PATTERN_MIB << 8)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(head)
        f.truncate(DISK_MIB << 20)

    a, b, servers, chardev = boot_pair(kind, image, mode, disk, tmp_path)
    assert a.ok, explain(a)
    assert b.ok, explain(b)

    drivers = {"virtio_blk", "virtio_net", "virtio_console" if kind == "uml" else "virtio_rng"}
    assert {d["driver"] for d in a.log.devices.values()} == drivers, explain(a)
    assert [d["driver"] for d in b.log.devices.values()] == ["virtio_net"], explain(b)
    for res, driver, server in [
        (a, "virtio_blk", servers["blk"]),
        (a, "virtio_net", servers["net_a"]),
        (b, "virtio_net", servers["net_b"]),
        *([(a, "virtio_console", servers["console"])] if kind == "uml" else []),
        *([(a, "virtio_rng", servers["rng"])] if kind == "microvm" else []),
    ]:
        mode.check(guest_features(res, driver), f"{driver} in the guest")
        assert server.negotiated, f"{driver}: the backend saw no SET_FEATURES"
        mode.check(server.negotiated[-1], f"{driver} at the backend")

    assert a.results["blk.read_sha256"] == hashlib.sha256(head).hexdigest()
    written = a.results["blk.write_sha256"]
    assert a.results["blk.readback_sha256"] == written
    with open(disk, "rb") as f:
        assert hashlib.sha256(f.read(PATTERN_MIB << 20)).hexdigest() == written

    if kind == "uml":
        assert chardev.wait_output(len(HVC_MARKER)) == HVC_MARKER.encode()
    else:
        assert a.results["rng.bytes"] == "16384"
        assert a.results["rng.distinct"] == "256"

    for res in (a, b):
        assert res.results["pair.ping_rc"] == "0", explain(res)
    assert a.results["pair.mac"] != b.results["pair.mac"]


def test_serve_spec_options_withhold_ring_features(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    plain, some = make_devices([f"blk:{disk}", f"blk:{disk},packed=off,indirect=off"])
    assert parse_spec("rng,event_idx=off,event_idx=on").withheld == 0
    assert plain.features & ~some.features == 1 << F_RING_PACKED | 1 << F_INDIRECT_DESC
    for bad in ("rng,packed", "rng,packed=no", "rng,in_order=off"):
        with pytest.raises(click.BadParameter):
            make_devices([bad])


@contextmanager
def host_tap(name: str, address: str) -> Iterator[str]:
    """A TAP interface on the host with `address` (root only); removed afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("creating a TAP interface needs root, /dev/net/tun and ip(8)")
    with tap_interface(name, address):
        yield name


def test_emu_guest_run_starts_emu_backends(image: GuestImage, tmp_path: Path) -> None:
    """`emu guest run --emu SPEC` serves emu's devices itself: blk, hvc0 to its stdout
    (UML) or rng (microvm), and a NIC on a host TAP that the guest pings."""
    kind = image.kind
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(DISK_MIB << 20))
    marker = "emu-cli-hvc-ok"
    extra = ["--emu", "console"] if kind == "uml" else ["--emu", "rng,indirect=off"]
    with host_tap(f"emutap{kind[0]}{os.getpid() % 1000}", "10.0.8.1/24") as tap:
        cmd = [sys.executable, "-m", "emu.cli", "guest", "run", "--kind", kind]
        cmd += ["--kernel", str(image.kernel), "--initrd", str(image.initrd)]
        cmd += ["--emu", f"blk:{disk},event_idx=off", *extra, "--emu", f"net:tap:{tap}"]
        cmd += ["--run", "devices,blk," + ("hvc" if kind == "uml" else "rng") + ",net"]
        cmd += ["--param", f"hvc.marker={marker}", "--param", "net.ip=10.0.8.2/24"]
        cmd += ["--param", "net.peer=10.0.8.1", "--timeout", str(TIMEOUT[kind])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT[kind] + 30)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "EMU-RESULT net.ping_rc 0" in log
    assert "EMU-RESULT blk.rc 0" in log
    if kind == "uml":
        assert f"\n{marker}" in out.stdout  # emu serve's console, not the guest's echo
        assert "driver=virtio_console" in log
    else:
        assert "EMU-RESULT rng.distinct 256" in log
