"""The frontend's half of DEVICE_STATE: move a stopped backend's state through a pipe.

QEMU (8.2+) does the same with its migration stream: SET_DEVICE_STATE_FD hands the
backend one end of a pipe, the frontend reads (save) or writes (load) the other end, then
CHECK_DEVICE_STATE asks whether it all went well. The backend may return a pipe end of
its own instead of using ours (bit 8 of the reply clear); that is honoured.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from emu.state.format import MAX_STATE_BYTES
from emu.vhost_user.protocol import PF, U64, Req

if TYPE_CHECKING:
    from emu.vhost_user.frontend import VhostUserFrontend

#: SET_DEVICE_STATE_FD payload: direction (SAVE: backend to frontend, LOAD), phase
STATE_FD = struct.Struct("<II")
SAVE, LOAD = 0, 1
PHASE_STOPPED = 0  # the only phase: the device is stopped
#: reply bit: the backend returns no fd of its own (bits 0-7: 0 ok, else refused)
NO_FD = 1 << 8


class StateTransferError(Exception):
    """The backend refused a state transfer or reported it failed."""


def _open(fe: VhostUserFrontend, direction: int, ours: int) -> int:
    """SET_DEVICE_STATE_FD with ``ours``; returns the fd to use (ours or the backend's)."""
    if not fe.protocol >> PF.DEVICE_STATE & 1:
        raise StateTransferError("the backend does not offer DEVICE_STATE")
    answer = fe.request(Req.SET_DEVICE_STATE_FD, STATE_FD.pack(direction, PHASE_STOPPED), [ours])
    if len(answer.payload) != U64.size or len(answer.fds) > 1:
        answer.close_fds()
        raise StateTransferError(f"SET_DEVICE_STATE_FD answered {answer.payload.hex()}")
    (value,) = U64.unpack(answer.payload)
    if value & 0xFF:
        answer.close_fds()
        raise StateTransferError(f"backend refused the state transfer ({value:#x})")
    if value & NO_FD:
        if answer.fds:
            answer.close_fds()
            raise StateTransferError("SET_DEVICE_STATE_FD: an fd despite the no-fd flag")
        return -1
    if not answer.fds:
        raise StateTransferError("SET_DEVICE_STATE_FD: no fd and no no-fd flag")
    return answer.fds[0]


def _check(fe: VhostUserFrontend) -> None:
    if fe.get_u64(Req.CHECK_DEVICE_STATE) != 0:
        raise StateTransferError("backend reports the state transfer failed")


def save_state(fe: VhostUserFrontend) -> bytes:
    """The backend's state; every ring must have been stopped (``stop_ring``)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        theirs = _open(fe, SAVE, w)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)  # the backend has its own copy: EOF comes when it closes it
    if theirs >= 0:
        os.close(r)
        r = theirs
    data = bytearray()
    try:
        while chunk := os.read(r, 1 << 16):
            data += chunk
            if len(data) > MAX_STATE_BYTES:
                raise StateTransferError(f"state longer than {MAX_STATE_BYTES} bytes")
    finally:
        os.close(r)
    _check(fe)
    return bytes(data)


def load_state(fe: VhostUserFrontend, data: bytes) -> None:
    """Hand ``data`` to the backend before its rings start; raises if it is refused."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        theirs = _open(fe, LOAD, r)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    if theirs >= 0:
        os.close(w)
        w = theirs
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
    except BrokenPipeError as e:
        raise StateTransferError("backend stopped reading the state") from e
    finally:
        os.close(w)
    _check(fe)
