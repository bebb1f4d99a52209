"""The state decoder: anything that is not a valid state is refused with StateError.

The first input byte picks how the rest is used: as a whole state file (checksum and all),
as header and parts whose checksum the harness appends (so mutations get past it), or the
same with the header's payload length fixed up too. What decodes then goes through every
consumer of a state: ``parts.parse``, ``parts.to_json`` (``emu state show``, which must
print it as JSON), a virtio-mmio restore onto a fresh device of that type, and the
vhost-user check (``emu serve --restore-dir``, DEVICE_STATE). Each may only refuse with
StateError. A state the transport accepted must also behave: every register reads without
an exception, and the device's own snapshot of it (after a VMM stop) restores again.
"""

from __future__ import annotations

import hashlib
import json

from emu.memory import GuestMemory
from emu.state import parts
from emu.state.format import StateError, decode, encode
from emu.transport import mmio_regs as mmio
from emu.transport.mmio import MmioTransport
from emu.vhost_user import device_state
from fuzz import _devices
from fuzz._oracle import Finding, Watch

MAX_LEN = 8192  # room for the long numbers and deep nesting a JSON part may hold
MEM = GuestMemory.create(0x10000)


def one_input(data: bytes) -> None:
    if not data:
        return
    how, body = data[0], data[1:]
    mode, variant, version = how & 3, how >> 2 & 3, 1 if how & 0x10 else 2
    if mode >= 1:
        if mode == 2 and len(body) >= 24:
            body = body[:20] + (len(body) - 24).to_bytes(4, "little") + body[24:]
        body += hashlib.sha256(body).digest()
    MEM.regions[0].array[:] = 0
    with Watch(fds=True, threads=True):
        state = _refused_only("decode", decode, body)
        if state is REFUSED:
            return
        _show(state)
        _vhost_user_check(state, variant)
        _mmio_restore(state, variant, version)


REFUSED = object()


def _refused_only(what: str, fn, *args):
    """``fn(*args)``, REFUSED when it raised StateError; any other exception is a finding."""
    try:
        return fn(*args)
    except StateError:
        return REFUSED
    except Exception as e:
        raise Finding(f"{what}: {e!r:.500}") from e


def _show(state) -> None:
    shown = _refused_only("parts.to_json", parts.to_json, state)
    if shown is not REFUSED:
        try:
            json.dumps(shown)
        except Exception as e:
            raise Finding(f"emu state show cannot print what to_json gave: {e!r}") from e


def _vhost_user_check(state, variant: int) -> None:
    dev = _devices.make(state.device_type, variant)
    try:
        loaded = _refused_only("vhost-user check", device_state.check, dev, state)
        if loaded is not REFUSED:
            _refused_only("load_state", dev.load_state, loaded.device_part)
    finally:
        dev.close()


def _mmio_restore(state, variant: int, version: int) -> None:
    dev = _devices.make(state.device_type, variant)
    t = MmioTransport(dev, MEM, version=version)
    try:
        if _refused_only("virtio-mmio restore", t.restore, state) is REFUSED:
            return
        _read_everything(t)
        t.vmm_stop(timeout=5)
        again = _refused_only("save after restore", t.save)
        if again is REFUSED:
            raise Finding("a restored device refused to save")
        _restore_again(encode(again), variant, version)
    finally:
        t.write(mmio.STATUS, 4, 0)
        dev.close()


def _restore_again(data: bytes, variant: int, version: int) -> None:
    state = decode(data)
    dev = _devices.make(state.device_type, variant)
    t = MmioTransport(dev, MEM, version=version)
    try:
        if _refused_only("restore of a saved state", t.restore, state) is REFUSED:
            raise Finding("emu saved a state its own restore refuses")
    finally:
        t.write(mmio.STATUS, 4, 0)
        dev.close()


def _read_everything(t: MmioTransport) -> None:
    """What a guest (or a VMM) may read right after a restore; nothing may raise."""
    try:
        for sel in range(len(t.device.queues) + 1):
            t.write(mmio.QUEUE_SEL, 4, sel)
            for off in range(0, mmio.CONFIG, 4):
                t.read(off, 4)
        for off in range(0, 64):
            for size in (1, 2, 4, 8):
                t.read(mmio.CONFIG + off, size)
    except Exception as e:
        raise Finding(f"register read after restore: {e!r:.500}") from e


def _saved(device_id: int, variant: int, packed: bool, version: int) -> bytes:
    """A real snapshot: the device brought up by the reference driver, then VMM-stopped."""
    from emu.testing.driver import VirtioMmioDriver

    mem = GuestMemory.create(0x40000)
    dev = _devices.make(device_id, variant)
    t = MmioTransport(dev, mem, version=version)
    try:
        drv = VirtioMmioDriver(t, mem)
        drv.init(packed=packed and version == 2)
        for i in range(len(dev.queues)):
            drv.setup_queue(i, 8)
        drv.driver_ok()
        t.vmm_stop()
        return encode(t.save())
    finally:
        t.write(mmio.STATUS, 4, 0)
        dev.close()
        mem.close()


def _without_transport(data: bytes) -> bytes:
    state = decode(data)
    state.parts = [p for p in state.parts if p.type != parts.TRANSPORT]
    return encode(state)


def seeds() -> dict[str, bytes]:
    out = {}
    for dev_id, name in _devices.KINDS.items():
        for variant in (0, 1):
            for packed in (False, True):
                data = _saved(dev_id, variant, packed, 2)
                tag = f"{name}-v{variant}-{'packed' if packed else 'split'}"
                out[tag] = bytes([1 | variant << 2]) + data[:-32]
                out[f"{tag}-raw"] = bytes([0 | variant << 2]) + data
                out[f"{tag}-no-transport"] = (
                    bytes([2 | variant << 2]) + _without_transport(data)[:-32]
                )
        legacy = _saved(dev_id, 0, False, 1)
        out[f"{name}-legacy"] = bytes([1 | 0x10]) + legacy[:-32]
    return out
