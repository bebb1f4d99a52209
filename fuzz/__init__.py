"""Coverage-guided fuzz targets for emu (atheris), and their runner: ``python -m fuzz``.

Each target module has ``one_input(data: bytes)``: it turns the bytes into guest or
frontend behaviour, runs emu on it and raises (``Finding`` or anything unexpected) when
a property emu promises does not hold. The runner hands it to libFuzzer; the tests replay
the committed corpus and regressions through the same function, without atheris.
"""

from __future__ import annotations

TARGETS = ("ring", "mmio", "devices", "vhost_user", "state")
