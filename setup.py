"""Builds the native parts (ring core, blk data plane, storage engines); everything else is
in pyproject.toml.

The storage engines link Debian's liburing and libnbd: a missing header stops the build
with the package to install, rather than building an emu whose blk silently runs another
way (``./emu.sh`` installs them).
"""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

#: header -> the Debian package that ships it
NEEDS = {"liburing.h": "liburing-dev", "libnbd.h": "libnbd-dev"}


def native(name: str, libraries: tuple[str, ...] = (), headers: tuple[str, ...] = ()) -> Extension:
    for header in headers:
        roots = ("/usr/include", "/usr/local/include")
        if not any(os.path.exists(os.path.join(d, header)) for d in roots):
            sys.exit(
                f"emu: building {name} needs {header}; install it with "
                f"`apt-get install {NEEDS[header]}` (./emu.sh does this)"
            )
    return Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        include_dirs=[numpy.get_include()],
        libraries=list(libraries),
        extra_compile_args=["-O2"],
    )


setup(
    ext_modules=cythonize(
        [
            native("emu._ring"),
            native("emu.backends.engine"),
            native("emu.backends._uring", ("uring",), ("liburing.h",)),
            native("emu.backends._nbd", ("nbd",), ("libnbd.h",)),
            native("emu.devices._blkplane"),
            native("emu.devices._loop"),
            native("emu.vhost_user._notifier"),
            native("emu.vhost_user._split_inflight"),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False,
                             "wraparound": False, "cdivision": True},
    )
)
