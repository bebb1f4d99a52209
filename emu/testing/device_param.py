"""One emu device in-process, ready for I/O: what the pytest plugin's ``emu_device`` gives.

A ``DeviceParam`` names the device type, the ring format the driver negotiates and the
ring core the device's queues run on; it parses from a short string such as
``"blk-packed-python"`` (tokens in any order, each optional: a device type of the
registry, ``split``/``packed``, ``cython``/``python``; defaults rng, split, cython when
built). ``open_device`` builds the device on its own virtio-mmio transport and guest RAM,
with the reference driver and the device's driver-side helper on top, already set up
(DRIVER_OK), and closes everything when the block ends.
"""

from __future__ import annotations

import itertools
import os
import queue
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.devices import registry
from emu.devices.base import VirtioDevice
from emu.memory import GuestMemory
from emu.queue import _cring
from emu.ringdefs import F_RING_PACKED
from emu.testing.driver import VirtioMmioDriver
from emu.testing.inprocess import GUEST_RAM
from emu.transport.mmio import MmioTransport

RINGS = ("split", "packed")
CORES = ("cython", "python")
#: ring core -> the module its rings come from
CORE_MODULES = {"cython": "emu._ring", "python": "emu.pyring"}
DEFAULT_TYPE = "rng"
BLK_DISK_BYTES = 8 << 20
#: bytes a Unix socket's path may have (sun_path, less its terminating NUL)
SUN_PATH_MAX = 107


@dataclass(frozen=True)
class DeviceParam:
    """Which device ``emu_device`` builds: ``type`` (a registry name), ``ring`` (split or
    packed: what the driver negotiates), ``core`` (cython: emu._ring, python: emu.pyring)."""

    type: str = DEFAULT_TYPE
    ring: str = "split"
    core: str = "cython" if _cring is not None else "python"

    def __post_init__(self) -> None:
        names = [t.name for t in registry.types()]
        if self.type not in names:
            raise ValueError(f"device type {self.type!r} (known: {', '.join(names)})")
        if self.ring not in RINGS:
            raise ValueError(f"ring format {self.ring!r} (split or packed)")
        if self.core not in CORES:
            raise ValueError(f"ring core {self.core!r} (cython or python)")

    @classmethod
    def parse(cls, spec: str | DeviceParam | dict | None) -> DeviceParam:
        """``"blk-packed-python"``, ``"vsock/packed"``, ``"net"``, a dict of the fields, a
        DeviceParam or None (the defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, DeviceParam):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if not isinstance(spec, str):
            raise TypeError(
                f"device param {spec!r}: a string such as 'blk-packed', a dict or a DeviceParam"
            )
        fields: dict[str, str] = {}
        for token in spec.replace("/", "-").split("-"):
            field = "ring" if token in RINGS else "core" if token in CORES else "type"
            if field in fields:
                raise ValueError(f"device param {spec!r}: two {field}s ({fields[field]}, {token})")
            fields[field] = token
        return cls(**fields)

    @property
    def id(self) -> str:
        return f"{self.type}-{self.ring}-{self.core}"

    @property
    def available(self) -> str | None:
        """Why this param cannot run here (None: it can)."""
        if self.core == "cython" and _cring is None:
            return "emu._ring (the Cython ring core) is not built"
        return None


def device_params(
    types: Iterable[str] = (DEFAULT_TYPE,),
    rings: Iterable[str] = RINGS,
    cores: Iterable[str] = CORES,
) -> list[DeviceParam]:
    """Every combination, for ``@pytest.mark.parametrize("emu_device", ..., indirect=True)``."""
    return [DeviceParam(t, r, c) for t, r, c in itertools.product(types, rings, cores)]


class HostWire:
    """The host's end of a net device's cable: frames the guest sent arrive in ``frames``;
    ``send`` hands a frame to the guest's NIC."""

    def __init__(self, cable: Any) -> None:
        self.cable = cable
        self.frames: queue.Queue[bytes] = queue.Queue()
        cable.attach(self)

    def deliver(self, frame: bytes) -> None:  # what the cable calls for the guest's frames
        self.frames.put(bytes(frame))

    def send(self, frame: bytes) -> None:
        self.cable.send(frame)

    def recv(self, timeout: float = 5.0) -> bytes:
        return self.frames.get(timeout=timeout)


