"""The C core's non-Linux path (macOS: restore by re-initialising in place, holds by
polling, mutex types given by the caller), compiled with FG_PORTABLE and run here.

It is a second copy of the core, so it runs in a subprocess of its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import LINUX

CSRC = Path(__file__).resolve().parents[1] / "csrc"

pytestmark = [
    pytest.mark.skipif(not LINUX, reason="the portable path is native elsewhere"),
    pytest.mark.skipif(not (CSRC / "forkguard_core.c").exists(), reason="needs the source tree"),
]

SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import native
from cffi import FFI
from pathlib import Path

work = Path(sys.argv[2])
ext = native.build(work / "ext")
ffi = FFI()
ffi.cdef('''
typedef ... pthread_mutex_t; typedef ... pthread_rwlock_t; typedef ... sem_t;
int fg_register_mutex(pthread_mutex_t *, int, int, double, const char *, uint64_t *);
int fg_register_rwlock(pthread_rwlock_t *, int, double, const char *, uint64_t *);
int fg_register_sem(sem_t *, unsigned int, int, double, const char *, uint64_t *);
int fg_unregister(uint64_t);
int fg_features(void);
''')
ffi.set_source(
    "_fg_portable",
    '#include "forkguard_core.h"',
    sources=[sys.argv[3] + "/forkguard_core.c"],
    include_dirs=[sys.argv[3], sys.argv[3] + "/../src/forkguard/include"],
    define_macros=[("FG_PORTABLE", "1")],
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Werror"],
)
import importlib.util
path = ffi.compile(tmpdir=str(work / "core"))
spec = importlib.util.spec_from_file_location("_fg_portable", path)
core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)
lib, L, ffi = core.lib, ext.lib, core.ffi

def address(p):
    return int(ext.ffi.cast("uintptr_t", p))

def reg_mutex(m, mtype, policy=0, timeout=1.0):
    out = ffi.new("uint64_t *")
    ptr = ffi.cast("pthread_mutex_t *", address(m))
    return lib.fg_register_mutex(ptr, mtype, policy, timeout, b"m", out), out[0]

def status(st):
    if os.WIFEXITED(st):
        return "ok" if os.WEXITSTATUS(st) == 0 else "failed"
    return "hung" if os.WIFSIGNALED(st) else "?"

assert lib.fg_features() == 0, lib.fg_features()  # no type reading, no sems, polling holds
m = L.mutex_new(L.PTHREAD_MUTEX_RECURSIVE, 0, 0)
assert reg_mutex(m, -1)[0] == -7  # FORKGUARD_ENOTSUP: the type must be given here
rc, handle = reg_mutex(m, 1)
assert rc == 0
kinds = ext.ffi.new("int[]", [L.K_MUTEX]); objs = ext.ffi.new("void *[]", [m])
h = L.holder_start(1, kinds, objs, ext.ffi.new("int[]", [2]))
assert status(L.c_fork_lock_all(1, kinds, objs, ext.ffi.new("int[]", [2]), 10)) == "ok"
assert lib.fg_unregister(handle) == 0
assert status(L.c_fork_lock_all(1, kinds, objs, ext.ffi.new("int[]", [1]), 1)) == "hung"
L.holder_stop(h)

rw = L.rwlock_new(0)
out = ffi.new("uint64_t *")
assert lib.fg_register_rwlock(ffi.cast("pthread_rwlock_t *", address(rw)), 0, 1.0, b"rw", out) == 0
kinds = ext.ffi.new("int[]", [L.K_WRLOCK]); objs = ext.ffi.new("void *[]", [rw])
h = L.holder_start(1, kinds, objs, ext.ffi.new("int[]", [1]))
assert status(L.c_fork_lock_all(1, kinds, objs, ext.ffi.new("int[]", [1]), 10)) == "ok"
L.holder_stop(h)

s = L.sem_new(1)
assert lib.fg_register_sem(ffi.cast("sem_t *", address(s)), 1, 0, 1.0, b"s", out) == -7

pair = L.pair_start(1)
rc, handle = reg_mutex(L.pair_mutex(pair), 0, policy=1, timeout=5.0)
assert rc == 0
results = [status(L.c_fork_pair_equal(pair, 10)) for _ in range(20)]
assert results == ["ok"] * 20, results  # held by polling: never torn
L.pair_stop(pair)
print("portable core ok")
"""


def test_portable_core_path(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tests), str(tmp_path), str(CSRC)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "portable core ok" in done.stdout
