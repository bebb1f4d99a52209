"""Golden snapshot files: how they were made, and how a test replays them.

Each case under ``tests/golden/<set>/`` is one device (blk, net, console, rng, fs, balloon,
vsock) on a split or a packed ring, saved by ``MmioTransport.save`` after a VMM ``report``
stop with requests in flight, and written by ``emu.state.file.save``:

    CASE.state    the snapshot file itself
    CASE.ram.gz   guest RAM at the save (rings, buffers, the driver's requests)
    CASE.disk.gz  blk only: the disk image at the save
    (fs shares a directory that ``make_device`` fills the same way for the save and every
    replay; its nodes other than the root come back stale, as on a host where the files
    were replaced: the requests in flight were answered before the save, so a restore
    publishes their answers without running them again; vsock's connection does not come
    back, so the packets in flight are answered with RST and TRANSPORT_RESET goes out)
    CASE.json     the rings at the save, the chains in flight, and what the code that
                  made the files did after restoring them: per queue the used entries
                  (head, length, sha256 of the bytes written into the chain) and what
                  reached the backend

``replay`` restores a case into a fresh device over fresh RAM and reads the used entries
straight from guest memory (no driver state is kept, so the files do not depend on the
reference driver's internals). A later emu must load every set and do the same.

To make a new set (only when the format changes; old sets stay):

    python tests/golden_state.py tests/golden/NAME

and to add the cases of a new device type to the latest set:

    python tests/golden_state.py tests/golden/LATEST KIND
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu.backends.chardev import BufferChar
from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.ringdefs import DESC_F_AVAIL, DESC_F_USED
from emu.state import file as statefile
from emu.state.format import encode
from emu.testing.delay import hold_completions
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

GOLDEN = Path(__file__).resolve().parent / "golden"
RAM = 4 << 20
DISK = 64 << 10
BLOCK = 4096
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000000ff")
#: requests of each kind in flight at the save
IN_FLIGHT = 4
#: after the restore, nothing new for this long means the device is done
QUIET = 0.5
CASES = [
    f"{kind}-{ring}"
    for kind in ("blk", "console", "net", "rng", "fs", "balloon", "vsock")
    for ring in ("split", "packed")
]
FS_FILE = b"golden file contents\n" * 100


class Sink:
    """Net backend: keeps the frames the device sends."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def attach(self, device: object) -> None:
        pass

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        pass


@dataclass
class Backend:
    """What a device reaches outside guest RAM, so a replay can see what it did there."""

    disk: Path | None = None
    share: Path | None = None
    vsock: Path | None = None  # the directory of the host's Unix sockets
    sink: Sink = field(default_factory=Sink)
    console: BufferChar = field(default_factory=BufferChar)
    port1: BufferChar = field(default_factory=BufferChar)
    program: Any = None  # vsock: the host program's socket at the save

    def digest(self) -> str:
        h = hashlib.sha256()
        if self.disk is not None:
            h.update(self.disk.read_bytes())
        for fr in self.sink.frames:
            h.update(len(fr).to_bytes(4, "little") + fr)
        h.update(b"|" + self.console.output + b"|" + self.port1.output)
        if self.share is not None:
            for p in sorted(self.share.iterdir()):
                h.update(b"|" + p.name.encode() + b"=" + p.read_bytes())
        return h.hexdigest()


def make_device(kind: str, backend: Backend) -> VirtioDevice:
    """The device of a case, as made for the save and again for every replay."""
    if kind == "blk":
        from emu.devices.blk import BlkDevice

        assert backend.disk is not None
        return BlkDevice(backend.disk)
    if kind == "net":
        from emu.devices.net import NetDevice

        return NetDevice(backend.sink, mac=MAC.hex(":"))
    if kind == "console":
        from emu.devices.console import ConsoleDevice

        return ConsoleDevice(
            backend.console, multiport=True, max_ports=2, ports={1: ("golden", backend.port1)}
        )
    if kind == "rng":
        from emu.devices.rng import RngDevice

        return RngDevice()
    if kind == "fs":
        from emu.devices.fs import FsDevice

        assert backend.share is not None
        backend.share.mkdir(exist_ok=True)
        (backend.share / "golden").write_bytes(FS_FILE)
        return FsDevice(backend.share, tag="golden")
    if kind == "balloon":
        from emu.devices.balloon import BalloonDevice

        return BalloonDevice()
    if kind == "vsock":
        from emu.backends.hybrid_vsock import HybridVsock
        from emu.devices.vsock import VsockDevice

        assert backend.vsock is not None
        backend.vsock.mkdir(exist_ok=True)
        return VsockDevice(3, HybridVsock(backend.vsock / "v.sock"))
    raise ValueError(kind)


