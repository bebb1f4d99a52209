"""Real-guest vsock streams through emu, beside TCP through emu's virtio-net in the same run.

One guest per kind (UML, QEMU 7.2 microvm under TCG) gets two emu devices from one
`emu serve`: `vsock:CID=3,uds=PATH` and `net:tap:NAME` on a host TAP interface. Its
/init runs the `vsock` workload's bench passes (emu/guest/init_vsock.py) over vsock,
then the same passes over TCP on eth0 (`net` pass), so both transports are measured by
the same guest programs (busybox dd into Debian's socat, 64 KiB buffers) in one boot:

- `*_connect_ms`: the host connecting to a guest listener (the median of `--connects`):
  vsock `CONNECT P` on PATH until `OK`, TCP connect() to the guest's address;
- `*_mib_s_guest_to_host`: the guest sends `--mib` MiB of zeros; the host times from
  accepting the connection to its EOF;
- `*_mib_s_host_to_guest`: the host sends `--mib` MiB to a guest listener that discards
  them; timed from the connection's establishment to the guest closing it.

Printed as `vsock_stream_mib_s_<dir>_<kind>`, `net_tcp_mib_s_<dir>_<kind>`,
`vsock_connect_ms_<kind>`, `net_tcp_connect_ms_<kind>` and the ratios
`vsock_over_net_tcp_<dir>_<kind>` (the goal: vsock >= net). Best of `--rounds` boots (a
shared machine). Without root or /dev/net/tun there is no TAP: the net figures say
"absent" and vsock is measured alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from emu import progress
from emu.backends.tap import host_tap
from emu.guest import build_image
from emu.guest.backends import emu_backends
from emu.guest.background import BackgroundGuest
from emu.guest.vsock import connect, listen

CID = 3
HOST_IP, GUEST_IP = "10.0.7.1", "10.0.7.2"
LISTEN, TX_PORT, RX_PORT = 6000, 5002, 6200
CHUNK = 1 << 16
TIMEOUT = 600.0
KINDS = ("uml", "microvm")


def tap_absent() -> str | None:
    if os.geteuid() != 0:
        return "a TAP interface needs root"
    if not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        return "no /dev/net/tun or ip(8)"
    return None


def drain(conn: socket.socket) -> int:
    n = 0
    buf = bytearray(CHUNK * 4)
    while got := conn.recv_into(buf):
        n += got
    return n


def guest_to_host(listener: socket.socket, nbytes: int) -> float:
    """MiB/s of one guest connection: accept to EOF."""
    listener.settimeout(TIMEOUT)
    conn, _ = listener.accept()
    t0 = time.perf_counter()
    got = drain(conn)
    t1 = time.perf_counter()
    conn.close()
    if got != nbytes:
        raise RuntimeError(f"the guest sent {got} bytes, not {nbytes}")
    return nbytes / (1 << 20) / (t1 - t0)


def host_to_guest(open_conn, nbytes: int) -> float:
    """MiB/s of one host connection: established to the guest's close."""
    conn = open_conn()
    zeros = bytes(CHUNK * 4)
    t0 = time.perf_counter()
    left = nbytes
    while left:
        left -= conn.send(zeros[: min(left, len(zeros))])
    conn.shutdown(socket.SHUT_WR)
    drain(conn)
    t1 = time.perf_counter()
    conn.close()
    return nbytes / (1 << 20) / (t1 - t0)


def connect_ms(open_conn, count: int) -> float:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        conn = open_conn()
        times.append(time.perf_counter() - t0)
        conn.close()
    return statistics.median(times) * 1e3


def tcp_listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST_IP, port))
    s.listen(8)
    return s


