"""Builds the native ring core; everything else is in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("emu._ring", ["emu/_ring.pyx"], include_dirs=[numpy.get_include()],
                   extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "boundscheck": False,
                             "wraparound": False, "cdivision": True},
    )
)
