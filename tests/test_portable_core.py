"""Other builds of the C core, run here: the non-Linux path (macOS: restore by
re-initialising in place, holds by polling, mutex types given by the caller) compiled
with FG_PORTABLE, and a registry limit small enough to reach.

Each is a second copy of the core, so it runs in a subprocess of its own.
"""

from __future__ import annotations

import json
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

PROLOGUE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import native
from pathlib import Path

work, csrc = Path(sys.argv[2]), Path(sys.argv[3])
ext = native.build(work / "ext")
core = native.build_core(work / "core", csrc, [tuple(m) for m in json.loads(sys.argv[4])])
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
"""

PORTABLE = r"""
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
print("core ok")
"""

LIMIT = r"""
ENOMEM = -4
mutexes = [L.mutex_new(L.PTHREAD_MUTEX_NORMAL, 0, 0) for _ in range(65)]
handles = []
for m in mutexes[:64]:
    rc, handle = reg_mutex(m, 0)
    assert rc == 0, rc
    handles.append(handle)
# Full: a 65th registration of any kind is refused and changes nothing.
assert reg_mutex(mutexes[64], 0) == (ENOMEM, 0)
out = ffi.new("uint64_t *")
hook_address = int(ext.ffi.cast("uintptr_t", ext.ffi.addressof(L, "hook_child")))
hook = ffi.cast("forkguard_hook", hook_address)
assert lib.fg_register_hooks(ffi.NULL, ffi.NULL, hook, ffi.NULL, b"h", out) == ENOMEM
assert lib.fg_count() == 64 and all(lib.fg_is_active(h) == 1 for h in handles)
# Every registered mutex is still restored: hold them all in a native thread.
kinds = ext.ffi.new("int[]", [L.K_MUTEX] * 8)
for start in range(0, 64, 8):
    objs = ext.ffi.new("void *[]", mutexes[start:start + 8])
    depths = ext.ffi.new("int[]", [1] * 8)
    h = L.holder_start(8, kinds, objs, depths)
    assert status(L.c_fork_lock_all(8, kinds, objs, depths, 10)) == "ok"
    L.holder_stop(h)
# A freed slot is used again: memory is bounded by the live registrations.
assert lib.fg_unregister(handles[0]) == 0
rc, handle = reg_mutex(mutexes[64], 0)
assert rc == 0 and (handle & 0xFFFFFFFF) == (handles[0] & 0xFFFFFFFF), (handle, handles[0])
assert lib.fg_count() == 64
print("core ok")
"""


def _run(tmp_path: Path, body: str, macros: list[tuple[str, str]]) -> None:
    tests = Path(__file__).resolve().parent
    script = textwrap.dedent(PROLOGUE) + textwrap.dedent(body)
    args = [str(tests), str(tmp_path), str(CSRC), json.dumps(macros)]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "core ok" in done.stdout


def test_portable_core_path(tmp_path: Path) -> None:
    _run(tmp_path, PORTABLE, [("FG_PORTABLE", "1")])


def test_full_registry_refuses_and_changes_nothing(tmp_path: Path) -> None:
    _run(tmp_path, LIMIT, [("FG_MAX_ENTRIES", "64")])
