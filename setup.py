"""Build hook: compiles forkguard's C core with cffi.  Metadata is in pyproject.toml."""

import os

from setuptools import setup

# Windows has no fork() and no pthreads: the package is pure Python there and
# registration is a no-op.
setup(cffi_modules=[] if os.name == "nt" else ["csrc/ffibuild.py:ffibuilder"])
