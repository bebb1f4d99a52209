"""The snapshot container: header, virtio 1.4 device parts, checksum.

Layout (all little-endian):

    header   magic "EMUSTATE" (8) | format version u16 | device type u16 | flags u32
             | part count u32 | payload length u32
    parts    each: virtio_dev_part_hdr (part_type u16, flags u8 (bit0 OPTIONAL), reserved u8,
             selector 8 bytes, length u32) followed by ``length`` value bytes
    trailer  sha256 of header + parts (32)

The part header is exactly the virtio 1.4 ``struct virtio_dev_part_hdr`` so that the
standard parts (features, status, queue config) read as the spec defines them; emu's own
parts use part types 0xE000-0xEFFF (see ``emu.state.parts``). Decoding checks everything
before returning, so a caller never applies half of a bad file.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

MAGIC = b"EMUSTATE"
FORMAT_VERSION = 1
PART_F_OPTIONAL = 0x01

_HEADER = struct.Struct("<8sHHIII")
_PART_HDR = struct.Struct("<HBB8sI")
_DIGEST = 32
MAX_STATE_BYTES = 64 << 20  # a device state is small; refuse absurd files before reading


class StateError(Exception):
    """A state file or stream that must not be restored (corrupt, truncated, incompatible)."""


@dataclass
class Part:
    type: int
    value: bytes
    selector: bytes = bytes(8)
    flags: int = 0

    @property
    def optional(self) -> bool:
        return bool(self.flags & PART_F_OPTIONAL)

    @property
    def vq_index(self) -> int:
        return int.from_bytes(self.selector[:2], "little")


def vq_selector(index: int) -> bytes:
    return index.to_bytes(2, "little") + bytes(6)


@dataclass
class DeviceState:
    device_type: int
    parts: list[Part] = field(default_factory=list)
    flags: int = 0

    def find(self, part_type: int) -> list[Part]:
        return [p for p in self.parts if p.type == part_type]


def encode(state: DeviceState) -> bytes:
    body = bytearray()
    for p in state.parts:
        if len(p.selector) != 8:
            raise ValueError("part selector must be 8 bytes")
        body += _PART_HDR.pack(p.type, p.flags, 0, p.selector, len(p.value))
        body += p.value
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, state.device_type, state.flags, len(state.parts), len(body)
    )
    data = head + bytes(body)
    return data + hashlib.sha256(data).digest()


def decode(data: bytes) -> DeviceState:
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"state is {len(data)} bytes, more than the {MAX_STATE_BYTES} allowed")
    if len(data) < _HEADER.size + _DIGEST:
        raise StateError(f"state truncated: {len(data)} bytes is shorter than a header")
    magic, version, device_type, flags, count, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"not an emu state file (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise StateError(
            f"state format version {version} is not supported (this emu reads {FORMAT_VERSION})"
        )
    end = _HEADER.size + length
    if len(data) != end + _DIGEST:
        raise StateError(
            f"state truncated or padded: header says {end + _DIGEST} bytes, got {len(data)}"
        )
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise StateError("state checksum mismatch: the file is corrupt")
    parts = []
    off = _HEADER.size
    for i in range(count):
        if off + _PART_HDR.size > end:
            raise StateError(f"part {i} header runs past the end of the state")
        ptype, pflags, _, selector, plen = _PART_HDR.unpack_from(data, off)
        off += _PART_HDR.size
        if off + plen > end:
            raise StateError(f"part {i} (type {ptype:#x}) value runs past the end of the state")
        parts.append(Part(ptype, bytes(data[off : off + plen]), selector, pflags))
        off += plen
    if off != end:
        raise StateError(f"{end - off} stray bytes after the last part")
    return DeviceState(device_type, parts, flags)