@dataclass
class EmuDevice:
    """A device, its transport and guest RAM, the reference driver and the device's helper.

    ``helper`` is the type's driver-side object (``RngDriver``, ``BlkDriver``,
    ``GuestConsole``, ``GuestNet``, ``FuseClient``, ``GuestVsock``, ``BalloonDriver``);
    ``host`` the host side where there is one (blk: the disk file's path, console: the
    ``BufferChar``, net: a ``HostWire``, fs: the shared directory, vsock: the hybrid vsock
    socket path); ``driver`` the ``VirtioMmioDriver``.
    """

    param: DeviceParam
    device: VirtioDevice
    transport: MmioTransport
    mem: GuestMemory
    driver: VirtioMmioDriver
    helper: Any
    host: Any = None

    @property
    def packed(self) -> bool:
        """Whether the driver and device run packed rings (what ``ring`` asked for)."""
        return bool(self.driver.features >> F_RING_PACKED & 1)

    @property
    def ring_modules(self) -> set[str]:
        """The modules the started rings come from (emu._ring or emu.pyring): the proof
        that ``core`` took effect. Empty until the device has started a ring."""
        return {type(q.ring).__module__ for q in self.device.queues if q.ring is not None}

    def __getattr__(self, name: str) -> Any:
        """The helper's methods as the fixture's own: ``emu_device.read(16)`` for rng."""
        if name.startswith("_") or name == "helper":
            raise AttributeError(name)
        return getattr(self.helper, name)


Opened = tuple[VirtioDevice, Callable[[VirtioMmioDriver, dict], Any], Any]


def _build(kind: str, param: DeviceParam, tmp: Path, undo: ExitStack) -> Opened:
    """The device of ``kind``, a function that opens its helper on a driver, its host side
    (anything it needs removed at the end goes on ``undo``)."""
    if kind == "rng":
        from emu.devices.rng import RngDevice
        from emu.testing.rng import RngDriver

        return RngDevice(), lambda d, o: RngDriver.open(d, **o), None
    if kind == "blk":
        from emu.devices.blk import BlkDevice
        from emu.testing.blk import BlkDriver

        disk = tmp / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(BLK_DISK_BYTES)
        plane = "python" if param.core == "python" else None  # the native plane is Cython
        dev = BlkDevice(disk, serial="emu-pytest", plane=plane)
        return dev, lambda d, o: BlkDriver.open(d, **o), disk
    if kind == "console":
        from emu.backends.chardev import BufferChar
        from emu.devices.console import ConsoleDevice
        from emu.testing.console import GuestConsole

        chardev = BufferChar()
        return ConsoleDevice(chardev), lambda d, o: GuestConsole(d, **o), chardev
    if kind == "net":
        from emu.backends.cable import Cable
        from emu.devices.net import NetDevice
        from emu.testing.net import GuestNet

        guest_end, host_end = Cable.pair()
        wire = HostWire(host_end)
        return NetDevice(guest_end), lambda d, o: GuestNet(d, **o), wire
    if kind == "fs":
        from emu.devices.fs import FsDevice
        from emu.testing.fs import FuseClient

        share = tmp / "share"
        share.mkdir()
        return FsDevice(share, tag="emu"), lambda d, o: FuseClient.connect(d, **o), share
    if kind == "vsock":
        from emu.backends.hybrid_vsock import HybridVsock
        from emu.devices.vsock import VsockDevice
        from emu.testing.vsock import GuestVsock

        path = tmp / "v.sock"
        if len(os.fsencode(path)) > SUN_PATH_MAX:  # pytest's tmp_path under a long basetemp
            path = Path(undo.enter_context(_tempdir())) / "v.sock"
        return VsockDevice(3, HybridVsock(path)), lambda d, o: GuestVsock(d, **o), path
    if kind == "balloon":
        from emu.devices.balloon import BalloonDevice
        from emu.testing.balloon import BalloonDriver

        return BalloonDevice(), lambda d, o: BalloonDriver.open(d, **o), None
    raise ValueError(f"emu_device cannot build a {kind!r} device (no driver helper here)")


@contextmanager
def open_device(
    spec: str | DeviceParam | dict | None = None, workdir: str | os.PathLike | None = None
) -> Iterator[EmuDevice]:
    """The device ``spec`` names, set up and DRIVER_OK; files it needs go to ``workdir``
    (a temporary directory if None). Everything is closed when the block ends."""
    param = DeviceParam.parse(spec)
    if (why := param.available) is not None:
        raise RuntimeError(f"{param.id}: {why}")
    with ExitStack() as undo:
        tmp = Path(workdir) if workdir is not None else Path(undo.enter_context(_tempdir()))
        mem = GuestMemory.create(GUEST_RAM)
        undo.callback(mem.close)
        device, open_helper, host = _build(param.type, param, tmp, undo)
        undo.callback(device.close)
        for q in device.queues:
            q.impl = param.core
        transport = MmioTransport(device, mem)
        driver = VirtioMmioDriver(transport, mem)
        helper = open_helper(driver, {"packed": param.ring == "packed"})
        undo.callback(_quiet_reset, driver)
        yield EmuDevice(param, device, transport, mem, driver, helper, host)


def _quiet_reset(driver: VirtioMmioDriver) -> None:
    """Reset before close, as a driver does at unbind; a device the test broke may refuse."""
    try:
        driver.reset()
    except Exception:  # the test's outcome matters, not a failing reset at teardown
        pass


@contextmanager
def _tempdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="emu-device-") as tmp:
        yield tmp
