"""The virtio-mmio register file, register by register, against the echo device."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import pytest
from conftest import ECHO_DEVICE_ID, EchoDevice

from emu.ringdefs import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_NOTIFICATION_DATA,
    F_RING_PACKED,
    F_RING_RESET,
    F_VERSION_1,
)
from emu.transport import mmio, mmio_regs
from emu.transport.mmio import MmioTransport

V1 = 1 << F_VERSION_1
MODERN = V1 | 1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC


class Harness:
    """A transport plus a record of every level the interrupt line was set to."""

    def __init__(self, device: EchoDevice, mem, version: int = 2) -> None:
        self.levels: list[int] = []
        self.t = MmioTransport(device, mem, version=version, irq=self.levels.append)
        self.dev = device

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    def features(self, value: int) -> None:
        for sel in (0, 1):
            self.w(mmio_regs.DRIVER_FEATURES_SEL, sel)
            self.w(mmio_regs.DRIVER_FEATURES, value >> (32 * sel) & 0xFFFFFFFF)

    def negotiate(self, features: int = MODERN) -> None:
        self.w(mmio_regs.STATUS, 1)
        self.w(mmio_regs.STATUS, 3)
        self.features(features)
        self.w(mmio_regs.STATUS, 0xB)
        assert self.r(mmio_regs.STATUS) == 0xB

    def setup_queue(self, index: int, size: int = 16, base: int = 0x10000) -> None:
        self.w(mmio_regs.QUEUE_SEL, index)
        self.w(mmio_regs.QUEUE_SIZE, size)
        self.w(mmio_regs.QUEUE_DESC_LOW, base)
        self.w(mmio_regs.QUEUE_DRIVER_LOW, base + 0x1000)
        self.w(mmio_regs.QUEUE_DEVICE_LOW, base + 0x2000)
        self.w(mmio_regs.QUEUE_READY, 1)


@pytest.fixture
def h(echo, mem):
    harness = Harness(echo, mem)
    yield harness
    harness.w(mmio_regs.STATUS, 0)


@pytest.fixture
def legacy(echo, mem):
    harness = Harness(echo, mem, version=1)
    yield harness
    harness.w(mmio_regs.STATUS, 0)


def warned(caplog) -> list[str]:
    msgs = [r.getMessage() for r in caplog.records if r.name == mmio.__name__]
    caplog.clear()
    return msgs


# -- identification and features --


def test_identity_registers(h, echo, mem):
    assert h.r(mmio_regs.MAGIC_VALUE) == 0x74726976
    assert h.r(mmio_regs.VERSION) == 2
    assert h.r(mmio_regs.DEVICE_ID) == ECHO_DEVICE_ID
    assert h.r(mmio_regs.VENDOR_ID) == 0x554D4555
    other = MmioTransport(echo, mem, version=1, vendor_id=0x1234)
    assert other.read(mmio_regs.VERSION, 4) == 1
    assert other.read(mmio_regs.VENDOR_ID, 4) == 0x1234
    with pytest.raises(ValueError):
        MmioTransport(echo, mem, version=3)


def test_device_features_are_read_32_bits_at_a_time(h, echo):
    words = []
    for sel in (0, 1, 2, 0xFFFFFFFF):
        h.w(mmio_regs.DEVICE_FEATURES_SEL, sel)
        words.append(h.r(mmio_regs.DEVICE_FEATURES))
    assert words[0] | words[1] << 32 == echo.features | h.t.transport_features
    assert words[1] & 1  # VERSION_1 is bit 32
    assert words[2:] == [0, 0]


def test_driver_features_are_written_32_bits_at_a_time(h):
    h.w(mmio_regs.DRIVER_FEATURES_SEL, 1)
    h.w(mmio_regs.DRIVER_FEATURES, 0x1)
    h.w(mmio_regs.DRIVER_FEATURES_SEL, 0)
    h.w(mmio_regs.DRIVER_FEATURES, 1 << F_EVENT_IDX)
    assert h.t.driver_features == V1 | 1 << F_EVENT_IDX
    h.w(mmio_regs.DRIVER_FEATURES, 0)  # rewriting one word leaves the other alone
    assert h.t.driver_features == V1


# -- bad accesses: ignored and logged, never raised --


@pytest.mark.parametrize(
    "off,size",
    [
        (mmio_regs.STATUS, 2),
        (mmio_regs.STATUS, 1),
        (mmio_regs.STATUS + 1, 4),
        (mmio_regs.QUEUE_SEL, 8),
        (0x072, 2),
    ],
)
def test_control_registers_need_aligned_32_bit_accesses(h, caplog, off, size):
    h.w(mmio_regs.STATUS, 1)
    caplog.clear()
    assert h.t.read(off, size) == 0
    h.t.write(off, size, 0xFF)
    assert h.r(mmio_regs.STATUS) == 1
    assert len(warned(caplog)) == 2


@pytest.mark.parametrize(
    "off",
    [
        mmio_regs.MAGIC_VALUE,
        mmio_regs.VERSION,
        mmio_regs.DEVICE_ID,
        mmio_regs.DEVICE_FEATURES,
        0x034,
        0x060,
    ],
)
def test_writes_to_read_only_registers_are_ignored(h, caplog, off):
    before = h.r(off)
    h.w(off, 0x5A5A)
    assert h.r(off) == before
    assert any("read-only" in m for m in warned(caplog))


@pytest.mark.parametrize("off", [0x014, 0x020, 0x024, 0x030, 0x038, 0x050, 0x064, 0x080, 0x0AC])
def test_reads_of_write_only_registers_return_zero(h, caplog, off):
    assert h.r(off) == 0
    assert any("write-only" in m for m in warned(caplog))


@pytest.mark.parametrize("off", [0x018, 0x01C, 0x028, 0x03C, 0x040, 0x048, 0x0CC, 0x0F8])
def test_unknown_offsets_are_ignored(h, caplog, off):
    h.w(off, 0x1000)
    assert h.r(off) == 0
    msgs = warned(caplog)
    assert len(msgs) == 2 and all("unknown" in m for m in msgs)


# -- status --


def test_init_sequence_and_driver_ok_activates_ready_queues(h, echo):
    assert h.r(mmio_regs.STATUS) == 0
    h.negotiate()
    h.setup_queue(0)
    assert not echo.queues[0].started  # nothing runs before DRIVER_OK
    h.w(mmio_regs.STATUS, 0xF)
    assert h.r(mmio_regs.STATUS) == 0xF
    assert echo.driver_features == MODERN
    assert echo.queues[0].started and not echo.queues[1].started
    h.setup_queue(1, base=0x20000)  # QueueReady after DRIVER_OK starts the queue at once
    assert echo.queues[1].started
    assert (echo.queues[1].desc, echo.queues[1].driver) == (0x20000, 0x21000)


@pytest.mark.parametrize(
    "features,why",
    [
        (1 << F_EVENT_IDX, "no VERSION_1 on a modern transport"),
        (V1 | 1 << 60, "a bit the device does not offer"),
    ],
)
def test_features_ok_does_not_stick_when_refused(h, caplog, features, why):
    h.w(mmio_regs.STATUS, 1)
    h.w(mmio_regs.STATUS, 3)
    h.features(features)
    h.w(mmio_regs.STATUS, 0xB)
    assert h.r(mmio_regs.STATUS) == 3, why
    assert warned(caplog)
    h.w(mmio_regs.STATUS, 0x7)  # and DRIVER_OK without FEATURES_OK is refused too
    assert h.r(mmio_regs.STATUS) == 3


def test_features_ok_asks_the_device(echo, mem, monkeypatch):
    h = Harness(echo, mem)
    monkeypatch.setattr(echo, "accept_features", lambda f: not f >> F_INDIRECT_DESC & 1)
    h.negotiate(V1)
    h.w(mmio_regs.STATUS, 0)
    h.w(mmio_regs.STATUS, 3)
    h.features(MODERN)
    h.w(mmio_regs.STATUS, 0xB)
    assert h.r(mmio_regs.STATUS) == 3


def test_driver_features_are_frozen_after_features_ok(h, caplog):
    h.negotiate()
    h.features(V1 | 1 << F_RING_PACKED)
    assert h.t.driver_features == MODERN
    assert warned(caplog)


def test_driver_cannot_clear_status_bits(h, caplog):
    h.negotiate()
    h.w(mmio_regs.STATUS, 0x9)  # drops DRIVER
    assert h.r(mmio_regs.STATUS) == 0xB
    assert any("refused" in m for m in warned(caplog))


def test_unknown_and_device_owned_status_bits_are_ignored(h, caplog):
    h.w(mmio_regs.STATUS, 1 | 0x10 | 0x20 | mmio_regs.S_DEVICE_NEEDS_RESET)
    assert h.r(mmio_regs.STATUS) == 1
    assert warned(caplog)
    h.w(mmio_regs.STATUS, 1 | mmio_regs.S_FAILED)
    assert h.r(mmio_regs.STATUS) == 1 | mmio_regs.S_FAILED


def test_reset_returns_every_register_to_its_default(h, echo):
    h.negotiate()
    h.setup_queue(0, size=64)
    h.w(mmio_regs.QUEUE_SEL, 1)
    h.w(mmio_regs.DEVICE_FEATURES_SEL, 1)
    h.w(mmio_regs.STATUS, 0xF)
    echo.queues[0].notify()
    echo.on_config_change()
    assert h.r(mmio_regs.INTERRUPT_STATUS) == 3 and h.levels == [1]
    h.w(mmio_regs.STATUS, 0)
    assert h.levels == [1, 0]
    assert h.r(mmio_regs.STATUS) == 0
    assert h.r(mmio_regs.INTERRUPT_STATUS) == 0
    assert h.t.driver_features == 0 and echo.driver_features == 0
    assert h.t.queue_sel == 0 and h.t.device_features_sel == 0
    assert h.r(mmio_regs.DEVICE_FEATURES) == echo.features & 0xFFFFFFFF
    q = echo.queues[0]
    assert h.r(mmio_regs.QUEUE_READY) == 0 and not q.started
    assert (q.size, q.desc, q.driver, q.device) == (256, 0, 0, 0)
    h.negotiate()  # and the device can be brought up again
    h.setup_queue(0)
    h.w(mmio_regs.STATUS, 0xF)
    assert q.started


# -- interrupts --


def test_used_buffer_interrupt_and_ack(h, echo):
    h.negotiate()
    h.w(mmio_regs.STATUS, 0xF)
    echo.queues[0].notify()
    echo.queues[1].notify()
    assert h.r(mmio_regs.INTERRUPT_STATUS) == mmio_regs.INT_VRING
    assert h.levels == [1]  # level-triggered: one rising edge
    h.w(mmio_regs.INTERRUPT_ACK, mmio_regs.INT_VRING)
    assert h.r(mmio_regs.INTERRUPT_STATUS) == 0 and h.levels == [1, 0]
    h.w(mmio_regs.INTERRUPT_ACK, mmio_regs.INT_VRING)  # nothing pending: no edge
    assert h.levels == [1, 0]


def test_partial_ack_keeps_the_line_up(h, echo):
    h.negotiate()
    h.w(mmio_regs.STATUS, 0xF)
    echo.queues[0].notify()
    echo.on_config_change()
    h.w(mmio_regs.INTERRUPT_ACK, mmio_regs.INT_VRING)
    assert h.r(mmio_regs.INTERRUPT_STATUS) == mmio_regs.INT_CONFIG and h.levels == [1]
    h.w(mmio_regs.INTERRUPT_ACK, mmio_regs.INT_CONFIG)
    assert h.levels == [1, 0]


def test_config_change_bumps_generation_and_interrupts_only_after_driver_ok(h, echo):
    gen = h.r(mmio_regs.CONFIG_GENERATION)
    echo.on_config_change()
    assert h.r(mmio_regs.CONFIG_GENERATION) == gen + 1
    assert h.r(mmio_regs.INTERRUPT_STATUS) == 0 and h.levels == []
    h.negotiate()
    h.w(mmio_regs.STATUS, 0xF)
    h.t.write(mmio_regs.CONFIG + 4, 4, 0xAB)  # the echo device reports scratch writes as changes
    assert h.r(mmio_regs.CONFIG_GENERATION) == gen + 2
    assert h.r(mmio_regs.INTERRUPT_STATUS) == mmio_regs.INT_CONFIG and h.levels == [1]


def test_needs_reset_sets_status_and_raises_config_interrupt(h, echo):
    echo.on_needs_reset("before DRIVER_OK")
    assert h.r(mmio_regs.STATUS) & mmio_regs.S_DEVICE_NEEDS_RESET
    assert h.levels == []  # no interrupt before DRIVER_OK
    h.w(mmio_regs.STATUS, 0)
    h.negotiate()
    h.w(mmio_regs.STATUS, 0xF)
    echo.fail("hostile ring")
    assert h.r(mmio_regs.STATUS) == 0xF | mmio_regs.S_DEVICE_NEEDS_RESET
    assert h.r(mmio_regs.INTERRUPT_STATUS) == mmio_regs.INT_CONFIG and h.levels == [1]
    # the driver gives up
    h.w(mmio_regs.STATUS, 0xF | mmio_regs.S_DEVICE_NEEDS_RESET | mmio_regs.S_FAILED)
    assert h.r(mmio_regs.STATUS) & mmio_regs.S_FAILED
    h.w(mmio_regs.STATUS, 0)
    assert h.r(mmio_regs.STATUS) == 0 and echo.broken is None


# -- queues --


def kicked(q) -> bool:
    try:
        return os.eventfd_read(q.kick_fd) > 0
    except BlockingIOError:
        return False


def test_queue_notify_kicks_the_selected_queue(h, echo, caplog):
    h.w(mmio_regs.QUEUE_NOTIFY, 1)
    assert kicked(echo.queues[1]) and not kicked(echo.queues[0])
    h.w(mmio_regs.QUEUE_NOTIFY, 0x10001)  # without NOTIFICATION_DATA the whole value is the index
    assert not kicked(echo.queues[1])
    assert any("absent queue" in m for m in warned(caplog))


def test_queue_notify_with_notification_data(mem):
    dev = EchoDevice(device_features=1 << F_NOTIFICATION_DATA)
    h = Harness(dev, mem)
    try:
        h.negotiate(MODERN | 1 << F_NOTIFICATION_DATA)
        h.w(mmio_regs.QUEUE_NOTIFY, 0x8005 << 16 | 1)  # next_wrap 1, next_off 5, queue 1
        assert kicked(dev.queues[1]) and not kicked(dev.queues[0])
    finally:
        dev.close()


def test_queue_size_max_ready_and_absent_queues(h, caplog):
    h.w(mmio_regs.QUEUE_SEL, 1)
    assert h.r(mmio_regs.QUEUE_SIZE_MAX) == 256
    assert h.r(mmio_regs.QUEUE_READY) == 0
    h.w(mmio_regs.QUEUE_SEL, 2)
    assert h.r(mmio_regs.QUEUE_SIZE_MAX) == 0
    assert h.r(mmio_regs.QUEUE_READY) == 0
    h.w(mmio_regs.QUEUE_SIZE, 16)
    h.w(mmio_regs.QUEUE_READY, 1)
    assert h.r(mmio_regs.QUEUE_READY) == 0
    assert len(warned(caplog)) == 2


def test_queue_addresses_take_low_and_high_words(h, echo):
    h.w(mmio_regs.QUEUE_SEL, 1)
    regs = [mmio_regs.QUEUE_DESC_LOW, mmio_regs.QUEUE_DRIVER_LOW, mmio_regs.QUEUE_DEVICE_LOW]
    for i, off in enumerate(regs):
        h.w(off, 0x1000 * (i + 1))
        h.w(off + 4, i + 1)
    q = echo.queues[1]
    assert (q.desc, q.driver, q.device) == (0x1_00001000, 0x2_00002000, 0x3_00003000)
    h.w(mmio_regs.QUEUE_DESC_HIGH, 0)
    assert q.desc == 0x1000


@pytest.mark.parametrize("size,ok", [(1, True), (64, True), (256, True), (48, False), (0, False)])
def test_split_queue_size_must_be_a_power_of_two_up_to_max(h, echo, size, ok):
    h.w(mmio_regs.QUEUE_SIZE, 512)
    h.w(mmio_regs.QUEUE_SIZE, size)
    assert echo.queues[0].size == (size if ok else 256)


def test_packed_queue_size_need_not_be_a_power_of_two(h, echo):
    h.negotiate(MODERN | 1 << F_RING_PACKED)
    h.w(mmio_regs.QUEUE_SIZE, 48)
    assert echo.queues[0].size == 48
    h.w(mmio_regs.QUEUE_SIZE, 257)
    assert echo.queues[0].size == 48


def test_queue_registers_are_frozen_while_ready(h, echo, caplog):
    h.negotiate()
    h.setup_queue(0, size=16)
    for off in (
        mmio_regs.QUEUE_SIZE,
        mmio_regs.QUEUE_DESC_LOW,
        mmio_regs.QUEUE_DRIVER_HIGH,
        mmio_regs.QUEUE_DEVICE_LOW,
    ):
        h.w(off, 32)
    q = echo.queues[0]
    assert (q.size, q.desc, q.driver, q.device) == (16, 0x10000, 0x11000, 0x12000)
    assert len(warned(caplog)) == 4
    h.w(mmio_regs.QUEUE_READY, 0)  # the driver stops the queue, then may change it
    assert h.r(mmio_regs.QUEUE_READY) == 0
    h.w(mmio_regs.QUEUE_SIZE, 32)
    assert q.size == 32


def test_queue_ready_other_values_are_ignored(h, caplog):
    h.w(mmio_regs.QUEUE_READY, 2)
    assert h.r(mmio_regs.QUEUE_READY) == 0
    assert warned(caplog)


def test_queue_reset_needs_ring_reset(h, echo, caplog):
    h.negotiate()
    h.setup_queue(0)
    h.w(mmio_regs.QUEUE_RESET, 1)
    assert h.r(mmio_regs.QUEUE_READY) == 1
    assert any("RING_RESET" in m for m in warned(caplog))


def test_queue_reset_resets_one_queue(h, echo):
    h.negotiate(MODERN | 1 << F_RING_RESET)
    h.setup_queue(0, size=16)
    h.setup_queue(1, size=16, base=0x20000)
    h.w(mmio_regs.STATUS, 0xF)
    h.w(mmio_regs.QUEUE_SEL, 0)
    h.w(mmio_regs.QUEUE_RESET, 1)
    assert h.r(mmio_regs.QUEUE_RESET) == 0 and h.r(mmio_regs.QUEUE_READY) == 0
    q0, q1 = echo.queues
    assert not q0.started and (q0.size, q0.desc, q0.driver, q0.device) == (256, 0, 0, 0)
    assert q1.started and h.r(mmio_regs.STATUS) == 0xF
    h.setup_queue(0, size=32, base=0x30000)  # re-enabled with new parameters
    assert q0.started and q0.size == 32


def test_shared_memory_registers_report_no_region(h):
    for sel in (0, 3):
        h.w(mmio_regs.SHM_SEL, sel)
        for off in (
            mmio_regs.SHM_LEN_LOW,
            mmio_regs.SHM_LEN_HIGH,
            mmio_regs.SHM_BASE_LOW,
            mmio_regs.SHM_BASE_HIGH,
        ):
            assert h.r(off) == 0xFFFFFFFF


# -- configuration space --


def test_config_space_reads_of_every_width(h):
    magic = EchoDevice.MAGIC
    assert h.t.read(mmio_regs.CONFIG, 4) == magic
    assert h.t.read(mmio_regs.CONFIG + 2, 2) == magic >> 16
    assert h.t.read(mmio_regs.CONFIG + 1, 1) == magic >> 8 & 0xFF
    h.t.write(mmio_regs.CONFIG + 4, 4, 0x12345678)
    assert h.t.read(mmio_regs.CONFIG, 8) == 0x12345678 << 32 | magic
    h.t.write(mmio_regs.CONFIG, 8, 0xCAFEF00D << 32 | 1)  # an 8-byte write is two 4-byte ones
    assert h.dev.scratch == 0xCAFEF00D
    assert h.t.read(mmio_regs.CONFIG + 0x40, 4) == 0  # beyond the device's config


@pytest.mark.parametrize("off,size", [(1, 2), (2, 4), (2, 8), (0, 3), (0, 16)])
def test_config_space_refuses_misaligned_or_odd_widths(h, caplog, off, size):
    assert h.t.read(mmio_regs.CONFIG + off, size) == 0
    h.t.write(mmio_regs.CONFIG + off, size, 0xFF)
    assert h.dev.scratch == 0
    assert len(warned(caplog)) == 2


# -- legacy (version 1) --


def test_legacy_features_hide_the_high_word_and_add_legacy_bits(legacy, echo):
    legacy.w(mmio_regs.DEVICE_FEATURES_SEL, 1)
    assert legacy.r(mmio_regs.DEVICE_FEATURES) == 0
    legacy.w(mmio_regs.DEVICE_FEATURES_SEL, 0)
    low = legacy.r(mmio_regs.DEVICE_FEATURES)
    assert low == echo.features & 0xFFFFFFFF | 1 << mmio_regs.F_ANY_LAYOUT


def test_legacy_does_not_offer_notify_on_empty(legacy, echo):
    """The rings never notify on empty, so the feature is not offered, and a driver that
    sets it anyway does not get it (QEMU offers it; Linux never accepts it)."""
    legacy.w(mmio_regs.DEVICE_FEATURES_SEL, 0)
    assert not legacy.r(mmio_regs.DEVICE_FEATURES) >> mmio_regs.F_NOTIFY_ON_EMPTY & 1
    legacy.w(mmio_regs.STATUS, 3)
    legacy.w(mmio_regs.DRIVER_FEATURES_SEL, 0)
    legacy.w(
        mmio_regs.DRIVER_FEATURES, 1 << mmio_regs.F_NOTIFY_ON_EMPTY | 1 << mmio_regs.F_ANY_LAYOUT
    )
    legacy.w(mmio_regs.STATUS, 7)
    assert legacy.r(mmio_regs.STATUS) == 7
    assert not echo.driver_features >> mmio_regs.F_NOTIFY_ON_EMPTY & 1


def test_legacy_tolerates_linux_writing_the_high_feature_word(legacy, caplog):
    legacy.w(mmio_regs.DRIVER_FEATURES_SEL, 1)
    legacy.w(mmio_regs.DRIVER_FEATURES, 0)
    assert warned(caplog) == []
    legacy.w(mmio_regs.DRIVER_FEATURES, 1)
    assert warned(caplog) and legacy.t.driver_features == 0


def test_legacy_registers_only_exist_on_version_1(legacy, caplog):
    for off in (
        mmio_regs.QUEUE_READY,
        mmio_regs.QUEUE_DESC_LOW,
        mmio_regs.SHM_LEN_LOW,
        0x0C0,
        0x0FC,
    ):
        legacy.w(off, 1)
        assert legacy.r(off) == 0
    assert len(warned(caplog)) == 10


def test_legacy_queue_pfn_layout_and_driver_ok_without_features_ok(legacy, echo):
    lg = legacy
    lg.w(mmio_regs.GUEST_PAGE_SIZE, 0x1000)
    lg.w(mmio_regs.STATUS, 0)  # Linux writes GuestPageSize before the reset: it must survive
    lg.w(mmio_regs.STATUS, 1)
    lg.w(mmio_regs.STATUS, 3)
    lg.features(1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC | 1 << 27)
    lg.w(mmio_regs.QUEUE_SEL, 0)
    assert lg.r(mmio_regs.QUEUE_PFN) == 0
    assert lg.r(mmio_regs.QUEUE_SIZE_MAX) == 256
    lg.w(mmio_regs.QUEUE_SIZE, 64)
    lg.w(mmio_regs.QUEUE_ALIGN, 0x1000)
    lg.w(mmio_regs.QUEUE_PFN, 0x40)
    q = echo.queues[0]
    assert lg.r(mmio_regs.QUEUE_PFN) == 0x40
    assert (q.desc, q.driver, q.device) == (0x40000, 0x40400, 0x41000)
    lg.w(mmio_regs.STATUS, 7)
    assert lg.r(mmio_regs.STATUS) == 7
    assert q.started
    assert echo.driver_features == 1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC  # ANY_LAYOUT stays
    lg.w(mmio_regs.QUEUE_PFN, 0)  # a legacy driver stops a queue by writing 0
    assert lg.r(mmio_regs.QUEUE_PFN) == 0 and not q.started
    lg.w(mmio_regs.QUEUE_ALIGN, 0x100)
    lg.w(mmio_regs.QUEUE_PFN, 0x40)
    assert q.device == 0x40500 and q.started  # 0x40400 + 6 + 2 * 64, aligned up
    lg.w(mmio_regs.STATUS, 0)
    assert lg.r(mmio_regs.QUEUE_PFN) == 0 and q.desc == 0
    assert lg.t.queue_align[0] == 0x1000
    assert lg.t.guest_page_size == 0x1000


def test_legacy_refuses_features_ok_and_bad_queue_setup(legacy, echo, caplog):
    lg = legacy
    lg.w(mmio_regs.STATUS, 1)
    lg.w(mmio_regs.STATUS, 3)
    lg.w(mmio_regs.STATUS, 0xB)
    assert lg.r(mmio_regs.STATUS) == 3
    lg.w(mmio_regs.QUEUE_PFN, 0x40)  # before GuestPageSize
    assert lg.r(mmio_regs.QUEUE_PFN) == 0
    lg.w(mmio_regs.GUEST_PAGE_SIZE, 3000)
    lg.w(mmio_regs.QUEUE_ALIGN, 3000)
    lg.w(mmio_regs.QUEUE_SIZE, 48)
    assert lg.t.guest_page_size == 0 and lg.t.queue_align[0] == 0x1000
    assert echo.queues[0].size == 256
    assert len(warned(caplog)) == 5


def test_no_access_raises_into_the_caller(h, legacy):
    """Sweep every offset and width with junk: the VMM's exit handler must never see an error."""
    for harness in (h, legacy):
        for off in range(0, 0x140):
            for size in (1, 2, 4, 8):
                harness.t.write(off, size, 0xFFFFFFFFFFFFFFFF)
                harness.t.read(off, size)


def test_logging_uses_the_module_logger(h, caplog):
    with caplog.at_level(logging.WARNING, logger=mmio.__name__):
        h.r(0x0F0)
    assert caplog.records[0].levelno == logging.WARNING


def test_irq_level_stays_consistent_under_concurrent_notify_and_ack(h, echo):
    """Device threads raise while the vCPU ACKs: the line must still alternate 1, 0, 1, ..."""
    h.negotiate()
    h.w(mmio_regs.STATUS, 0xF)
    stop = threading.Event()

    def device_side(q):
        while not stop.is_set():
            q.notify()

    threads = [threading.Thread(target=device_side, args=(q,)) for q in echo.queues]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(h.levels) < 200 and time.monotonic() < deadline:
            if isr := h.r(mmio_regs.INTERRUPT_STATUS):
                h.w(mmio_regs.INTERRUPT_ACK, isr)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    assert len(h.levels) >= 200
    assert h.levels == [1, 0] * (len(h.levels) // 2) + [1] * (len(h.levels) % 2)
    assert bool(h.r(mmio_regs.INTERRUPT_STATUS)) == (h.levels[-1] == 1)
