"""QEMU microvm command lines (TCG), with devices on ACPI-described virtio-mmio.

Guest RAM is a shared memfd because vhost-user backends map it; the modern (v2) mmio
transport is forced because QEMU 7.2 microvm defaults to legacy, which vhost-user
backends refuse. `tsc_early_khz`/`tsc=reliable` avoid the TCG boot hang in PIT-based TSC
calibration (shared/reference/qemu-microvm-facts.md, "the TSC calibration trap").

A guest always has room for a second vCPU (`maxcpus` of at least 2), even when it runs
one: QEMU 7.2's TCG translates a machine that can only ever have one vCPU without the
guest's memory barriers and with its locked instructions as plain loads and stores
(CF_PARALLEL is set only when max_cpus > 1; QEMU 8.1 keeps the barriers, commit
"tcg: Do not elide memory barriers for !CF_PARALLEL in system mode"). A vhost-user
backend is another host thread on the same rings, so virtio's event-index handshake
(the driver writes used_event, fences, reads used->idx; the device the other way round)
then loses a notification now and then: a guest waits for good for requests the device
answered and signalled. Seen here as fio runs on emu that stopped dead (three in about a
hundred microvm boots; emu serve's SIGUSR1 report: used->idx 32 ahead of used_event, every
entry signalled, and QEMU's own view: no interrupt pending, the vCPU halted).
"""

from __future__ import annotations

import functools
import re
import subprocess

from emu.guest.devices import Device
from emu.guest.images import GuestImage

QEMU = "qemu-system-x86_64"

_VHOST_USER_DEVICE = {
    "blk": "vhost-user-blk",
    "rng": "vhost-user-rng",
    "vsock": "vhost-user-vsock-device",
    "fs": "vhost-user-fs-device",
}
#: the tag of an fs device given none (what /init's fs workload mounts by default)
DEFAULT_FS_TAG = "emu"


@functools.cache
def host_tsc_khz() -> int:
    """The host's TSC rate: under TCG the guest TSC ticks at this rate.

    The kernel's own figure (dmesg "tsc: Refined ..."/"Detected ...") is preferred; when
    the log is unreadable or has rotated, /proc/cpuinfo's "cpu MHz" is close enough for
    a constant TSC.
    """
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        log = ""
    for pattern in (
        r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz",
        r"tsc: Detected ([\d.]+) MHz",
    ):
        found = re.findall(pattern, log)
        if found:
            return round(float(found[-1]) * 1000)
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), re.M)
    if not m:
        raise RuntimeError("cannot tell the host TSC rate (no dmesg line, no cpu MHz)")
    return round(float(m.group(1)) * 1000)


def _device_args(i: int, dev: Device) -> list[str]:
    opts = "".join("," + o for o in dev.options)
    if dev.type == "fs" and dev.tag is None:
        opts += f",tag={DEFAULT_FS_TAG}"
    chardev = ["-chardev", f"socket,id=vu{i},path={dev.path}"]
    if dev.type in _VHOST_USER_DEVICE:
        return [*chardev, "-device", f"{_VHOST_USER_DEVICE[dev.type]},chardev=vu{i}{opts}"]
    if dev.type == "net":
        return [
            *chardev,
            *("-netdev", f"vhost-user,id=net{i},chardev=vu{i}"),
            *("-device", f"virtio-net-device,netdev=net{i}{opts}"),
        ]
    if dev.type == "qemu-blk":
        return [
            *("-drive", f"id=d{i},file={dev.path},format=raw,if=none"),
            *("-device", f"virtio-blk-device,drive=d{i}{opts}"),
        ]
    if dev.type == "qemu-net":
        return ["-netdev", f"user,id=net{i}", "-device", f"virtio-net-device,netdev=net{i}{opts}"]
    if dev.type == "qemu-rng":
        return [
            *("-object", f"rng-random,id=rng{i},filename={dev.path}"),
            *("-device", f"virtio-rng-device,rng=rng{i}{opts}"),
        ]
    if dev.type == "qemu-console":
        return [
            *("-device", f"virtio-serial-device{opts}"),
            *("-chardev", f"file,id=con{i},path={dev.path}"),
            *("-device", f"virtconsole,chardev=con{i}"),
        ]
    raise ValueError(f"QEMU 7.2 has no vhost-user {dev.type} device for microvm")


def command(
    image: GuestImage, devices: list[Device], append: list[str], mem_mib: int, cpus: int = 1
) -> list[str]:
    args = [
        QEMU,
        *("-M", "microvm,acpi=on,memory-backend=mem"),
        *("-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        *("-m", f"{mem_mib}M", "-accel", "tcg", "-cpu", "max"),
        *("-smp", f"{cpus},maxcpus={max(cpus, 2)}"),  # keeps TCG's barriers (docstring)
        *("-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"),
        *("-no-reboot", "-serial", "stdio"),
        *("-global", "virtio-mmio.force-legacy=false"),
        *("-kernel", str(image.kernel), "-initrd", str(image.initrd)),
    ]
    for i, dev in enumerate(devices):
        args += _device_args(i, dev)
    kernel_args = ["console=ttyS0", f"tsc_early_khz={host_tsc_khz()}", "tsc=reliable", "panic=-1"]
    return [*args, "-append", " ".join([*kernel_args, "rdinit=/init", *append])]