# -- replay: restore a case and read what the device did from guest memory --


def used_entries(mem: GuestMemory, q: dict) -> list[tuple[int, int]]:
    """(head, length) of every used entry published since the save on queue ``q``."""
    size, out = q["size"], []
    if not q["packed"]:
        idx = mem.read_int(q["device"] + 2, 2)
        for k in range((idx - q["next_used"]) & 0xFFFF):
            slot = (q["next_used"] + k) % size
            out.append(struct.unpack("<II", mem.read(q["device"] + 4 + 8 * slot, 8)))
        return out
    ndesc = {c["head"]: c["ndesc"] for c in q["inflight"]}
    slot, wrap = q["next_used"], q["used_wrap"]
    while len(out) < len(ndesc):
        length, head, flags = struct.unpack("<IHH", mem.read(q["desc"] + 16 * slot + 8, 8))
        if bool(flags & DESC_F_AVAIL) != wrap or bool(flags & DESC_F_USED) != wrap:
            break
        out.append((head, length))
        slot += ndesc.get(head, 1)
        if slot >= size:
            slot, wrap = slot - size, not wrap
    return out


def written(mem: GuestMemory, chain: dict, length: int) -> str:
    """sha256 of the first ``length`` bytes of the chain's device-writable buffers."""
    data = b""
    for addr, n, writable in chain["segments"]:
        if writable and len(data) < length:
            data += mem.read(addr, min(n, length - len(data)))
    return hashlib.sha256(data).hexdigest()


def outcome(mem: GuestMemory, queues: dict, random_data: bool) -> dict:
    out = {}
    for i, q in queues.items():
        chains = {c["head"]: c for c in q["inflight"]}
        entries = []
        for head, length in used_entries(mem, q):
            # a chain made available after the save (vsock's event) has no segments here
            known = head in chains and not random_data
            data = written(mem, chains[head], length) if known else None
            entries.append([head, length, data])
        out[i] = entries
    return out


def replay(case_dir: Path, case: str, work: Path, counts: dict | None = None) -> dict:
    """Restore ``case`` into a fresh device; its outcome once ``counts`` used entries per
    queue appeared (or, without ``counts``, once nothing changed for QUIET seconds)."""
    meta = json.loads((case_dir / f"{case}.json").read_text())
    mem = GuestMemory.create(meta["ram"])
    backend = Backend()
    try:
        mem.write(0, gzip.decompress((case_dir / f"{case}.ram.gz").read_bytes()))
        if meta["kind"] == "blk":
            backend.disk = work / f"{case}.img"
            backend.disk.write_bytes(gzip.decompress((case_dir / f"{case}.disk.gz").read_bytes()))
        if meta["kind"] == "fs":
            backend.share = work / f"{case}.share"
        if meta["kind"] == "vsock":
            backend.vsock = work / f"{case}.vsock"
        dev = make_device(meta["kind"], backend)
        try:
            # the v1 set was saved by a transport that offered STOP at its usual bit (the
            # default then): a VMM restores onto a transport configured like the saving one
            tr = MmioTransport(dev, mem, stop_feature_bit=mmio_regs.F_EMU_STOP)
            tr.restore(statefile.load(case_dir / f"{case}.state"))
            random_data = meta["kind"] == "rng"
            deadline = time.monotonic() + 10
            last, since = None, time.monotonic()
            while time.monotonic() < deadline:
                now = outcome(mem, meta["queues"], random_data), backend.digest()
                if counts is not None:
                    if all(len(now[0][i]) >= n for i, n in counts.items()):
                        break
                elif now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > QUIET:
                    break
                time.sleep(0.01)
            used, digest = outcome(mem, meta["queues"], random_data), backend.digest()
        finally:
            dev.close()
    finally:
        mem.close()
    return {"used": used, "backend": digest}


# -- making a set (with the code of the day) --


def _frame(payload: bytes, dst: bytes = PEER) -> bytes:
    from emu.testing.net import ether

    return ether(dst, PEER if dst == MAC else MAC, payload.ljust(46, b"."))


