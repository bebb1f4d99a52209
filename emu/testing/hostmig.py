"""Live migration between hosts with the disk on network storage, on one machine.

Three hosts (emu.guest.netns): ``storage`` runs nbdkit's file plugin over the disk image
and serves it over NBD on TCP; ``src`` and ``dst`` each run a vhost-user-blk backend on
that NBD export (``emu serve blk:nbd://STORAGE:PORT/EXPORT``, or qemu-storage-daemon with
an nbd blockdev) and a QEMU microvm on it. The guest runs the ``livemig`` workload
(emu/guest/livemig.py) and is migrated live from ``src`` to ``dst`` over TCP, exactly as
tests/test_guest_live.py migrates it on one host: so its sequence-numbered writes and its
page cache, filled during the live passes by the backend, are checked afterwards.

The host raises the workload's flags by writing the image file on the storage host:
nbdkit's file plugin keeps no cache of its own (each NBD read is a pread of the file) and
the guest reads the flag with O_DIRECT, so a flag written to the file is what the next
NBD read returns. The report policy's state file goes from the source's ``--state-dir``
to the destination's ``--restore-dir`` through one directory both hosts see (namespaces
share the filesystem; across real hosts, a shared filesystem).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from emu.guest import livemig, qsd, vm
from emu.guest.images import GuestImage
from emu.guest.netns import Host, Network, in_host
from emu.guest.proc import children
from emu.testing.nbdkit import Nbdkit

HOSTS = ("storage", "src", "dst")
BACKENDS = ("emu-drain", "emu-report", "qsd")
NBD_PORT = 10809
EXPORT = "disk"
MIGRATION_PORT = 4444


def nbd_uri(storage: Host) -> str:
    return f"nbd://{storage.address}:{NBD_PORT}/{EXPORT}"


@contextmanager
def nbd_server(storage: Host, disk: Path, tmp: Path, delay_ms: float = 0) -> Iterator[Nbdkit]:
    """nbdkit on the storage host: the image over NBD on its address; ``delay_ms``: each
    read and write waits that long first (nbdkit's delay filter: a slower storage host,
    since the switch itself adds next to nothing)."""
    delay = {"filters": ["delay"], "params": [f"rdelay={delay_ms}ms", f"wdelay={delay_ms}ms"]}
    srv = Nbdkit(
        tmp / "nbd",
        ["file", f"file={disk}"],
        port=NBD_PORT,
        address=storage.address,
        **(delay if delay_ms else {}),
    )
    with storage.entered():
        srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def backend(
    stack: ExitStack, kind: str, host: Host, side: livemig.Side, uri: str, state: Path, dest: bool
) -> int:
    """Starts ``kind``'s vhost-user-blk backend on ``host`` over the NBD ``uri`` (stopped
    by ``stack``); its pid."""
    with host.entered():
        if kind == "qsd":
            storage, _, export = uri.removeprefix("nbd://").partition("/")
            address, _, port = storage.partition(":")
            spec = (
                f"driver=nbd,node-name=f0,server.type=inet,server.host={address},"
                f"server.port={port},export={export}"
            )
            return stack.enter_context(qsd.export(spec, side.sock)).pid
        policy = kind.removeprefix("emu-")
        opts = ["--policy", policy]
        if policy == "report":  # the requests in flight travel in the state file
            opts += ["--state-dir", str(state)] + (["--restore-dir", str(state)] if dest else [])
        serve = vm.Serve(side.sock, uri, side.dir / "serve.log", *opts)
    stack.callback(serve.kill)
    return serve.proc.pid


def placed(pid: int, host: Host) -> bool:
    """Whether ``pid`` and its children (QEMU under its reaper) live on ``host``."""
    return all(in_host(p, host) for p in [pid, *children(pid)])


def tcp_peers(pid: int, port: int) -> set[str]:
    """IPv4 addresses with an established TCP connection to ``port`` of the namespace
    process ``pid`` lives in (its /proc/PID/net/tcp)."""
    peers = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(local.split(":")[1], 16) == port:
                raw = struct.pack("<I", int(remote.split(":")[0], 16))
                peers.add(socket.inet_ntoa(raw))
    return peers


def ring_indexes(guest: vm.Vm) -> tuple[int, int]:
    """The blk ring's avail and used index as they are in the guest's memory (read with
    QEMU's monitor): a guest that waits for its disk with avail ahead of used for long
    has a request that no backend is going to answer."""
    path = guest.qmp.execute("x-query-virtio")[0]["path"]  # type: ignore[index]
    ring = guest.qmp.execute("x-query-virtio-vhost-queue-status", path=path, queue=0)

    def idx(at: int) -> int:  # a split ring's idx: the u16 after its flags
        shown = guest.qmp.execute("human-monitor-command", **{"command-line": f"xp /1hx {at + 2}"})
        return int(str(shown).split(":")[1].split()[0], 16)

    return idx(ring["avail-phys"]), idx(ring["used-phys"])  # type: ignore[index]


@contextmanager
def stuck_means(guest: vm.Vm, where: str) -> Iterator[None]:
    """A guest that stops making progress in the block fails with its ring's indexes."""
    try:
        yield
    except (AssertionError, TimeoutError) as e:
        try:
            avail, used = ring_indexes(guest)
            ring = f"its blk ring: avail idx {avail}, used idx {used}"
        except (RuntimeError, OSError, IndexError, ValueError) as why:
            ring = f"its ring could not be read: {why}"
        raise AssertionError(f"{e}\n(the {where} guest; {ring})") from None


def problems(results: dict[str, str], disk: Path) -> list[str]:
    """What is wrong with the guest's end-of-run report and the image file (none: every
    acknowledged write and the page cache survived the migration)."""
    found = livemig.disk_problems(results, disk)
    if results.get("livemig.bad") != "0":
        found.append(f"the guest found {results.get('livemig.bad')} bad blocks or cache pages")
    if results.get("livemig.filled") != "1":
        found.append("the guest never filled its page cache")
    if int(results.get("livemig.cached_kib", 0)) < livemig.CACHE_MIB << 10:
        found.append("the region was not in the page cache")
    writes = int(results.get("livemig.writes", 0))
    if writes == 0 or int(results.get("livemig.checked", -1)) != min(writes, livemig.SLOTS):
        found.append("not every acknowledged write was checked")
    return found


def one_run(
    kind: str,
    image: GuestImage,
    net: Network,
    tmp: Path,
    bandwidth: int,
    storage_delay_ms: float = 0,
) -> dict:
    """One live migration src -> dst with ``kind``'s backends; its figures and checks.

    ``downtime_ms``, ``final_pass_pages``, ``passes``, ``total_s`` from QEMU's last
    query-migrate; ``stop_us``: the backend's part of the downtime (livemig.stop_us);
    ``placed``: every process ran on its host; ``nbd_peers``: who was connected to the
    storage host while both backends ran; ``problems``: the data check (livemig).
    """
    disk, state = tmp / "disk.img", tmp / "state"
    livemig.make_disk(disk)
    state.mkdir()
    src, dst = livemig.Side(tmp / "src", image), livemig.Side(tmp / "dst", image)
    uri = nbd_uri(net["storage"])
    incoming = f"tcp:{net['dst'].address}:{MIGRATION_PORT}"
    transcript: list[str] = []
    out: dict = {"passed": False, "problems": ["the migration did not complete"]}
    with ExitStack() as stack:
        storage = stack.enter_context(nbd_server(net["storage"], disk, tmp, storage_delay_ms))
        pids = {"src": backend(stack, kind, net["src"], src, uri, state, dest=False)}
        with net["src"].entered():
            guest = src.guest(transcript, trace=True)
        stack.callback(guest.stop)
        guest.progress(2)
        pids["dst"] = backend(stack, kind, net["dst"], dst, uri, state, dest=True)
        with net["dst"].entered():
            target = dst.guest(transcript, incoming=incoming)
        stack.callback(target.stop)
        assert storage.proc is not None
        out["nbd_peers"] = tcp_peers(storage.proc.pid, NBD_PORT)
        out["placed"] = (
            placed(storage.proc.pid, net["storage"])
            and all(placed(pids[h], net[h]) for h in ("src", "dst"))
            and placed(guest.proc.pid, net["src"])
            and placed(target.proc.pid, net["dst"])
        )
        with stuck_means(guest, "source"):
            info = livemig.migrate(guest, uri=incoming, disk=disk, bandwidth=bandwidth)
        ram = info.get("ram", {})
        out.update(
            status=info["status"],
            downtime_ms=float(info.get("downtime", "nan")),
            final_pass_pages=ram.get("downtime-bytes", 0) / ram.get("page-size", 4096),
            passes=ram.get("dirty-sync-count", 0),
            total_s=info.get("total-time", 0) / 1000,
            stop_us=float("nan"),
        )
        if info["status"] != "completed":
            return out
        out["stop_us"] = livemig.stop_us(src.trace)
        guest.quit()
        with stuck_means(target, "destination"):
            target.progress(2)  # I/O on the destination, over its own NBD connection
        livemig.raise_flag(disk, b"EMU-STOP")
        out["results"] = results = target.finish(ok=False)
        out["problems"] = problems(results, disk)
        out["passed"] = out["placed"] and not out["problems"]
        out["console"] = target.console()
        return out
