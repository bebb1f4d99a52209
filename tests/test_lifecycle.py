"""The device thread owns the lifecycle: races a second vCPU (or a VMM thread) can force.

Each test builds the interleaving the old design got wrong: a vCPU whose register write
waited for a queue another vCPU kept busy, DRIVER_OK racing a reset, a queue that starved
the others, a device thread that died on fd numbers above 1024.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import pytest
from conftest import EchoDevice
from modes import wait_until

from emu.devices.base import RunState
from emu.queue import Virtqueue
from emu.testing.delay import hold_completions
from emu.testing.driver import VirtioMmioDriver
from emu.transport import mmio_regs
from emu.transport.mmio import MmioTransport

#: how long the second vCPU keeps its queue full; a register write that waits for it fails
BUSY_S = 4.0


class SlowEcho(EchoDevice):
    """Echo, one chain at a time with a pause, as a backend call would take."""

    served = 0

    def handle_queue(self, q: Virtqueue) -> None:
        while True:
            batch = q.pop(1)
            if not len(batch):
                if q.set_kicks(True):
                    continue
                return
            time.sleep(0.001)
            q.push(batch.heads, [0])
            self.served += 1


class Refiller(threading.Thread):
    """A second vCPU keeping queue ``qidx`` full until ``BUSY_S`` passes or it is told."""

    def __init__(self, drv: VirtioMmioDriver, qidx: int) -> None:
        super().__init__(daemon=True)
        self.drv, self.q, self.qidx = drv, drv.queues[qidx], qidx
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + BUSY_S
        try:
            while not self.halt.is_set() and time.monotonic() < deadline:
                self.q.poll()
                while self.q.free_slots():
                    self.q.add([b"x"], [])
                self.drv.kick(self.qidx)
                time.sleep(0.0001)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def busy(mem):
    """A device with queue 0 kept full by a second vCPU; yields (transport, driver, dev)."""
    dev = SlowEcho(queue_max_size=64)
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    drv.init()
    drv.setup_queue(0, 64)
    drv.setup_queue(1, 64)
    drv.driver_ok()
    refill = Refiller(drv, 0)
    refill.start()
    wait_until(lambda: dev.served > 100)  # more than a ring's worth: the queue is kept busy
    yield tr, drv, dev, refill
    refill.halt.set()
    refill.join()
    assert refill.error is None
    dev.close()


@pytest.mark.parametrize("write", ["reset", "queue_ready_0", "queue_reset"])
def test_a_register_write_returns_while_another_vcpu_keeps_the_queue_busy(busy, write):
    tr, drv, dev, refill = busy
    tr.write(mmio_regs.QUEUE_SEL, 4, 0)
    if write == "reset":
        tr.write(mmio_regs.STATUS, 4, 0)
    elif write == "queue_ready_0":
        tr.write(mmio_regs.QUEUE_READY, 4, 0)
    else:
        tr.write(mmio_regs.QUEUE_RESET, 4, 1)
    assert refill.is_alive(), "the write waited until the other vCPU gave up"
    if write == "reset":
        assert tr.read(mmio_regs.STATUS, 4) == 0
        assert dev.run_state is RunState.IDLE
    elif write == "queue_ready_0":
        assert tr.read(mmio_regs.QUEUE_READY, 4) == 0 and not dev.queues[0].started
    else:
        assert tr.read(mmio_regs.QUEUE_RESET, 4) == 0 and not dev.queues[0].started


def test_a_busy_queue_does_not_starve_the_others(busy):
    """A pass serves at most a queue size of chains, then the next queue gets its turn."""
    tr, drv, dev, refill = busy
    drv.submit(1, [b"other"], [])
    drv.wait(1, timeout=BUSY_S / 2)
    assert refill.is_alive(), "queue 1 was served only once queue 0 ran dry"


def test_a_stop_waits_one_pass_not_for_the_queue_to_run_dry(busy):
    tr, drv, dev, refill = busy
    for policy in ("drain", "report"):
        tr.vmm_stop(policy, timeout=BUSY_S / 2)
        assert dev.run_state is RunState.STOPPED
        tr.vmm_resume()
    assert refill.is_alive()


def test_driver_ok_racing_a_reset_from_another_vcpu(mem):
    """Two vCPUs: one brings the device up again and again, the other resets it.

    Neither may see an exception, block, or leave a second device thread behind.
    """
    dev = EchoDevice(queue_max_size=64)
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    errors: list[BaseException] = []
    done = threading.Event()

    drv.init()
    ring = drv.setup_queue(0, 64)  # guest memory for one ring, programmed again and again
    drv.reset()
    w = tr.write

    def bring_up() -> None:
        try:
            while not done.is_set():
                w(mmio_regs.STATUS, 4, 0)
                w(mmio_regs.STATUS, 4, mmio_regs.S_ACKNOWLEDGE | mmio_regs.S_DRIVER)
                for sel in (0, 1):
                    w(mmio_regs.DEVICE_FEATURES_SEL, 4, sel)
                    w(mmio_regs.DRIVER_FEATURES_SEL, 4, sel)
                    w(mmio_regs.DRIVER_FEATURES, 4, tr.read(mmio_regs.DEVICE_FEATURES, 4))
                w(mmio_regs.STATUS, 4, tr.read(mmio_regs.STATUS, 4) | mmio_regs.S_FEATURES_OK)
                w(mmio_regs.QUEUE_SEL, 4, 0)
                w(mmio_regs.QUEUE_SIZE, 4, 64)
                for reg, addr in (
                    (mmio_regs.QUEUE_DESC_LOW, ring.desc),
                    (mmio_regs.QUEUE_DRIVER_LOW, ring.driver),
                    (mmio_regs.QUEUE_DEVICE_LOW, ring.device),
                ):
                    w(reg, 4, addr & 0xFFFFFFFF)
                    w(reg + 4, 4, addr >> 32)
                w(mmio_regs.QUEUE_READY, 4, 1)
                w(mmio_regs.STATUS, 4, tr.read(mmio_regs.STATUS, 4) | mmio_regs.S_DRIVER_OK)
                w(mmio_regs.QUEUE_NOTIFY, 4, 0)
        except BaseException as e:
            errors.append(e)

    def reset() -> None:
        try:
            while not done.is_set():
                tr.write(mmio_regs.STATUS, 4, 0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f, daemon=True) for f in (bring_up, reset)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    done.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a vCPU is blocked"
    assert errors == []
    tr.write(mmio_regs.STATUS, 4, 0)
    assert tr.read(mmio_regs.STATUS, 4) == 0 and dev.run_state is RunState.IDLE
    names = [t.name for t in threading.enumerate() if t.name == f"emu-{dev.name}"]
    assert len(names) == 1
    drv.init()  # and it still works
    drv.setup_queue(0, 64)
    drv.driver_ok()
    drv.submit(0, [b"ping"], [4])
    assert drv.wait(0)[0].length == 4
    dev.close()


def test_the_device_thread_serves_fd_numbers_above_1024(mem):
    """select() cannot watch fds >= 1024; a VMM with many devices has them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves no fd above 1024 to test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.dup(0) for _ in range(1100)]
    try:
        dev = EchoDevice(queue_max_size=64)
        assert min(q.kick_fd for q in dev.queues) > 1024
        tr = MmioTransport(dev, mem)
        drv = VirtioMmioDriver(tr, mem)
        drv.init()
        drv.setup_queue(0, 64)
        drv.driver_ok()
        for _ in range(3):  # park and wake the thread: the stopped loop polls too
            tr.vmm_stop("report")
            time.sleep(0.05)  # the thread parks while stopped
            tr.vmm_resume()
            drv.submit(0, [b"ping"], [4])
            assert drv.wait(0)[0].length == 4
        dev.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_restored_inflight_chains_come_before_new_ones_under_concurrent_kicks(mem):
    """A queue restarted with in-flight chains while new ones wait and the driver kicks
    from another vCPU: the in-flight chains are served again first, then the new ones."""
    seen: list[bytes] = []

    class Recording(EchoDevice):
        def handle_queue(self, q: Virtqueue) -> None:
            while len(batch := q.pop(64)):
                for i in range(len(batch)):
                    addrs, lens, _ = batch.segments(i)
                    seen.append(self.mem.read(int(addrs[0]), int(lens[0])))
                q.push(batch.heads, [0] * len(batch))
            q.set_kicks(True)

    dev = Recording(queue_max_size=64)
    tr = MmioTransport(dev, mem)
    drv = VirtioMmioDriver(tr, mem)
    drv.init()
    dq = drv.setup_queue(0, 64)
    vq = dev.queues[0]
    hold_completions(vq, 3600.0)
    drv.driver_ok()
    for i in range(8):
        drv.submit(0, [b"old%d" % i], [])
    wait_until(lambda: vq.held() == 8)
    tr.vmm_stop("report")
    saved = dev.stop_queue(vq)
    assert saved is not None and [c.head for c in saved[1]] == sorted(c.head for c in saved[1])
    for i in range(8):
        dq.add([b"new%d" % i], [])
    hold_completions(vq, 0.0)
    kicking = threading.Event()

    def kick() -> None:
        while not kicking.is_set():
            tr.write(mmio_regs.QUEUE_NOTIFY, 4, 0)

    kicker = threading.Thread(target=kick, daemon=True)
    kicker.start()
    dev.restore_queue(0, *saved)
    dev.start_queue(vq)
    tr.vmm_resume()
    wait_until(lambda: len(seen) == 24)
    kicking.set()
    kicker.join()
    old = [b"old%d" % i for i in range(8)]
    assert seen == old + old + [b"new%d" % i for i in range(8)]
    dev.close()
