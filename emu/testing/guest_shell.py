"""Shell commands in a booted guest, over its console: the ``run`` of ``emu_guest``.

The guest's /init runs ``SHELL`` (the ``script`` workload of init_script.py): it turns the
console's echo and kernel messages off, prints ``EMU-SHELL-READY`` and reads commands from
the console. The host sends one command as

    EMU-CMD <id>
    <the command, base64, 76 characters a line>
    EMU-GO

and the guest runs it with ``sh`` (stdin /dev/null, stderr merged into stdout), then
prints the output base64-encoded, each line as ``EMU-OUT <id> <base64>``, and
``EMU-RC <id> <rc> <bytes>``. Base64 and ids keep the answer intact and unambiguous on a
console that may carry other text (kernel messages, a late line of an earlier command);
the byte count catches a line lost or garbled on the way. ``EMU-EXIT`` ends the loop, and
/init then powers the guest off.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
import re
import threading
import time
from typing import IO

SHELL = r"""
stty -echo 2>/dev/null
dmesg -n 1 2>/dev/null
echo EMU-SHELL-READY
id=0
while read -r line; do
  case "$line" in
    "EMU-CMD "*) id=${line#EMU-CMD }; : > /tmp/cmd.b64 ;;
    EMU-GO)
      base64 -d /tmp/cmd.b64 > /tmp/cmd.sh
      (cd /root && sh /tmp/cmd.sh) < /dev/null > /tmp/out 2>&1; rc=$?
      base64 /tmp/out | sed "s/^/EMU-OUT $id /"
      echo "EMU-RC $id $rc $(wc -c < /tmp/out)" ;;
    EMU-EXIT) break ;;
    *) echo "$line" >> /tmp/cmd.b64 ;;
  esac
done
"""

_OUT = re.compile(r"EMU-OUT (\d+) ([A-Za-z0-9+/=]*)$")
_RC = re.compile(r"EMU-RC (\d+) ")


class GuestError(RuntimeError):
    """The guest is not running, did not answer in time, or its answer came garbled."""


class Console:
    """A guest process's console (its stdin and stdout): every line it printed is kept
    (``lines``), and ``run`` speaks the protocol above."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.stdin = stdin
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._ids = 0
        self._late: set[int] = set()  # commands that timed out, maybe still running
        self._reader = threading.Thread(target=self._read, args=(stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[bytes]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        try:
            while chunk := os.read(stdout.fileno(), 65536):
                *complete, partial = (partial + decoder.decode(chunk).replace("\r", "")).split("\n")
                with self._changed:
                    self.lines += complete
                    self._changed.notify_all()
        except OSError:
            pass
        with self._changed:
            if partial:
                self.lines.append(partial)
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], start: int, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in lines from index ``start`` on."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if m := pattern.search(line):
                        return m
                start = len(self.lines)
                if self._eof:
                    raise GuestError(f"the guest's console closed:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"no {pattern.pattern!r} after {timeout:g} s:\n{self.tail()}")
                self._changed.wait(min(left, 0.5))

    def send(self, text: str) -> None:
        try:
            self.stdin.write(text.encode())
            self.stdin.flush()
        except (BrokenPipeError, ValueError) as e:  # ValueError: stdin already closed
            raise GuestError(f"the guest's console does not take input: {e}") from None

    def run(self, cmd: str, timeout: float) -> tuple[int, str]:
        """(rc, stdout and stderr) of ``cmd`` run by ``sh`` in the guest."""
        with self._changed:
            self._ids += 1
            ident = self._ids
            start = len(self.lines)
        b64 = base64.encodebytes(cmd.encode()).decode()  # lines of 76 characters
        self.send(f"EMU-CMD {ident}\n{b64}EMU-GO\n")
        try:
            m = self.wait_for(re.compile(rf"EMU-RC {ident} (-?\d+) (\d+)"), start, timeout)
        except GuestError as e:
            busy = self._still_running()
            self._late.add(ident)
            if busy:
                raise GuestError(
                    f"{e}\n(command {busy[0]}, which timed out before, may still be running:"
                    " the guest's shell runs one command at a time)"
                ) from None
            raise
        rc, size = int(m.group(1)), int(m.group(2))
        with self._changed:
            taken = [
                (i, o.group(2))
                for i in range(start, len(self.lines))
                if (o := _OUT.search(self.lines[i])) and int(o.group(1)) == ident
            ]
            # the output is the caller's now: keep a line saying so, not a second copy
            for n, (i, _) in enumerate(taken):
                self.lines[i] = f"EMU-OUT {ident} ({size} bytes, taken by run)" if n == 0 else ""
        chunks = [chunk for _, chunk in taken]
        try:
            out = base64.b64decode("".join(chunks), validate=True)
        except binascii.Error as e:
            raise GuestError(f"command {ident}: garbled output ({e}):\n{self.tail()}") from None
        if len(out) != size:
            raise GuestError(
                f"command {ident}: {len(out)} output bytes arrived of {size}:\n{self.tail()}"
            )
        return rc, out.decode(errors="replace")

    def _still_running(self) -> list[int]:
        """Commands that timed out and have not answered since, oldest first."""
        with self._changed:
            done = {int(m.group(1)) for line in self.lines if (m := _RC.search(line)) is not None}
        self._late -= done
        return sorted(self._late)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def close(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        self._reader.join(10)
