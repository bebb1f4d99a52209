"""Live migration between hosts with the disk on network storage (emu/testing/hostmig.py).

The hosts are network namespaces on one switch (emu/guest/netns.py): a storage host runs
nbdkit over the disk image, a source and a destination host each run ``emu serve`` on
``blk:nbd://STORAGE:10809/disk`` and a QEMU microvm (TCG) on it. The guest (the
``livemig`` workload: O_DIRECT sequence-numbered writes, a page cache filled during the
live passes) moves from the source to the destination over TCP between the namespaces,
under each quiesce policy; afterwards the destination guest checks every acknowledged
write and its page cache against an O_DIRECT read, and the image file on the storage
host is checked too. Each process must have run on its own host, and the storage host
must have had both backends as NBD clients, from their hosts' addresses.

The namespace plumbing is tested on its own first (no guest): isolation (no route out of
a host), placement, clean-up after a failure, and the sweep of a crashed run's leftovers.
Everything skips, with the reason, where namespaces cannot be made (not root, no ip).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from emu.backends import _nbd
from emu.guest import GuestImage, livemig
from emu.guest.netns import PREFIX, Host, Network, in_host, netns_missing, sweep_stale
from emu.testing import hostmig
from emu.testing.nbdkit import nbdkit_missing

#: as tests/test_guest_live.py: QEMU's first pass over 256 MiB takes a few seconds
BANDWIDTH = 16 << 20


@pytest.fixture(scope="module")
def hosts_possible() -> None:
    if (why := netns_missing()) is not None:
        pytest.skip(why)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_hosts_reach_each_other_only_on_the_switch(hosts_possible: None) -> None:
    with Network(["a", "b"]) as net:
        a, b = net["a"], net["b"]
        for host in (a, b):  # one route, the switch's subnet: nothing can leave the machine
            routes = subprocess.run(
                ["ip", "-n", host.netns, "route"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            assert [r.split()[0] for r in routes] == [f"{a.address.rsplit('.', 1)[0]}.0/24"]
        with a.entered():
            server = socket.create_server((a.address, 5000))
            sleeper = subprocess.Popen(["sleep", "30"])
        try:
            assert in_host(sleeper.pid, a) and not in_host(sleeper.pid, b)
            assert not in_host(threading.get_native_id(), a)  # the thread came back
            with b.entered(), socket.create_connection((a.address, 5000), timeout=5) as c:
                peer = server.accept()[0]
                c.sendall(b"over the switch")
                assert peer.recv(64) == b"over the switch"
                assert peer.getpeername()[0] == b.address
                peer.close()
        finally:
            sleeper.kill()
            sleeper.wait()
            server.close()
        made = {a.netns, b.netns, net.switch}
        assert made <= namespaces()
    assert not made & namespaces()


def test_a_failed_run_leaves_no_namespace_and_a_crashed_one_is_swept(hosts_possible: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Network(["x"]) as net:
        made = {net["x"].netns, net.switch}
        raise RuntimeError("boom")
    assert not made & namespaces()
    # a crashed run's namespace: named after a process that is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{PREFIX}{gone.pid}-0-src"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    left: subprocess.Popen | None = None
    try:
        with Host("src", stale, "").entered():  # what that run left serving
            left = subprocess.Popen(["sleep", "60"])
        assert stale in sweep_stale()
        assert stale not in namespaces()
        assert left.wait(10) == -signal.SIGKILL
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
        if left is not None and left.poll() is None:
            left.kill()
            left.wait()


def test_storage_host_serves_the_file_as_it_is_now(hosts_possible: None, tmp_path: Path) -> None:
    """What the migration relies on to raise the guest's flags: a write to the image file
    on the storage host is what the next NBD read from another host returns (nbdkit's
    file plugin keeps no cache), and an NBD write is in the file at once."""
    if (why := nbdkit_missing()) is not None:
        pytest.skip(why)
    disk = tmp_path / "disk.img"
    livemig.make_disk(disk)
    flag_at = (livemig.DISK_MIB << 20) - livemig.BLOCK
    with Network(hostmig.HOSTS) as net, hostmig.nbd_server(net["storage"], disk, tmp_path):
        with net["src"].entered():
            engine = _nbd.NbdEngine(hostmig.nbd_uri(net["storage"]))
        try:
            block = bytearray(livemig.BLOCK)
            assert engine.preadv([block], flag_at) == livemig.BLOCK and block == bytes(4096)
            for word in (b"EMU-FILL", b"EMU-STOP"):
                livemig.raise_flag(disk, word)
                engine.preadv([block], flag_at)
                assert block.startswith(word + b"\0")
            engine.pwritev([b"from src".ljust(livemig.BLOCK, b"\0")], 0)
            engine.flush()
            assert disk.read_bytes()[:9] == b"from src\0"
        finally:
            engine.close()


@pytest.mark.parametrize("policy", ["drain", "report"])
def test_live_migration_between_hosts_over_nbd(
    hosts_possible: None, microvm_image: GuestImage, tmp_path: Path, policy: str
) -> None:
    if (why := nbdkit_missing()) is not None:
        pytest.skip(why)
    with Network(hostmig.HOSTS) as net:
        run = hostmig.one_run(f"emu-{policy}", microvm_image, net, tmp_path, BANDWIDTH)
        src, dst = net["src"].address, net["dst"].address
    assert run["status"] == "completed", run
    assert run["passes"] >= 4  # several live passes, the page cache filled between them
    assert run["placed"], "a process ran outside its host"
    assert run["nbd_peers"] == {src, dst}, run["nbd_peers"]
    assert run["problems"] == [], (run["problems"], run["results"], run["console"])
    assert int(run["results"]["livemig.writes"]) > 0
    assert run["results"]["livemig.checked"] == str(
        min(int(run["results"]["livemig.writes"]), livemig.SLOTS)
    )
