"""Replay of real frontends' message sequences (UML, QEMU 7.2) against emu's backend.

shared/traces/vhost-user has every message QEMU and UML sent to qemu-storage-daemon,
byte-exact (*.raw.jsonl), with the kind of each fd (*.log). Each frontend connection is
replayed against a fresh emu blk backend with freshly made fds of the same kinds. Only what
a real frontend would itself adapt to emu is changed: SET_PROTOCOL_FEATURES / SET_FEATURES
are masked with what emu offered, and SET_INFLIGHT_FD carries the region emu handed out.
Ring indexes are put into guest memory as a guest would have them (avail = used = base), so
a started ring is consistent. Checks: every message needing a reply gets exactly one, with
flags 0x5, the right size and sensible content, and nothing else is sent.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import select
import socket
import struct
from pathlib import Path

import pytest

from emu.devices.blk import BlkDevice
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    HEADER,
    INFLIGHT,
    OWN_REPLY,
    REPLY_FLAGS,
    U64,
    VRING_ADDR,
    VRING_STATE,
    Message,
    Req,
    recv_message,
    send_message,
)

TRACE_DIR = Path("/work/shared/traces/vhost-user")
TRACES = sorted(TRACE_DIR.glob("*.raw.jsonl"))
_FDS = re.compile(r"fds=(\d+)(?:\((.*?)\)(?=\s|$))?")  # kinds may hold "(deleted)"

pytestmark = pytest.mark.skipif(not TRACES, reason=f"no traces in {TRACE_DIR}")


def frontend_messages(trace: Path) -> dict[str, list[tuple[bytes, list[str]]]]:
    """Per main-channel connection: (message bytes, fd kinds) of every F>B message."""
    raw = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    log = trace.with_name(trace.name.replace(".raw.jsonl", ".log"))
    kinds = []
    for line in log.read_text().splitlines():
        f = line.split()
        if not line.startswith("#") and len(f) > 3 and f[2] == "F>B" and not f[1].endswith("b"):
            m = _FDS.search(line)
            assert m is not None, line
            kinds.append(m.group(2).split(";") if m.group(2) else [])
    out: dict[str, list[tuple[bytes, list[str]]]] = {}
    msgs = [r for r in raw if r["dir"] == "F>B" and not r["chan"].endswith("b")]
    assert len(msgs) == len(kinds)
    for r, k in zip(msgs, kinds, strict=True):
        assert len(k) == r["nfds"]
        out.setdefault(r["chan"], []).append((bytes.fromhex(r["hex"]), k))
    return out


class Replay:
    """One frontend connection being replayed; keeps what the frontend would keep."""

    def __init__(self, path: str, inflight: tuple[bytes, int] | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.offered = self.offered_protocol = 0
        self.inflight = inflight
        self.maps: list[tuple[int, int, mmap.mmap, int]] = []  # uva, size, map, offset
        self.addr: dict[int, tuple[int, int]] = {}  # vring -> (avail uva, used uva)
        self.base: dict[int, int] = {}
        self.keep: list[object] = []

    def make_fd(self, kind: str) -> int:
        if kind.startswith("eventfd"):
            return os.eventfd(0, os.EFD_CLOEXEC)
        if kind.startswith("socket"):
            a, b = socket.socketpair()
            self.keep.append(b)
            return a.detach()
        size = int(re.search(r"size=(0x[0-9a-f]+)", kind).group(1), 16)  # type: ignore[union-attr]
        fd = os.memfd_create("replay")
        os.ftruncate(fd, size)
        return fd

    def write_u16(self, uva: int, value: int) -> None:
        for start, size, mm, off in self.maps:
            if start <= uva < start + size:
                struct.pack_into("<H", mm, uva - start + off, value)
                return
        raise AssertionError(f"uva {uva:#x} not in the replayed memory table")

    def adapt(self, req: int, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        """What a real frontend would send emu instead; records what later checks need."""
        if req == Req.SET_PROTOCOL_FEATURES:
            return U64.pack(U64.unpack(payload)[0] & self.offered_protocol), fds
        if req == Req.SET_FEATURES:
            return U64.pack(U64.unpack(payload)[0] & self.offered), fds
        if req == Req.SET_INFLIGHT_FD:
            assert self.inflight is not None
            for fd in fds:
                os.close(fd)
            return self.inflight[0], [os.dup(self.inflight[1])]
        if req in (Req.ADD_MEM_REG, Req.SET_MEM_TABLE):
            at = 8
            for fd in fds:
                gpa, size, uva, off = struct.unpack_from("<QQQQ", payload, at)
                self.maps.append((uva, size, mmap.mmap(fd, off + size), off))
                at += 32
        elif req == Req.SET_VRING_ADDR:
            index, _, _desc, used, avail, _ = VRING_ADDR.unpack(payload)
            self.addr[index] = (avail, used)
        elif req == Req.SET_VRING_BASE:
            index, num = VRING_STATE.unpack(payload)
            self.base[index] = num
        elif req == Req.SET_VRING_KICK:  # the guest's rings, consistent with the base
            index = U64.unpack(payload)[0] & 0xFF
            avail, used = self.addr[index]
            self.write_u16(avail + 2, self.base.get(index, 0))
            self.write_u16(used + 2, self.base.get(index, 0))
        return payload, fds

    def check_reply(self, req: int, flags: int, payload: bytes) -> None:
        if req not in OWN_REPLY and not flags & FLAG_NEED_REPLY:
            return
        answer = recv_message(self.sock)
        assert (answer.req, answer.flags) == (req, REPLY_FLAGS)
        size = len(answer.payload)
        if req == Req.GET_CONFIG:
            assert size == len(payload) and answer.payload[:12] == payload[:12]
        elif req == Req.GET_INFLIGHT_FD:
            assert size == INFLIGHT.size and len(answer.fds) == 1
            self.inflight = (answer.payload, answer.fds[0])
        elif req == Req.GET_VRING_BASE:
            index, num = VRING_STATE.unpack(answer.payload)
            assert num == self.base.get(index, 0)
        else:
            assert size == 8
            (value,) = U64.unpack(answer.payload)
            if req == Req.GET_FEATURES:
                self.offered = value
            elif req == Req.GET_PROTOCOL_FEATURES:
                self.offered_protocol = value
            elif req == Req.GET_QUEUE_NUM:
                assert value == 1
            elif req == Req.GET_MAX_MEM_SLOTS:
                assert value >= 2
            else:
                assert value == 0, f"{Req(req).name} refused"

    def run(self, messages: list[tuple[bytes, list[str]]]) -> None:
        for data, kinds in messages:
            req, flags, size = HEADER.unpack_from(data)
            payload = data[HEADER.size :]
            assert len(payload) == size
            fds = [self.make_fd(k) for k in kinds]
            payload, fds = self.adapt(req, payload, fds)
            send_message(self.sock, Message(req, flags, payload, fds))
            for fd in fds:
                os.close(fd)
            self.check_reply(req, flags, payload)
        # nothing unasked for: the socket stays quiet
        assert not select.select([self.sock], [], [], 0.2)[0]

    def close(self) -> None:
        self.sock.close()
        for _, _, mm, _ in self.maps:
            mm.close()
        for s in self.keep:
            s.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("trace", TRACES, ids=[t.name.split(".")[0] for t in TRACES])
def test_replay(trace: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    inflight = None
    for chan, messages in frontend_messages(trace).items():
        # each connection gets a fresh backend, as after the crash or on the migration
        # destination; an inflight region survives in the frontend, as QEMU keeps it
        dev = BlkDevice(img, queue_max_size=1024)
        server = VhostUserServer(dev, tmp_path / f"{chan}.sock").start()
        replay = Replay(server.path, inflight)
        try:
            replay.run(messages)
            inflight = replay.inflight
        finally:
            replay.close()
            server.close()
            dev.close()
    if inflight is not None:
        os.close(inflight[1])
