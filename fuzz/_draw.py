"""Reading fuzz input as a sequence of choices.

Past the end of the input every draw returns zeros, so any byte string is a complete
program and a shorter one is a prefix of a longer one (what a mutating fuzzer likes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Draw:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out + bytes(n - len(out))

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.bytes(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """0 <= value < n (n <= 2**32)."""
        return (self.u8() if n <= 256 else self.u32()) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def blob(self, limit: int) -> bytes:
        """A length-prefixed byte string of at most ``limit`` bytes."""
        return self.bytes(self.below(limit + 1) if limit < 256 else self.u16() % (limit + 1))
