"""The TRANSPORT part of a virtio-mmio snapshot: its schema and its check against a transport.

``MmioTransport.save`` writes the part and ``restore`` reads it back; the schema fixes every
register's type and range, ``check_registers`` what depends on the transport restored onto.
"""

from __future__ import annotations

from emu.state.format import StateError
from emu.state.schema import Bool, Const, Int, List, Schema
from emu.transport.mmio_regs import (
    INT_CONFIG,
    INT_VRING,
    S_FEATURES_OK,
    S_STOP,
    S_SUSPEND,
    is_pow2,
)

_U32 = 0xFFFFFFFF
#: the TRANSPORT part ``save`` writes and ``restore`` reads: every register, typed and ranged
REGISTERS = Schema(
    "virtio-mmio registers",
    1,
    0,
    {
        "transport": Const("virtio-mmio"),
        "version": Int(1, 2),
        "device_features_sel": Int(0, _U32),
        "driver_features_sel": Int(0, _U32),
        "driver_features": Int(0, 2**64 - 1),
        "queue_sel": Int(0, _U32),
        "shm_sel": Int(0, _U32),
        "queue_align": List(Int(1, _U32), 0x10000),
        "guest_page_size": Int(0, _U32),
        "interrupt_status": Int(0, INT_VRING | INT_CONFIG),
        "config_generation": Int(0, _U32),
        "vmm_stopped": Bool(),
        "guest_stop_pending": Bool(),
        "config_pending": Bool(),
    },
)
#: transport attributes a snapshot keeps (``save``/``restore``), beside the device's parts
SAVED_REGISTERS = tuple(
    k for k in REGISTERS.fields if k not in ("transport", "guest_stop_pending", "config_pending")
)


def check_registers(
    regs: dict | None, version: int, offered: int, queues: int, status: int
) -> dict:
    """The TRANSPORT part (types and ranges already checked by REGISTERS) against a
    transport of ``version`` offering ``offered`` over a device with ``queues`` queues, and
    against the saved device ``status``."""
    if regs is None:
        raise StateError("the state carries no virtio-mmio registers")
    if regs["guest_stop_pending"] and not (regs["vmm_stopped"] and status & (S_STOP | S_SUSPEND)):
        raise StateError(
            "saved guest_stop_pending without a VMM stop and a guest STOP/SUSPEND in the status"
        )
    if regs["version"] != version:
        raise StateError(f"saved virtio-mmio version {regs['version']}, this is {version}")
    # before FEATURES_OK the register holds whatever the driver wrote; FEATURES_OK checks it
    if status & S_FEATURES_OK and regs["driver_features"] & ~offered:
        raise StateError(
            f"saved driver_features {regs['driver_features']:#x} are not all offered here"
        )
    if len(regs["queue_align"]) != queues:
        raise StateError(
            f"saved queue_align has {len(regs['queue_align'])} queues, this device {queues}"
        )
    if regs["guest_page_size"] and not is_pow2(regs["guest_page_size"]):
        raise StateError(f"saved guest_page_size {regs['guest_page_size']:#x} is not a power of 2")
    if not all(is_pow2(a) for a in regs["queue_align"]):
        raise StateError(f"saved queue_align {regs['queue_align']} are not powers of 2")
    return regs
