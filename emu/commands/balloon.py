"""``emu balloon``: the host's side of a served balloon, through its control socket.

    emu serve --socket /tmp/b.sock balloon,control=/tmp/b.ctl &
    emu balloon --control /tmp/b.ctl target 64     # ask the guest for 64 MiB
    emu balloon --control /tmp/b.ctl stats         # fresh memory statistics
    emu balloon --control /tmp/b.ctl info          # target, actual, counters

The answer (one line of JSON, emu.backends.balloon_control) is printed as it came; the
exit status is 1 when the device refused the command.
"""

from __future__ import annotations

import json
import socket
import time

import click

#: seconds to wait for an answer (``stats`` waits up to a second for the guest)
TIMEOUT = 10.0
#: seconds between connects while the server's backlog is full (a timeout makes a Unix
#: socket's connect fail at once then, rather than wait)
CONNECT_RETRY = 0.01


def ask(path: str, line: str, timeout: float = TIMEOUT) -> dict:
    """Send one command line to the control socket at ``path``; its JSON answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # the server's backlog is full: it is busy accepting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: not accepted in {timeout} s") from None
                time.sleep(CONNECT_RETRY)
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


@click.command("balloon")
@click.option(
    "--control",
    required=True,
    metavar="PATH",
    help="The balloon's control socket (emu serve ... balloon,control=PATH).",
)
@click.argument("what", type=click.Choice(["target", "stats", "info"]))
@click.argument("mib", required=False, type=click.IntRange(0))
def command(control: str, what: str, mib: int | None) -> None:
    """Set the balloon's target (MIB, what the guest gives back), read the guest's
    memory statistics, or the device's state: target [MIB] | stats | info."""
    if mib is not None and what != "target":
        raise click.UsageError(f"{what} takes no argument")
    line = what if mib is None else f"{what} {mib}"
    try:
        reply = ask(control, line)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{control}: {e}") from e
    click.echo(json.dumps(reply))
    if not reply.get("ok"):
        raise SystemExit(1)
