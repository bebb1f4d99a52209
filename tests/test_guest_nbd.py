"""Real guests on emu's blk over NBD network storage (nbdkit), and on a multi-queue blk.

One UML boot (the cheapest guest) with two disks, each an `emu serve` blk device on its
own nbdkit export, served by the same code path `emu guest run --emu blk:nbd...` takes
(emu.guest.backends.emu_backends starts `emu serve` with the specs):

* /dev/vda: nbdkit's file plugin over a host file. The guest writes a random pattern
  and reads it back (the `blk` workload); after the guest is gone the host file must hold
  the pattern the guest wrote, so the data went guest -> emu -> NBD -> nbdkit -> file.
* /dev/vdb: nbdkit's memory plugin behind the delay filter (1 ms per read and write),
  real network-storage latency. fio runs there (random writes, then time-based random
  reads at depth 8 with io_uring); its report must show the requests done.

Multi-queue needs a guest with as many CPUs as queues (Linux's virtio_blk uses at most
one queue per CPU), so that one is a 2-vCPU microvm on `blk:FILE:queues=2`, attached the
way `emu guest run --emu` attaches it (QEMU told num-queues=2). The guest sees two
hardware queues in /sys/block/vda/mq; two fio jobs (numjobs=2) read at once, and the
in-process device counts the requests each queue popped: both served some.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest

from emu.commands.serve import make_devices
from emu.guest import build_image, run_guest
from emu.guest.backends import emu_backends, guest_devices
from emu.guest.fio import FioJob, jobs_of, kernel_params, parse_report
from emu.guest.packages import PackageError
from emu.vhost_user.backend import VhostUserServer

DISK_MIB = 16
PATTERN_MIB = 4


@pytest.fixture(scope="module")
def uml_fio_image():
    try:
        return build_image("uml", fio=True)
    except PackageError as e:
        pytest.skip(f"guest image unavailable: {e}")


def test_uml_guest_on_nbd_storage(nbd_server, uml_fio_image, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    files = nbd_server(["file", f"file={disk}"])
    slow = nbd_server(
        ["memory", "32M"], filters=["delay"], params=["rdelay=1ms", "wdelay=1ms"], threads=16
    )
    jobs = [
        FioJob("w", rw="randwrite", bs="4k", iodepth=8, size="1m", ioengine="libaio"),
        FioJob("r", rw="randread", bs="4k", iodepth=8, size="1m", ioengine="io_uring", runtime=1),
    ]
    params = {"blk.mib": PATTERN_MIB, "fio.dev": "/dev/vdb", **kernel_params(jobs)}
    specs = [f"blk:{files.uri}", f"blk:{slow.uri}"]
    with emu_backends("uml", specs, tmp_path) as devices:
        res = run_guest(
            "uml", devices, ["blk", "fio"], params=params, image=uml_fio_image, timeout=90
        )
    assert res.ok, res.console[-3000:]
    # the disks are the right way round: vda is the file export's 16 MiB
    assert res.results["blk.sectors"] == str(DISK_MIB << 11)
    written = res.results["blk.write_sha256"]
    assert res.results["blk.readback_sha256"] == written
    with open(disk, "rb") as f:
        assert hashlib.sha256(f.read(PATTERN_MIB << 20)).hexdigest() == written

    fio = jobs_of(parse_report(res.console))
    w, r = fio["w"], fio["r"]
    assert (w.error, r.error) == (0, 0)
    assert (w.write.io_bytes, w.write.ios, w.read.ios) == (1 << 20, 256, 0)
    assert r.read.ios > 0 and r.write.ios == 0
    # every read waited for nbdkit's delay: the latency is the storage's, not emu's
    assert r.read.lat_mean_us >= 1000


#: guest script: the disk's hardware queues as the block layer sees them
MQ_SCRIPT = r"""
wait_for /dev/vda || return 1
result mq.queues "$(ls /sys/block/vda/mq | wc -l)"
result mq.cpus "$(grep -c ^processor /proc/cpuinfo)"
"""


class _Counting:
    """A ring seen through, counting the chains popped from it (blk's native plane pops
    from the ring itself, not through Virtqueue.pop)."""

    def __init__(self, ring, index: int, popped: list[int]) -> None:
        self._ring, self._index, self._popped = ring, index, popped

    def pop(self, *args, **kwargs):
        batch = self._ring.pop(*args, **kwargs)
        self._popped[self._index] += len(batch.heads)
        return batch

    def __getattr__(self, name: str):
        return getattr(self._ring, name)


def test_microvm_guest_uses_two_queues(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (scripts/install-guest-deps.sh)")
    try:
        image = build_image("microvm", fio=True)
    except PackageError as e:
        pytest.skip(f"guest image unavailable: {e}")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    spec = f"blk:{disk}:queues=2"
    (dev,) = make_devices([spec])
    popped = [0] * len(dev.queues)
    for q in dev.queues:  # count each queue's requests as the device takes them from the ring

        def start(*args, _q=q, _start=q.start, **kwargs) -> None:
            _start(*args, **kwargs)
            _q.ring = _Counting(_q.ring, _q.index, popped)

        q.start = start
    server = VhostUserServer(dev, tmp_path / "blk.sock").start()
    (attach,) = guest_devices("microvm", [spec], [server.path])
    assert "num-queues=2" in attach.options
    jobs = [
        FioJob("r", rw="randread", bs="4k", iodepth=4, numjobs=2, size="4m", runtime=2),
    ]
    params = {"script": base64.b64encode(MQ_SCRIPT.encode()).decode(), **kernel_params(jobs)}
    try:
        res = run_guest(
            "microvm",
            [attach],
            ["script", "fio"],
            params=params,
            image=image,
            cpus=2,
            timeout=120,
        )
        # where a guest that never reaches /init stopped: before or after emu's part (a
        # 2-vCPU TCG boot hung once in CI with nothing on the console)
        seen = f"device {dev.run_state.name}, queues started {[q.started for q in dev.queues]}"
    finally:
        server.close()
        dev.close()
    assert res.ok, f"{seen}, popped {popped}\n{res.console[-3000:]}"
    assert res.results["mq.cpus"] == "2" and res.results["mq.queues"] == "2"
    (r,) = jobs_of(parse_report(res.console)).values()
    assert r.error == 0 and r.read.ios > 0
    assert all(n > 0 for n in popped), popped
