"""Files a frontend shares with emu must not shrink under it: seal them before mapping.

Touching a page of a shared mapping that lies past the end of its file raises SIGBUS, and
SIGBUS ends the whole ``emu serve`` process, every device and connection with it. So
before emu maps a file a frontend sent (guest RAM, the inflight region, the dirty log) it
makes sure the file cannot shrink: the memfd seal F_SEAL_SHRINK, already set by the
frontend or added here, and only then checks the file's size, which can no longer change.

What real frontends send (docs/vhost-user.md): QEMU's memory-backend-memfd (``seal=on``,
the default) and its dirty log come sealed against shrinking; inflight regions are made by
the backend (emu seals its own). UML backs guest RAM with a deleted /dev/shm file, which
cannot take seals, as cannot QEMU's memory-backend-file or ``seal=off`` memfds: such guest
RAM is accepted unsealed, since refusing it would refuse UML.
"""

from __future__ import annotations

import fcntl


def seal_shrink(fd: int) -> bool:
    """Whether ``fd``'s file can no longer shrink: F_SEAL_SHRINK was set or is set now.

    False for files that take no seals (not a memfd; a memfd made without
    MFD_ALLOW_SEALING, or sealed against new seals before it was sealed against
    shrinking; an fd not open for writing).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: this file system has no seals
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:  # EPERM: F_SEAL_SEAL, or read-only
        return False
    return True
