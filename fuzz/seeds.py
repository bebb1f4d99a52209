"""``python -m fuzz.seeds``: (re)write the committed seed corpus, fuzz/corpus/TARGET/.

Seeds are inputs a fuzzer would take long to find: whole valid states (whose checksum
the state target appends itself), register sequences that bring a device up, chains that
are valid requests. Each target's ``seeds()`` returns {name: bytes}.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fuzz import TARGETS

HERE = Path(__file__).resolve().parent


def main() -> None:
    for target in TARGETS:
        try:
            mod = importlib.import_module(f"fuzz.{target}")
        except ModuleNotFoundError:
            continue
        if not hasattr(mod, "seeds"):
            continue
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("seed-*"):
            old.unlink()
        made = mod.seeds()
        for name, data in made.items():
            (out / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(made)} seeds")


if __name__ == "__main__":
    main()
