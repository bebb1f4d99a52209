"""What an independent hostile review of the rebuilt core found, each as a regression test:
a blocked state transfer that held the vhost-user server, a saved broken device that
replayed its ring, a register read racing a queue stop, transport flags that contradict
the status, a zero guest page size, a QueueRingState no snapshot can describe, and JSON
that costs far more memory than its size."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from emu.devices.rng import RngDevice
from emu.memory import GuestMemory
from emu.state import format as fmt
from emu.state import parts
from emu.state.format import StateError
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.testing.vhost_user import VhostUserDriver
from emu.transport import mmio_regs as R
from emu.transport.mmio import MmioTransport
from emu.vhost_user import device_state
from emu.vhost_user.backend import VhostUserServer
from emu.vhost_user.protocol import Req
from emu.vhost_user.snapshot import PHASE_STOPPED, SAVE, STATE_FD

BUF = 8 << 20


def test_a_state_save_into_a_pipe_nobody_reads_ends_at_the_deadline(tmp_path, monkeypatch):
    """A frontend fills the pipe and never reads: the transfer gives up at its deadline,
    the disconnect does not hang, and the next frontend is served."""
    monkeypatch.setattr(device_state, "TRANSFER_TIMEOUT", 1.0)
    sock = tmp_path / "rng.sock"
    dev = RngDevice()
    dev.policy = "report"
    srv = VhostUserServer(dev, sock).start()
    fe = VhostUserDriver(sock)
    fe.init()
    fe.setup_queue(0, 256)
    hold_completions(dev.queues[0], 30.0)  # a report stop leaves them all in flight
    fe.driver_ok()
    for _ in range(250):
        fe.queues[0].add([], [16])
    fe.kick(0)
    deadline = time.monotonic() + 10
    while dev.queues[0].held() < 250 and time.monotonic() < deadline:
        time.sleep(0.01)
    fe.stop_ring(0)
    r, w = os.pipe()  # blocking, and nearly full: poll says writable, a write would block
    os.write(w, b"x" * (15 * 4096))
    fe.request(Req.SET_DEVICE_STATE_FD, STATE_FD.pack(SAVE, PHASE_STOPPED), [w])
    time.sleep(1.5)
    fe.sock.close()
    try:
        fe2 = VhostUserDriver(sock, timeout=5)
        assert fe2.get_u64(Req.GET_FEATURES)
        fe2.sock.close()
        closing = threading.Thread(target=srv.close, daemon=True)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "the server did not close"
    finally:
        os.close(r)
        dev.close()


def _offer(mem: GuestMemory, q, i: int, addr: int, length: int, flags: int) -> None:
    mem.write(q.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, 0))
    mem.write(q.driver + 4 + 2 * i, i.to_bytes(2, "little"))
    mem.write(q.driver + 2, (i + 1).to_bytes(2, "little"))


def test_a_device_saved_needing_a_reset_restores_needing_it_and_replays_nothing(mem):
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    drv.init()
    q = drv.setup_queue(0, 16)
    drv.driver_ok()
    for i in range(5):
        _offer(mem, q, i, BUF + 64 * i, 16, 2)  # device-writable: served
    tr.write(R.QUEUE_NOTIFY, 4, 0)
    deadline = time.monotonic() + 5
    while mem.read_int(q.device + 2, 2) != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(5):
        mem.write(BUF + 64 * i, b"GUEST-REUSED-BUF")  # the guest reuses completed buffers
    _offer(mem, q, 5, BUF + 1024, 8, 0)  # device-readable: rng fails the device
    tr.write(R.QUEUE_NOTIFY, 4, 0)
    deadline = time.monotonic() + 5
    while not tr.read(R.STATUS, 4) & R.S_DEVICE_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.01)
    state = tr.save()
    dev2 = RngDevice()
    tr2 = MmioTransport(dev2, mem)
    tr2.restore(state)
    time.sleep(0.1)
    assert tr2.read(R.STATUS, 4) & R.S_DEVICE_NEEDS_RESET
    assert all(mem.read(BUF + 64 * i, 16) == b"GUEST-REUSED-BUF" for i in range(5))
    drv2 = VirtioMmioDriver(tr2, mem)  # and a reset brings it back
    drv2.init()
    drv2.setup_queue(0, 16)
    drv2.driver_ok()
    drv2.submit(0, [], [16])
    assert drv2.wait(0)[0].length == 16
    dev.close()
    dev2.close()


def test_ring_state_reads_racing_a_queue_stop_never_raise(mem):
    errors: list[BaseException] = []
    for it in range(60):
        dev = RngDevice()
        tr = MmioTransport(dev, mem, stop_feature_bit=R.F_EMU_STOP)
        drv = VirtioMmioDriver(tr, mem, stop_feature_bit=R.F_EMU_STOP)
        drv.init()
        drv.setup_queue(0)
        drv.driver_ok()
        drv.submit(0, [], [16])
        drv.wait(0)
        drv.stop()
        done = threading.Event()

        def read(tr: MmioTransport = tr, done: threading.Event = done) -> None:
            try:
                while not done.is_set():
                    tr.read(R.QUEUE_RING_STATE, 4)
                    tr.read(R.QUEUE_INFLIGHT, 4)
            except BaseException as e:
                errors.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.001)
        tr.write(R.QUEUE_READY if it % 2 else R.STATUS, 4, 0)
        time.sleep(0.001)
        done.set()
        reader.join()
        dev.close()
        assert errors == []


def _with_registers(state: fmt.DeviceState, **changes) -> fmt.DeviceState:
    out = []
    for p in state.parts:
        if p.type == parts.TRANSPORT:
            regs = json.loads(p.value[4:])
            regs.update(changes)
            p = fmt.Part(p.type, p.value[:4] + json.dumps(regs).encode(), p.selector, p.flags)
        out.append(p)
    return fmt.DeviceState(state.device_type, out, state.flags)


@pytest.mark.parametrize("vmm_stopped", [False, True])
def test_a_pending_guest_stop_the_status_does_not_hold_is_refused(mem, vmm_stopped):
    dev = RngDevice()
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    drv.init()
    drv.setup_queue(0)
    drv.driver_ok()
    tr.vmm_stop()
    state = _with_registers(tr.save(), guest_stop_pending=True, vmm_stopped=vmm_stopped)
    dev2 = RngDevice()
    with pytest.raises(StateError, match="guest_stop_pending"):
        MmioTransport(dev2, mem).restore(state)
    dev.close()
    dev2.close()


def test_legacy_queue_pfn_reads_zero_without_a_guest_page_size(mem):
    dev = RngDevice()
    tr = MmioTransport(dev, mem, version=1)
    drv = VirtioMmioDriver(tr, mem)
    drv.init()
    drv.setup_queue(0)
    drv.driver_ok()
    tr.vmm_stop()
    state = _with_registers(tr.save(), guest_page_size=0)
    dev2 = RngDevice()
    tr2 = MmioTransport(dev2, mem, version=1)
    tr2.restore(state)
    assert tr2.read(R.QUEUE_PFN, 4) == 0
    dev.close()
    dev2.close()


def test_a_queue_ring_state_with_chains_in_flight_is_refused(mem):
    """The register carries no in-flight list: such a ring could never be saved."""
    dev = RngDevice()
    tr = MmioTransport(dev, mem, stop_feature_bit=R.F_EMU_STOP)
    drv = VirtioMmioDriver(tr, mem, stop_feature_bit=R.F_EMU_STOP)
    drv.init()
    drv.setup_queue(0, 16)
    tr.write(R.QUEUE_SEL, 4, 0)
    tr.write(R.QUEUE_READY, 4, 0)
    tr.write(R.QUEUE_RING_STATE, 4, 100)  # avail 100, used 0
    assert 0 not in dev._post(lambda: dict(dev._restore)).wait()
    tr.write(R.QUEUE_RING_STATE, 4, 7 | 7 << 16)  # nothing in flight: taken
    assert dev._post(lambda: dict(dev._restore)).wait()[0][0].next_avail == 7
    dev.close()


def test_a_json_part_of_many_small_lists_is_refused_before_it_is_parsed(tmp_path: Path):
    value = b"[" + b"[]," * 100_000 + b"[]]"
    state = fmt.DeviceState(4, [fmt.Part(parts.TRANSPORT, struct.pack("<HH", 1, 0) + value)])
    with pytest.raises(StateError, match="lists and objects"):
        parts.parse(fmt.decode(fmt.encode(state)))
