"""Build hook: compiles forkguard's C core with cffi.  Metadata is in pyproject.toml.

Build switches, read by csrc/ffibuild.py: FORKGUARD_SANITIZE=1 (ASan + UBSan, see
docs/testing.md), FORKGUARD_PORTABLE=1 (the non-Linux code path, for testing).

The core is compiled for CPython's limited API (cffi's default), so one wheel,
tagged cp310-abi3, serves every CPython from 3.10 on.  Free-threaded and debug
interpreters have no limited API: their wheels are tagged for their own version.
"""

import os
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_COMPILER = """\
forkguard could not compile its C core ({error}): {missing}.

It needs a C compiler and the Python headers:
  Debian, Ubuntu:   apt install gcc python3-dev
  Fedora, RHEL:     dnf install gcc python3-devel
  Alpine:           apk add gcc musl-dev python3-dev
  macOS:            xcode-select --install
Or, once a forkguard release on PyPI has a wheel for this platform and Python,
install that instead:
  pip install --only-binary forkguard forkguard
"""


class BuildExt(build_ext):
    """build_ext whose compile failure says what to install when the compiler or the
    Python headers are missing (setuptools' own message names only the command that
    failed).  Any other failure is left as it is."""

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError

        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, LinkError) as exc:
            missing = self._missing(str(exc))
            if missing:
                sys.stderr.write(NO_COMPILER.format(error=exc, missing=missing))
            raise

    def _missing(self, error: str) -> str | None:
        command = getattr(self.compiler, "compiler", None) or []
        if command and shutil.which(command[0]) is None:
            return f"no C compiler: {command[0]!r} was not found"
        if "Python.h" in error:
            return "no Python headers: Python.h was not found"
        return None


def limited_api() -> bool:
    """cffi builds for the limited API unless the interpreter has none."""
    return not sysconfig.get_config_var("Py_GIL_DISABLED") and not hasattr(sys, "gettotalrefcount")


# Windows has no fork() and no pthreads: the package is pure Python there and
# registration is a no-op.
native = os.name != "nt"
setup(
    cffi_modules=["csrc/ffibuild.py:ffibuilder"] if native else [],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if native and limited_api() else {},
)