def _save(kind: str, packed: bool, work: Path) -> tuple[GuestMemory, Backend, VirtioDevice, bytes]:
    """Run the device with IN_FLIGHT requests of each kind left in flight; the snapshot."""
    from emu.devices.blk import SECTOR, T_IN, T_OUT
    from emu.testing.blk import BlkDriver
    from emu.testing.console import GuestConsole
    from emu.testing.driver import VirtioMmioDriver
    from emu.testing.fs import FuseClient, in_header
    from emu.testing.fs import name as fuse_name
    from emu.testing.net import GuestNet
    from emu.testing.rng import RngDriver

    mem = GuestMemory.create(RAM)
    backend = Backend()
    if kind == "blk":
        backend.disk = work / "disk.img"
        backend.disk.write_bytes(bytes(i % 251 for i in range(DISK)))
    if kind == "fs":
        backend.share = work / "share"
    if kind == "vsock":
        backend.vsock = work / "vsock"
    dev = make_device(kind, backend)
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    submit: list = []
    if kind == "blk":
        blk = BlkDriver.open(drv, packed=packed, queue_size=16)
        assert blk.write(0, b"\x01" * BLOCK) == 0
        for i in range(IN_FLIGHT):
            sector = (1 + i) * BLOCK // SECTOR
            submit.append(lambda s=sector, i=i: blk.submit(T_OUT, s, bytes([0x40 + i]) * BLOCK))
            submit.append(lambda s=sector: blk.submit(T_IN, s + 64, in_size=BLOCK))
    elif kind == "net":
        net = GuestNet(drv, packed=packed, queue_size=32, rx_buffers=8)
        net.send(_frame(b"warm-up"))
        for i in range(IN_FLIGHT):
            out = [bytes(net.hdr_len), _frame(b"out %d" % i)]
            submit.append(lambda out=out: drv.submit(1, out, []))
            submit.append(lambda i=i: dev.deliver(_frame(b"in %d" % i, dst=MAC)))
    elif kind == "console":
        con = GuestConsole(drv, packed=packed, queue_size=32, rx_buffers=8, rx_buf_size=16)
        con.handshake(ports=2, replies=4)
        con.write(0, b"hello;")
        for i in range(IN_FLIGHT):
            submit.append(lambda i=i: drv.submit(1, [b"w%03d;" % i], []))
            submit.append(lambda i=i: drv.submit(5, [b"p%03d;" % i], []))
            submit.append(lambda i=i: backend.console.feed(b"r%03d;" % i))
    elif kind == "fs":
        from emu.devices import fuse as f

        fs = FuseClient.connect(drv, packed=packed, queue_size=16)
        entry = fs.lookup(f.ROOT_ID, "golden")
        fh = fs.open(entry.node)
        for i in range(IN_FLIGHT):
            for op, node, args, room in (
                (f.Op.GETATTR, f.ROOT_ID, f.GETATTR_IN.pack(0, 0, 0), f.ATTR_OUT.size),
                (f.Op.LOOKUP, f.ROOT_ID, fuse_name("golden"), f.ENTRY_OUT.size),
                (f.Op.READ, entry.node, f.READ_IN.pack(fh, 100 * i, 64, 0, 0, 0, 0), 64),
            ):
                hdr = in_header(op, node, 1000 + 2 * len(submit), len(args))
                submit.append(lambda o=[hdr + args], r=room: drv.submit(1, o, [16, r]))
    elif kind == "balloon":
        from emu.testing.balloon import BalloonDriver

        bal = BalloonDriver.open(drv, packed=packed, queue_size=16, initial_stats={4: 1 << 20})
        dev.set_target(64)
        bal.inflate(bal.take_pages(8))
        bal.set_actual(8)
        pages = bal.take_pages(3 * IN_FLIGHT)
        for i in range(IN_FLIGHT):
            pfn = struct.pack("<I", pages[i])
            submit.append(lambda pfn=pfn: drv.submit(bal.q["inflate"], [pfn], []))
            submit.append(lambda pfn=pfn: drv.submit(bal.q["deflate"], [pfn], []))
            free = [(pages[IN_FLIGHT + 2 * i] << 12, 8192, True)]
            submit.append(lambda free=free: bal.submit_raw("reporting", free))
    elif kind == "vsock":
        submit += _vsock_requests(drv, packed, backend)
    else:
        rng = RngDriver.open(drv, packed=packed, queue_size=16)
        assert len(rng.read(16)) == 16
        submit += [lambda: drv.submit(0, [], [16])] * IN_FLIGHT
    for q in dev.queues:
        hold_completions(q, 3600.0)  # completions never come before the stop: all stay in flight
    for s in submit:
        s()
    deadline = time.monotonic() + 10
    while not _all_fetched(kind, dev, backend):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind}: requests not fetched")
        time.sleep(0.01)
    tr.vmm_stop("report")
    return mem, backend, dev, encode(tr.save())