def tcp_connect(port: int, timeout: float = 60.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((GUEST_IP, port), timeout=timeout)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def one_boot(kind: str, mib: int, connects: int, tap: str | None, tmp: Path) -> dict[str, float]:
    """Every figure of one guest boot, by name (without the kind)."""
    uds = tmp / "v.sock"
    specs = [f"vsock:CID={CID},uds={uds}"] + ([f"net:tap:{tap}"] if tap else [])
    passes = ["serve", "tx", "rx"]
    if tap:
        passes += ["net", "serve", "tx", "rx"]
    params = {"vsock.do": ",".join([*passes, "wait"]), "vsock.mib": mib}
    params |= {"vsock.listen": LISTEN, "vsock.tx_port": TX_PORT, "vsock.rx_port": RX_PORT}
    params |= {"vsock.net_ip": f"{GUEST_IP}/24", "vsock.net_peer": HOST_IP}
    nbytes = mib << 20
    out: dict[str, float] = {}
    with emu_backends(kind, specs, tmp) as devices:
        vsock_tx = listen(uds, TX_PORT)
        tcp_tx = tcp_listener(TX_PORT) if tap else None
        guest = BackgroundGuest(
            kind, devices, ["vsock"], params=params, mem_mib=512, timeout=TIMEOUT
        )
        try:
            connect(uds, LISTEN, timeout=TIMEOUT).close()  # the listener is up
            out["vsock_connect_ms"] = connect_ms(lambda: connect(uds, LISTEN), connects)
            out["vsock_stream_mib_s_guest_to_host"] = guest_to_host(vsock_tx, nbytes)
            out["vsock_stream_mib_s_host_to_guest"] = host_to_guest(
                lambda: connect(uds, RX_PORT, timeout=TIMEOUT), nbytes
            )
            if tap:
                tcp_connect(LISTEN, TIMEOUT).close()
                out["net_tcp_connect_ms"] = connect_ms(lambda: tcp_connect(LISTEN), connects)
                out["net_tcp_mib_s_guest_to_host"] = guest_to_host(tcp_tx, nbytes)
                out["net_tcp_mib_s_host_to_guest"] = host_to_guest(
                    lambda: tcp_connect(RX_PORT, TIMEOUT), nbytes
                )
                tcp_connect(LISTEN + 1).close()  # done
            else:
                connect(uds, LISTEN + 1, timeout=TIMEOUT).close()
            res = guest.result(TIMEOUT)
        finally:
            guest.stop()
            vsock_tx.close()
            if tcp_tx is not None:
                tcp_tx.close()
    if not res.ok:
        raise RuntimeError(f"{kind}: rc={res.rc}\n{res.console[-3000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mib", type=int, default=128, help="MiB per stream")
    ap.add_argument("--connects", type=int, default=50)
    ap.add_argument("--kind", choices=KINDS, action="append", help="default: both")
    ap.add_argument("--quick", action="store_true", help="16 MiB, 10 connects, one round")
    progress.add_argument(ap)
    args = ap.parse_args()
    progress.ask(args.progress)
    if args.quick:
        args.rounds, args.mib, args.connects = 1, 16, 10
    kinds = args.kind or list(KINDS)
    for kind in kinds:
        build_image(kind, socat=True)  # fetched and cached once, outside the timings
    why_no_tap = tap_absent()
    best: dict[str, dict[str, float]] = {k: {} for k in kinds}
    bar = progress.progress("guest boots", args.rounds * len(kinds))
    with tempfile.TemporaryDirectory(prefix="emu-vsockio-") as tmpdir, bar:
        for r in range(args.rounds):
            for kind in kinds:
                bar.update(0, f"{kind} round {r + 1}")
                tmp = Path(tempfile.mkdtemp(dir=tmpdir))
                if why_no_tap is None:
                    with host_tap(f"emuvs{os.getpid() % 10000}", f"{HOST_IP}/24") as tap:
                        got = one_boot(kind, args.mib, args.connects, tap, tmp)
                else:
                    got = one_boot(kind, args.mib, args.connects, None, tmp)
                for name, value in got.items():
                    low = name.endswith("_ms")
                    old = best[kind].get(name)
                    if old is None or (value < old if low else value > old):
                        best[kind][name] = value
                bar.update(1, f"{kind} round {r + 1}")
    print(
        f"vsock vs TCP over emu's virtio-net + TAP, same guest and run: {args.mib} MiB "
        f"streams, {args.connects} connects; best of {args.rounds}, shared machine"
    )
    for kind in kinds:
        row = best[kind]
        for name, value in row.items():
            unit = "ms" if name.endswith("_ms") else "MiB/s"
            print(f"{name}_{kind} {value:.2f} {unit}")
        if why_no_tap is not None:
            print(f"net_tcp_mib_s_{kind} absent ({why_no_tap})")
            continue
        for way in ("guest_to_host", "host_to_guest"):
            ratio = row[f"vsock_stream_mib_s_{way}"] / row[f"net_tcp_mib_s_{way}"]
            print(f"vsock_over_net_tcp_{way}_{kind} {ratio:.2f} ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
