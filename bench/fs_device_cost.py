"""Instructions per FUSE request in emu's fs device loop, beside the same loop serving nothing.

A figure that does not move with the load of a shared machine: the real device thread loop
(VirtioDevice._run -> FsDevice.handle_queue -> the ring core -> HostDir) serves N copies of
one request, single-threaded, under valgrind (cachegrind counting instructions); the count
of a run serving none is subtracted. Before each wait of the loop the harness makes the
next chain available on a split ring (event idx) and kicks, as a guest would; the device's
interrupt goes to an eventfd. Requests: LOOKUP of an existing name, GETATTR, FLUSH, a 4 KiB
READ, and a LOOKUP of a missing name (the error path).

The baseline beside them, `null`, is the same loop with a device that only pops and pushes
(no FUSE): what the device thread and the queue cost per request, whatever the device. The
harness's own work (writing the avail ring, the kick) is in every figure, the baseline too.
The loop is the Python one, whose wait is where the harness offers the next request; a
running device waits in C (emu.devices._loop), which saves part of ``null``.

    PYTHONPATH=$PWD python bench/fs_device_cost.py [-n 3000]

Without valgrind it prints nothing but the reason. (`--one KIND N` is the run valgrind
measures.)
"""

from __future__ import annotations

import argparse
import os
import select as _select
import shutil
import struct
import subprocess
import sys
import tempfile

KINDS = ["lookup", "getattr", "flush", "read", "lookup_enoent", "null"]


def one(kind: str, n: int) -> None:
    """Serve ``n`` requests of ``kind`` through the real device loop, then return."""
    from emu.devices import base
    from emu.devices import fuse as f
    from emu.devices.fs import FsDevice, Session
    from emu.memory import GuestMemory
    from emu.ringdefs import F_EVENT_IDX, F_VERSION_1
    from emu.testing.fs import in_header, name
    from emu.vhost_user.vring import Notifier

    class NullFs(FsDevice):
        def handle_queue(self, q):  # the device thread and queue alone: pop, push
            while True:
                q.set_kicks(False)
                heads = q.pop(64).heads.tolist()
                if heads:
                    q.push(heads, [16] * len(heads))
                if not q.set_kicks(True):
                    return

    share = tempfile.mkdtemp(prefix="emu-fscost-")
    os.mkdir(f"{share}/d")
    with open(f"{share}/d/x", "wb") as fp:
        fp.write(os.urandom(65536))
    mem = GuestMemory.create(1 << 20)
    dev = (NullFs if kind == "null" else FsDevice)(share)
    size, desc, avail, used = 256, 0x1000, 0x3000, 0x4000
    q = dev.queues[1]
    q.size, q.desc, q.driver, q.device, q.ready = size, desc, avail, used, True
    dev._activate(mem, 1 << F_VERSION_1 | 1 << F_EVENT_IDX, False)
    dev.session = Session(f.KERNEL_MINOR, 0, 1 << 20, 256, 0)  # as after INIT
    call = os.eventfd(0, os.EFD_NONBLOCK)
    notifier = Notifier("call")
    notifier.set(call)
    q.notify = notifier.signal
    node_d, _ = dev.dir.lookup(1, b"d")
    node_x, _ = dev.dir.lookup(node_d, b"x")
    fh = dev.dir.open(node_x, os.O_RDONLY)
    op, node, args, reply = {
        "lookup": (f.Op.LOOKUP, node_d, [name("x")], f.ENTRY_OUT.size),
        "lookup_enoent": (f.Op.LOOKUP, node_d, [name("nope")], f.ENTRY_OUT.size),
        "getattr": (f.Op.GETATTR, node_x, [f.GETATTR_IN.pack(0, 0, 0)], f.ATTR_OUT.size),
        "flush": (f.Op.FLUSH, node_x, [f.FLUSH_IN.pack(fh, 0, 0, 0)], 0),
        "read": (f.Op.READ, node_x, [f.READ_IN.pack(fh, 8192, 4096, 0, 0, 0, 0)], 4096),
        "null": (f.Op.FLUSH, node_x, [f.FLUSH_IN.pack(fh, 0, 0, 0)], 0),
    }[kind]
    # one chain at head 0, as Linux lays a request out: in header and each argument in a
    # buffer of its own, then the out header and the reply
    parts = [(in_header(op, node, 2, sum(map(len, args))), 0), *((a, 0) for a in args)]
    parts += [(bytes(16), 2)] + ([(bytes(reply), 2)] if reply else [])
    gpa = 0x10000
    for i, (data, flags) in enumerate(parts):
        mem.write(gpa, data)
        more = 1 if i < len(parts) - 1 else 0
        mem.write(desc + 16 * i, struct.pack("<QIHH", gpa, len(data), flags | more, i + 1))
        gpa += 0x200
    served = [0]

    def offer() -> bool:
        """Make the next request available and kick; False once ``n`` were."""
        if dev.dir._nodes[node_x].nlookup > 1000:  # as the guest's FORGETs would
            dev.dir._nodes[node_x].nlookup = 1
        if served[0] == n:
            dev._closed = True
            return False
        served[0] += 1
        mem.write(avail + 4 + 2 * ((served[0] - 1) % size), b"\0\0")
        # used_event: the driver wants an interrupt for this request (as a guest waiting
        # for it does), then the avail index that offers it
        mem.write(avail + 4 + 2 * size, struct.pack("<H", (served[0] - 1) & 0xFFFF))
        mem.write(avail + 2, struct.pack("<H", served[0] & 0xFFFF))
        os.eventfd_write(q.kick_fd, 1)
        if served[0] % 1000 == 0:
            os.eventfd_read(call)
        return True

    class Epoll:
        """The loop's epoll, making the next request available before each wait."""

        def __init__(self) -> None:
            self.ep = _select.epoll()
            self.register, self.unregister, self.close = (
                self.ep.register,
                self.ep.unregister,
                self.ep.close,
            )

        def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
            return self.ep.poll(0) if offer() else []

    if hasattr(base, "selectors"):  # an emu whose loop waited through selectors
        import selectors

        class Selector(selectors.DefaultSelector):  # type: ignore[valid-type,misc]
            def select(self, timeout=None):  # type: ignore[no-untyped-def]
                return super().select(0) if offer() else []

        base.selectors = type("selectors", (), {**vars(selectors), "DefaultSelector": Selector})
    else:
        base.select = type("select", (), {"epoll": Epoll, "EPOLLIN": _select.EPOLLIN})
    # the Python loop's wait, where the harness offers the next request: a running device
    # waits in C (emu.devices._loop) instead, which saves the loop's share of ``null``
    dev.serve_parked = lambda ep: False
    dev._run()
    assert mem.read_int(used + 2, 2) == n & 0xFFFF, "not every request was answered"
    shutil.rmtree(share, ignore_errors=True)


def instructions(kind: str, n: int) -> int:
    """Instructions of a run serving ``n`` requests (valgrind --tool=cachegrind)."""
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    cmd += [sys.executable, __file__, "--one", kind, str(n)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    line = next(x for x in out.splitlines() if "I   refs:" in x)
    return int(line.split(":")[1].replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="requests per measured run")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]))
        return
    if shutil.which("valgrind") is None:
        print("valgrind missing: these figures are instruction counts (apt-get install valgrind)")
        return
    for kind in KINDS:
        per = (instructions(kind, args.n) - instructions(kind, 0)) / args.n
        print(f"fs_device_{kind}_instructions {per:.0f} instructions/request")


if __name__ == "__main__":
    main()
