"""forkguard's C API, exercised by the four consumer extensions of docs/c-api.md.

The consumers are extracted from the documentation itself and built here against the
installed forkguard (gcc/g++, pybind11, Cython, cffi), so the docs cannot drift from
what is tested.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cffi import FFI

import forkguard
from forkguard import _REGISTRY

from conftest import LINUX

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "c-api.md"

pytestmark = pytest.mark.skipif(not DOCS.exists(), reason="needs docs/c-api.md")


def doc_files() -> dict[str, str]:
    """Every code block of docs/c-api.md that follows a ``<!-- file: NAME -->`` marker."""
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```[\w+]*\n(.*?)\n```", text, re.S)
    return {name: body + "\n" for name, body in blocks}


def build(directory: Path, files: dict[str, str]) -> None:
    for name, body in files.items():
        (directory / name).write_text(body)
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="session")
def consumers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("consumers")
    build(directory, doc_files())
    return directory


def run_scenario(consumers: Path, scenario: str, consumer: str = "c") -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(consumers)]))
    done = subprocess.run(
        [sys.executable, str(TESTS / "capi_scenarios.py"), str(consumers), scenario, consumer],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_docs_hold_the_four_consumers_and_their_build() -> None:
    assert set(doc_files()) == {
        "fgdemo_c.c",
        "fgdemo_pybind.cpp",
        "fgdemo_cython.pyx",
        "fgdemo_cffi_build.py",
        "fgdemo_cffi_use.py",
        "setup.py",
    }


@pytest.mark.parametrize("consumer", ["c", "pybind11", "cython", "cffi"])
def test_consumer_lock_held_by_its_native_thread_at_fork(consumers: Path, consumer: str) -> None:
    assert "lock ok" in run_scenario(consumers, "lock", consumer)


def test_consumer_hooks_run_once_per_fork_on_their_side(consumers: Path) -> None:
    assert "hooks ok" in run_scenario(consumers, "hooks")


def test_consumer_built_against_a_newer_abi_fails_to_import(tmp_path: Path) -> None:
    """A header from a future forkguard (one more table entry) against this forkguard."""
    header = (Path(forkguard.get_include()) / "forkguard.h").read_text()
    newer = header.replace("#define FORKGUARD_ABI_VERSION 1", "#define FORKGUARD_ABI_VERSION 2")
    newer = newer.replace(
        "    /* New entries go here",
        "    int (*from_the_future)(void);\n    /* New entries go here",
    )
    assert newer.count("from_the_future") == 1 and "FORKGUARD_ABI_VERSION 2" in newer
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "forkguard.h").write_text(newer)
    setup = (
        "from setuptools import Extension, setup\n"
        "setup(name='fgdemo', ext_modules=[Extension('fgdemo_c', ['fgdemo_c.c'], "
        "include_dirs=['include'], py_limited_api=True)])\n"
    )
    build(tmp_path, {"fgdemo_c.c": doc_files()["fgdemo_c.c"], "setup.py": setup})
    done = subprocess.run(
        [sys.executable, "-c", "import fgdemo_c"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # an exception, not a crash
    assert (
        "ImportError: this extension was built against forkguard C API version 2, but the "
        "installed forkguard provides version 1; upgrade forkguard"
    ) in done.stderr


# ------------------------------------------------------------------ the table itself

TABLE_CDEF = """
typedef struct { char opaque[64]; } pthread_mutex_t;
typedef struct { char opaque[64]; } pthread_rwlock_t;
typedef struct { char opaque[32]; } sem_t;
typedef uint64_t forkguard_handle;
typedef void (*forkguard_hook)(void *arg);
typedef struct {
    uint32_t abi_version;
    uint32_t size;
    int (*register_mutex)(pthread_mutex_t *, int, int, double, const char *, forkguard_handle *);
    int (*register_rwlock)(pthread_rwlock_t *, int, double, const char *, forkguard_handle *);
    int (*register_sem)(sem_t *, unsigned int, int, double, const char *, forkguard_handle *);
    int (*register_hooks)(forkguard_hook, forkguard_hook, forkguard_hook, void *, const char *,
                          forkguard_handle *);
    int (*unregister)(forkguard_handle);
    int (*is_active)(forkguard_handle);
    const char *(*strerror)(int);
} forkguard_api;
"""


@pytest.fixture(scope="module")
def table() -> tuple[FFI, Any]:
    ffi = FFI()
    ffi.cdef(TABLE_CDEF)
    return ffi, ffi.cast("forkguard_api *", forkguard._C_API_ADDRESS)


def test_table_header(table: tuple[FFI, Any]) -> None:
    ffi, api = table
    assert api.abi_version == 1
    assert api.size == ffi.sizeof("forkguard_api")


ENULL, EINVAL, EALIGN, EEXIST, ESTALE, ETYPE = -2, -1, -3, -5, -6, -9


def test_bad_input_from_c_gets_documented_codes_and_changes_nothing(
    table: tuple[FFI, Any], ext: Any
) -> None:
    ffi, api = table
    lib = ext.lib

    def cast(ctype: str, ptr: Any, offset: int = 0) -> Any:
        return ffi.cast(ctype, int(ext.ffi.cast("uintptr_t", ptr)) + offset)

    real = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    mutex = cast("pthread_mutex_t *", real)
    misaligned = cast("pthread_mutex_t *", real, 1)
    rw = cast("pthread_rwlock_t *", lib.rwlock_new(0))
    out = ffi.new("forkguard_handle *")
    reg_mutex, reg_rwlock = api.register_mutex, api.register_rwlock
    reg_sem, reg_hooks = api.register_sem, api.register_hooks
    before = _REGISTRY.backend.count()
    cases = {
        "NULL mutex": (reg_mutex(ffi.NULL, 0, 0, 1.0, b"x", out), ENULL),
        "NULL handle pointer": (reg_mutex(mutex, 0, 0, 1.0, b"x", ffi.NULL), ENULL),
        "unknown mutex type": (reg_mutex(mutex, 7, 0, 1.0, b"x", out), EINVAL),
        "unknown policy": (reg_mutex(mutex, 0, 5, 1.0, b"x", out), EINVAL),
        "negative timeout": (reg_mutex(mutex, 0, 1, -1.0, b"x", out), EINVAL),
        "NaN timeout": (reg_mutex(mutex, 0, 1, math.nan, b"x", out), EINVAL),
        "infinite timeout": (reg_mutex(mutex, 0, 1, math.inf, b"x", out), EINVAL),
        "misaligned mutex": (reg_mutex(misaligned, 0, 0, 1.0, b"x", out), EALIGN),
        "NULL rwlock": (reg_rwlock(ffi.NULL, 0, 1.0, b"x", out), ENULL),
        "rwlock policy": (reg_rwlock(rw, 9, 1.0, b"x", out), EINVAL),
        "NULL sem": (reg_sem(ffi.NULL, 1, 0, 1.0, b"x", out), ENULL),
        "no hooks": (reg_hooks(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, b"x", out), ENULL),
        "unregister 0": (api.unregister(0), ESTALE),
        "unregister garbage": (api.unregister(0xDEAD_BEEF_0000_0007), ESTALE),
    }
    if LINUX:
        sem = cast("sem_t *", lib.sem_new(0))
        cases["sem count over SEM_VALUE_MAX"] = (reg_sem(sem, 2**32 - 1, 0, 1.0, b"x", out), EINVAL)
        cases["mutex type mismatch"] = (reg_mutex(mutex, 1, 0, 1.0, b"x", out), ETYPE)
    wrong = {case: got for case, (got, want) in cases.items() if got != want}
    assert not wrong, wrong
    assert _REGISTRY.backend.count() == before

    # Doubled and stale handles.
    assert reg_mutex(mutex, 0, 0, 1.0, b"first", out) == 0
    handle = out[0]
    assert reg_mutex(mutex, 0, 0, 1.0, b"again", out) == EEXIST
    assert api.is_active(handle) == 1
    assert api.unregister(handle) == 0
    assert api.unregister(handle) == ESTALE
    assert api.is_active(handle) == 0
    assert reg_mutex(mutex, 0, 0, 1.0, b"reused", out) == 0
    assert out[0] != handle
    assert api.unregister(handle) == ESTALE
    assert api.unregister(out[0]) == 0
    assert _REGISTRY.backend.count() == before
    for code in range(-13, 1):
        assert ffi.string(api.strerror(code))


def test_c_api_registrations_are_listed_and_can_be_ended(table: tuple[FFI, Any], ext: Any) -> None:
    """One registry: what C code registers shows in forkguard.registrations()."""
    ffi, api = table
    real = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    mutex = ffi.cast("pthread_mutex_t *", int(ext.ffi.cast("uintptr_t", real)))
    out = ffi.new("forkguard_handle *")
    assert api.register_mutex(mutex, 1, 1, 0.25, b"ext.lock", out) == 0
    (reg,) = [r for r in forkguard.registrations() if r.name == "ext.lock"]
    assert (reg.kind, reg.policy, reg.timeout) == ("pthread_mutex_t (recursive)", "hold", 0.25)
    assert reg.target == int(ffi.cast("uintptr_t", mutex))
    assert reg.active
    assert api.unregister(out[0]) == 0
    assert not reg.active  # its owner ended it
    assert reg.unregister() is False


def test_c_core_keeps_each_registrations_own_name(table: tuple[FFI, Any], ext: Any) -> None:
    """The C core copies a name apart from its entry (most registrations have none):
    a long one is cut to 63 bytes, an unnamed registration gets the default name, and a
    slot used again never shows an earlier registration's name."""
    ffi, api = table
    mutexes = [ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0) for _ in range(2)]
    first, second = (
        ffi.cast("pthread_mutex_t *", int(ext.ffi.cast("uintptr_t", m))) for m in mutexes
    )
    out = ffi.new("forkguard_handle *")

    def named(handle: int) -> str:
        (reg,) = [r for r in forkguard.registrations() if r._handle == handle]
        return reg.name

    assert api.register_mutex(first, 0, 0, 1.0, b"n" * 200, out) == 0
    long_name = out[0]
    assert named(long_name) == "n" * 63
    assert api.unregister(long_name) == 0
    assert api.register_mutex(second, 0, 0, 1.0, ffi.NULL, out) == 0  # in the freed slot
    assert named(out[0]) == f"pthread_mutex_t (normal) at {int(ffi.cast('uintptr_t', second)):#x}"
    assert api.unregister(out[0]) == 0
    assert api.register_mutex(first, 0, 0, 1.0, b"", out) == 0  # empty: none
    assert named(out[0]) == f"pthread_mutex_t (normal) at {int(ffi.cast('uintptr_t', first)):#x}"
    assert api.unregister(out[0]) == 0


