"""Guest-side virtio-blk requests over the reference driver, for tests and benchmarks.

``request`` builds the chain as Linux does: header, data, status byte, one buffer each.
Malformed chains (short headers, missing status bytes) go through ``VirtioMmioDriver.submit``
directly; ``header`` builds the 16 bytes for them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

from emu.devices.blk import (
    DWZ_SEGMENT,
    F_MQ,
    HEADER,
    ID_BYTES,
    S_OK,
    SECTOR,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkDevice,
)
from emu.testing.driver import VirtioMmioDriver
from emu.testing.driver_queue import Completion
from emu.testing.inprocess import attached, rings

CFG_NUM_QUEUES = 34


class BlkStatusError(Exception):
    """A read or GET_ID did not come back OK: there is no data to return."""

    def __init__(self, status: int) -> None:
        super().__init__(f"virtio-blk request failed with status {status}")
        self.status = status


def header(rtype: int, sector: int = 0, reserved: int = 0) -> bytes:
    return HEADER.pack(rtype, reserved, sector)


def status_of(c: Completion) -> int:
    """The status byte: the last device-writable byte of the chain."""
    return c.data[-1]


class BlkDriver:
    def __init__(self, drv: VirtioMmioDriver) -> None:
        self.drv = drv

    @classmethod
    def open(
        cls,
        drv: VirtioMmioDriver,
        features: int | None = None,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int | None = None,
    ) -> BlkDriver:
        """Negotiate, set up every request queue the device has, DRIVER_OK."""
        negotiated = drv.init(features, packed=packed, event_idx=event_idx, indirect=indirect)
        nq = drv.config_read(CFG_NUM_QUEUES, 2) if negotiated >> F_MQ & 1 else 1
        for i in range(nq):
            drv.setup_queue(i, queue_size)
        drv.driver_ok()
        return cls(drv)

    # -- one request, asynchronous: submit now, collect with wait() --

    def submit(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_size: int = 0, qidx: int = 0
    ) -> int:
        outs = [header(rtype, sector)] + ([out] if out else [])
        ins = ([in_size] if in_size else []) + [1]
        return self.drv.submit(qidx, outs, ins)

    def wait(self, qidx: int = 0, count: int = 1) -> list[Completion]:
        return self.drv.wait(qidx, count)

    def request(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_size: int = 0, qidx: int = 0
    ) -> tuple[int, bytes]:
        """(status, data read) of one request, waited for."""
        self.submit(rtype, sector, out, in_size, qidx)
        (c,) = self.wait(qidx)
        return status_of(c), c.data[:-1]

    # -- the request types --

    def read(self, sector: int, count: int, qidx: int = 0) -> bytes:
        status, data = self.request(T_IN, sector, in_size=count * SECTOR, qidx=qidx)
        if status != S_OK:
            raise BlkStatusError(status)
        return data

    def write(self, sector: int, data: bytes, qidx: int = 0) -> int:
        return self.request(T_OUT, sector, out=data, qidx=qidx)[0]

    def flush(self, sector: int = 0, qidx: int = 0) -> int:
        return self.request(T_FLUSH, sector, qidx=qidx)[0]

    def get_id(self, qidx: int = 0) -> bytes:
        status, data = self.request(T_GET_ID, in_size=ID_BYTES, qidx=qidx)
        if status != S_OK:
            raise BlkStatusError(status)
        return data

    def discard(self, segments: list[tuple[int, int, int]], qidx: int = 0) -> int:
        """``segments``: (sector, num_sectors, flags) each."""
        return self.request(T_DISCARD, out=dwz_payload(segments), qidx=qidx)[0]

    def write_zeroes(self, segments: list[tuple[int, int, int]], qidx: int = 0) -> int:
        return self.request(T_WRITE_ZEROES, out=dwz_payload(segments), qidx=qidx)[0]


def dwz_payload(segments: list[tuple[int, int, int]]) -> bytes:
    return b"".join(DWZ_SEGMENT.pack(*s) for s in segments)


def demo(opts: dict, say: Callable[[str], None]) -> None:
    """``emu demo --in-process blk``: write, flush, read back, compare with the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.truncate(8 << 20)
        with attached(BlkDevice(path, serial="emu-demo")) as drv:
            blk = BlkDriver.open(drv, **opts)
            pattern = hashlib.sha256(b"emu").digest() * 128  # 4 KiB
            blk.write(8, pattern)
            blk.flush()
            back = blk.read(8, 8)
            with open(path, "rb") as f:
                f.seek(8 * 512)
                on_disk = f.read(len(pattern))
            serial = blk.get_id().rstrip(bytes(1)).decode()
            say(f"blk: serial {serial!r}, rings {rings(drv.features)}")
            say(f"blk: wrote 4 KiB at sector 8, sha256 {hashlib.sha256(pattern).hexdigest()[:16]}")
            say(
                f"blk: read back sha256 {hashlib.sha256(back).hexdigest()[:16]}, "
                f"backing file {'matches' if on_disk == pattern == back else 'DIFFERS'}"
            )
