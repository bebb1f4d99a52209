"""The numbers virtio-vsock's driver and device share (virtio 1.x, "Socket Device"):
feature bits, queue indexes, the packet header, operations, types and flags.

Kept apart from the device so the reference driver (``emu.testing.vsock``) speaks the same
protocol without importing the device's machinery.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# feature bits
F_STREAM = 0
F_SEQPACKET = 1
F_NO_IMPLIED_STREAM = 2

# queues
RX, TX, EVENTQ = 0, 1, 2

#: the well-known CID of the host; the guest's own comes from config space
HOST_CID = 2
#: CIDs a guest may not be given (0, 1, the host, and the 32-bit "any")
RESERVED_CIDS = (0, 1, HOST_CID, 0xFFFFFFFF)

# operations
OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {
    OP_INVALID: "INVALID",
    OP_REQUEST: "REQUEST",
    OP_RESPONSE: "RESPONSE",
    OP_RST: "RST",
    OP_SHUTDOWN: "SHUTDOWN",
    OP_RW: "RW",
    OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

# socket types
TYPE_STREAM = 1
TYPE_SEQPACKET = 2

# SHUTDOWN flags: the sender will not receive / will not send any more
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

# RW flags on a SEQPACKET connection: end of message, end of record
SEQ_EOM = 1
SEQ_EOR = 2

#: the event a device raises when connections could not follow it (a restore)
EVENT_TRANSPORT_RESET = 0
EVENT_MSG = struct.Struct("<I")  # le32 id

#: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
assert HDR.size == 44


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HDR.unpack_from(data))

    def pack(self) -> bytes:
        return HDR.pack(*self)

    def describe(self) -> str:
        op = OP_NAMES.get(self.op, f"op {self.op}")
        return (
            f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"type {self.type} len {self.len}"
        )
