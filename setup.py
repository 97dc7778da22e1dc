"""Only the optional compiled part of vetd; everything else is in pyproject.toml.

vetd._hotpath answers warm events from a table Python fills (see its source). It is optional:
without a C compiler and Python's headers the build goes on without it, and vetd runs its
pure-Python read loop, which gives the same answers more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vetd._hotpath", ["vetd/_hotpath.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
