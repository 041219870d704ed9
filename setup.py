"""Build hook: compiles forkguard's C core with cffi.  Metadata is in pyproject.toml.

Build switches, read by csrc/ffibuild.py: FORKGUARD_SANITIZE=1 (ASan + UBSan, see
docs/testing.md), FORKGUARD_PORTABLE=1 (the non-Linux code path, for testing).
"""

import os

from setuptools import setup

# Windows has no fork() and no pthreads: the package is pure Python there and
# registration is a no-op.
setup(cffi_modules=[] if os.name == "nt" else ["csrc/ffibuild.py:ffibuilder"])