def test_capsule_and_address_are_the_same_table() -> None:
    import ctypes

    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    assert get(forkguard._C_API, b"forkguard._C_API") == forkguard._C_API_ADDRESS
    assert Path(forkguard.get_include(), "forkguard.h").is_file()
    assert Path(forkguard.__file__).with_name("forkguard.pxd").is_file()


def test_registering_what_c_code_registered_names_the_c_api(
    table: tuple[FFI, Any], ext: Any
) -> None:
    """forkguard.register() of an object C code registered through the C API is refused
    (that registration is its owner's to end), and changes nothing."""
    ffi, api = table
    real = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    mutex = ffi.cast("pthread_mutex_t *", int(ext.ffi.cast("uintptr_t", real)))
    out = ffi.new("forkguard_handle *")
    assert api.register_mutex(mutex, 0, 0, 1.0, b"ext.owned", out) == 0

    def state() -> tuple[list[str], int]:
        return [r.name for r in forkguard.registrations()], _REGISTRY.backend.count()

    before = state()
    try:
        with pytest.raises(ValueError, match="registered by C code through forkguard's C API"):
            forkguard.register(real)
        assert state() == before
    finally:
        assert api.unregister(out[0]) == 0
    with forkguard.register(real) as reg:  # its owner ended it: Python may register it now
        assert reg.active
