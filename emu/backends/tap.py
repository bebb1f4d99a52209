"""A Linux TAP interface (/dev/net/tun) as a NetDevice backend.

A reader thread blocks in poll() on the tap fd and hands each frame to the device's
``deliver`` (which queues it and wakes the device thread); transmit is a non-blocking
write from the device thread, dropped (and counted) if the kernel queue is full.

With ``vnet_hdr=True`` the tap speaks IFF_VNET_HDR: every frame carries a 10-byte
virtio_net_hdr. No TUNSETOFFLOAD is issued, so the kernel sends neither GSO packets nor
partial checksums, the header read is all zero and is dropped, and an all-zero one is
written; it is there for hosts whose tap users insist on the header.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.devices.net import NetDevice

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_LEN = 10
READ_MAX = 65536 + 18 + VNET_HDR_LEN


class TapError(Exception):
    """The host does not let us have a TAP interface."""


class Tap:
    def __init__(self, name: str = "emutap%d", *, vnet_hdr: bool = False) -> None:
        """``name`` may hold ``%d`` for the kernel to number; the result is ``self.name``."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as e:
            raise TapError("/dev/net/tun does not exist (tun module not loaded?)") from e
        except PermissionError as e:
            raise TapError("/dev/net/tun: permission denied") from e
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except OSError as e:
            os.close(fd)
            raise TapError(f"cannot create tap {name!r}: {e.strerror} (needs CAP_NET_ADMIN)") from e
        self.name = ifr[:16].rstrip(b"\0").decode()
        self.fd = fd
        self.hdr = bytes(VNET_HDR_LEN if vnet_hdr else 0)
        self.dropped = 0  # transmitted frames the kernel would not take
        self.device: NetDevice | None = None
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    def attach(self, device: NetDevice) -> None:
        self.device = device
        self._thread = threading.Thread(target=self._reader, name=f"emu-{self.name}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        poller.register(self.fd, select.POLLIN)
        skip = len(self.hdr)
        while all(fd != self._stop for fd, _ in poller.poll()):
            while True:
                try:
                    data = os.read(self.fd, READ_MAX)
                except BlockingIOError:
                    break
                if self.device is not None and len(data) > skip:
                    self.device.deliver(data[skip:])

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, self.hdr + frame)
        except OSError:  # EAGAIN: queue full; EIO: interface down
            self.dropped += 1

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self._stop)
            self.fd = -1


@contextmanager
def host_tap(name: str, address: str) -> Iterator[str]:
    """A TAP interface ``name`` on the host with ``address`` (CIDR), up; deleted afterwards
    (one left by an earlier run is deleted first). Needs root and ip(8)."""
    subprocess.run(["ip", "link", "del", name], capture_output=True)  # a leftover
    for cmd in (
        ["ip", "tuntap", "add", "dev", name, "mode", "tap"],
        ["ip", "addr", "add", address, "dev", name],
        ["ip", "link", "set", name, "up"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
