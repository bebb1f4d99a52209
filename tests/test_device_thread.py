"""The device thread survives whatever the guest or a backend throws at it."""

import threading

import pytest
from conftest import EchoDevice
from modes import wait_until

from emu.devices.blk import BlkDevice
from emu.testing.driver import DeviceNeedsReset, VirtioMmioDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport


class Exploding(EchoDevice):
    def handle_queue(self, q):
        q.pop(64)
        raise KeyError("a bug the guest found")


def test_unexpected_error_in_a_device_means_needs_reset_not_a_dead_thread(mem):
    dev = Exploding(queue_max_size=64)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    drv.init()
    drv.setup_queue(0)
    drv.driver_ok()
    drv.submit(0, [b"x"], [1])
    with pytest.raises(DeviceNeedsReset):
        drv.wait(0)
    assert "internal error" in dev.broken
    assert dev._thread.is_alive()
    drv.reset()  # and it comes back after a reset
    assert drv.status == 0
    dev.close()


def test_impossible_saved_ring_state_fails_the_device_without_raising(mem, tmp_path):
    """QueueRingState written for a ring the driver then shrinks: refused at DRIVER_OK."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    dev = BlkDevice(img)
    tr = MmioTransport(dev, mem, stop_feature_bit=mmio_regs.F_EMU_STOP)  # QueueRingState
    drv = VirtioMmioDriver(tr, mem)
    drv.init(packed=True)
    drv.setup_queue(0, 256)
    tr.write(mmio_regs.QUEUE_SEL, 4, 0)
    tr.write(mmio_regs.QUEUE_READY, 4, 0)
    tr.write(mmio_regs.QUEUE_RING_STATE, 4, 200 | 200 << 16)
    tr.write(mmio_regs.QUEUE_SIZE, 4, 64)
    tr.write(mmio_regs.QUEUE_READY, 4, 1)
    # must not raise
    tr.write(mmio_regs.STATUS, 4, tr.read(mmio_regs.STATUS, 4) | mmio_regs.S_DRIVER_OK)
    assert tr.read(mmio_regs.STATUS, 4) & mmio_regs.S_DEVICE_NEEDS_RESET
    assert "out of range" in dev.broken
    dev.close()


def test_a_queue_failing_to_start_does_not_pull_rings_from_a_busy_thread(mem, tmp_path):
    died = []
    old_hook, threading.excepthook = threading.excepthook, died.append
    try:
        img = tmp_path / "d.img"
        img.write_bytes(bytes(8 << 20))
        dev = BlkDevice(img, num_queues=2)
        tr = MmioTransport(dev, mem)
        drv = VirtioMmioDriver(tr, mem)
        drv.init()
        q0 = drv.setup_queue(0, 256)
        tr.write(mmio_regs.QUEUE_SEL, 4, 1)
        tr.write(mmio_regs.QUEUE_DESC_HIGH, 4, 0x1000)  # queue 1's ring far outside RAM
        drv.driver_ok()
        for _ in range(200):
            q0.add([bytes(16)], [64 << 10, 1])
        drv.kick(0)
        tr.write(mmio_regs.QUEUE_SEL, 4, 1)
        tr.write(mmio_regs.QUEUE_READY, 4, 1)  # fails the device while queue 0 is being served
        assert tr.read(mmio_regs.STATUS, 4) & mmio_regs.S_DEVICE_NEEDS_RESET
        tr.write(mmio_regs.STATUS, 4, 0)
        dev.close()
    finally:
        threading.excepthook = old_hook
    assert died == []


def test_call_runs_on_the_device_thread_or_borrows_it_when_parked(mem):
    """``call`` is a command of the thread's; with ``borrow`` and the thread parked, it
    runs in the caller holding the thread's token, and the commands it posts itself (a
    queue stop here) run inline rather than wait for the thread it holds."""
    dev = EchoDevice(queue_max_size=64)
    drv = VirtioMmioDriver(MmioTransport(dev, mem), mem)
    drv.init()
    drv.setup_queue(0)
    drv.driver_ok()
    q = dev.queues[0]
    assert dev.call(threading.current_thread) is dev._thread

    def stop_here():
        return threading.current_thread(), dev.stop_queue(q)

    wait_until(lambda: not dev._owner.locked())  # nothing to serve: it parks in select
    where, saved = dev.call(stop_here, borrow=True)
    assert where is threading.current_thread()
    assert saved is not None and not q.started
    dev.close()