def _vsock_requests(drv: object, packed: bool, backend: Backend) -> list:
    """A connection to a host program, then per request one RW on it (the program gets
    it) and one REQUEST to a port nobody listens on (answered with RST: an rx chain)."""
    import socket

    from emu.devices.vsock_defs import HOST_CID, OP_REQUEST, OP_RW, TYPE_STREAM, Header
    from emu.testing.vsock import GuestVsock

    assert backend.vsock is not None
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(backend.vsock / "v.sock_5000"))
    server.listen()
    g = GuestVsock(drv, packed=packed, queue_size=16, rx_buffers=8)
    s = g.connect(5000)
    backend.program, _ = server.accept()
    server.close()
    out = []
    for i in range(IN_FLIGHT):
        out.append(lambda i=i: g.send_packet(s, OP_RW, b"golden %d;" % i))
        req = Header(g.cid, HOST_CID, 51000 + i, 6000 + i, 0, TYPE_STREAM, OP_REQUEST, 0, 4096, 0)
        out.append(lambda req=req: g.send_raw([req.pack()]))
    return out


def _all_fetched(kind: str, dev: VirtioDevice, backend: Backend) -> bool:
    if kind == "blk":
        return len(dev.queues[0].inflight()) == 2 * IN_FLIGHT
    if kind == "net":
        return dev.stats.tx_frames == 1 + IN_FLIGHT and dev.stats.rx_frames == IN_FLIGHT
    if kind == "console":
        port = dev.ports[0]
        done = len(backend.console.output) == 6 + 5 * IN_FLIGHT
        return done and len(backend.port1.output) == 5 * IN_FLIGHT and not port.backlog
    if kind == "fs":
        return len(dev.queues[1].inflight()) == 3 * IN_FLIGHT
    if kind == "balloon":  # inflate, deflate, the held stats buffer, reporting
        counts = [len(q.inflight()) if q.started else 0 for q in dev.queues]
        return counts == [IN_FLIGHT, IN_FLIGHT, 1, 0, IN_FLIGHT]
    if kind == "vsock":  # every packet acted on, every RST written
        return dev.queues[1].held() == 2 * IN_FLIGHT and dev.queues[0].held() == IN_FLIGHT
    return len(dev.queues[0].inflight()) == IN_FLIGHT


def make(case_dir: Path, kinds: list[str] | None = None) -> None:
    """Write the cases (of ``kinds`` only, when given: a device type added to the
    latest set without touching the files of the others)."""
    case_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    for case in CASES:
        kind, ring = case.split("-")
        if kinds and kind not in kinds:
            continue
        work = case_dir / f".work-{case}"
        work.mkdir()
        try:
            mem, backend, dev, state = _save(kind, ring == "packed", work)
            queues = {}
            for q in dev.queues:
                if not q.started:
                    continue
                rs = q.state()
                chains = [
                    dict(head=c.head, ndesc=c.ndesc, segments=[list(s) for s in c.segments])
                    for c in q.inflight()
                ]
                queues[str(q.index)] = dict(
                    packed=ring == "packed",
                    size=q.size,
                    desc=q.desc,
                    driver=q.driver,
                    device=q.device,
                    next_used=rs.next_used,
                    used_wrap=rs.used_wrap,
                    inflight=chains,
                )
            (case_dir / f"{case}.state").write_bytes(state)
            ram = mem.read(0, RAM)
            (case_dir / f"{case}.ram.gz").write_bytes(gzip.compress(ram, 9, mtime=0))
            if backend.disk is not None:
                disk = backend.disk.read_bytes()
                (case_dir / f"{case}.disk.gz").write_bytes(gzip.compress(disk, 9, mtime=0))
            dev.close()
            mem.close()
            meta = dict(made_by=f"tests/golden_state.py at {commit}", kind=kind, ram=RAM)
            meta["queues"] = queues
            (case_dir / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
            meta["expect"] = replay(case_dir, case, work)
            (case_dir / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
        finally:
            shutil.rmtree(work)
        print(case, {i: len(u) for i, u in meta["expect"]["used"].items()})


if __name__ == "__main__":
    make(Path(sys.argv[1]), sys.argv[2:])
