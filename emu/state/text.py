"""Text from a snapshot, made safe to print on a terminal.

A state file is data from whoever wrote it: a hostile or corrupt one can carry escape
sequences in any string it holds (a TRANSPORT part's values, a device part's map keys, a
port name, a socket path). Printed raw, they would retitle the window, clear the screen
or hide lines of ``emu state show``'s own output. ``printable`` writes every character a
terminal would act on as Python writes it in a string literal, so the reader sees it.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character but newline escaped (``\\x1b``,
    ``\\x9b``, ``\\u202e``): C0 and C1 controls, DEL, bidi and other format characters."""
    if text.isprintable():
        return text
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


def cut(text: str, most: int) -> str:
    """``text`` shortened to ``most`` characters, saying how long it was."""
    if len(text) <= most:
        return text
    return f"{text[: most - 3]}...({len(text)} characters)"
