"""Hosts on this machine: network namespaces joined by one switch, for migrations between
"hosts" that reach each other (and their storage) only over TCP.

    with Network(["storage", "src", "dst"]) as net:
        with net["storage"].entered():
            server = subprocess.Popen(...)   # runs in the storage host's namespace
        uri = f"nbd://{net['storage'].address}:10809/"

Each host is a namespace of its own with one interface, ``eth0``, whose peer is a port
of a bridge in a further namespace (the switch). Nothing is joined to the machine's own
namespace and no host has a default route, so no packet of theirs can leave the machine:
the addresses exist only inside these namespaces.

Processes go into a host by ``Host.entered()``: the calling thread joins the namespace
(setns(2) acts on one thread), so whatever it starts meanwhile (QEMU, emu serve, nbdkit,
each under its usual launcher) is born there; the thread goes back on exit. Unix sockets
(vhost-user, QMP) are paths in the one filesystem and work across namespaces.

Names are unique per run (``emu-<pid>-<n>-<host>``); ``Network`` first deletes namespaces
left by runs whose process is gone, and ends what still runs in them, so a crashed run
does not hold anything for long.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
PREFIX = "emu-"
#: one /24 that exists only inside the namespaces (hosts .1, .2, ...)
SUBNET = "10.213.7"
_runs = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class NetnsError(RuntimeError):
    """A namespace, link or address could not be made."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


class Host:
    """One namespace with one address on the switch."""

    def __init__(self, name: str, netns: str, address: str) -> None:
        self.name, self.netns, self.address = name, netns, address
        self.path = NETNS_DIR / netns

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread is in this host's namespace for the block (and children it
        starts meanwhile stay there)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def inode(self) -> int:
        """The namespace's identity, as /proc/PID/ns/net of a process in it shows it."""
        return os.stat(self.path).st_ino


def in_host(pid: int, host: Host) -> bool:
    """Whether process ``pid`` lives in ``host``'s namespace."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino == host.inode()


def _owner_alive(netns: str) -> bool:
    """emu-<pid>-...: whether the run that made it still exists."""
    pid = netns.removeprefix(PREFIX).split("-", 1)[0]
    return not pid.isdigit() or Path(f"/proc/{pid}").exists()


def _pids_in(netns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in res.stdout.split()]


def sweep_stale() -> list[str]:
    """Deletes the namespaces of runs whose process is gone, and ends what still runs in
    them (started by that run: a backend a killed test left serving); their names."""
    gone = []
    if NETNS_DIR.is_dir():
        for entry in sorted(NETNS_DIR.iterdir()):
            if entry.name.startswith(PREFIX) and not _owner_alive(entry.name):
                for pid in _pids_in(entry.name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    _ip("netns", "delete", entry.name)
                    gone.append(entry.name)
                except NetnsError:
                    pass
    return gone


class Network:
    """Hosts named ``names`` on one switch, addresses SUBNET.1, .2, ... in that order;
    everything is deleted on exit (and on a failure half way through setting up)."""

    def __init__(self, names: Sequence[str]) -> None:
        run = f"{PREFIX}{os.getpid()}-{next(_runs)}"
        self.switch = f"{run}-sw"
        self.hosts = {
            n: Host(n, f"{run}-{n}", f"{SUBNET}.{i}") for i, n in enumerate(names, start=1)
        }
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        sweep_stale()
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts.values()):
                self._add(host.netns)
                port = f"p{i}"
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", host.netns)  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)

    def close(self) -> None:
        """Deletes every namespace made (their veths go with them); never raises."""
        while self._made:
            try:
                _ip("netns", "delete", self._made.pop())
            except NetnsError:
                pass

    def __exit__(self, *exc: object) -> None:
        self.close()


def netns_missing() -> str | None:
    """Why hosts cannot be made here (a skip reason), or None: tried for real."""
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed (scripts/install-guest-deps.sh)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        with Network(["probe"]) as net, net["probe"].entered():
            pass
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make network namespaces here: {e}"
    return None
