"""Fork scenarios for the C API consumers of docs/c-api.md, one per subprocess.

Run as ``python capi_scenarios.py CONSUMER_DIR SCENARIO CONSUMER``.  A subprocess
per scenario keeps each consumer's module-level registrations to itself.
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace
from typing import Any

import forkguard

from forking import run_in_child

HANG = 1.0
OK = 20.0

NAMES = {
    "c": "fgdemo_c.table_lock",
    "pybind11": "fgdemo_pybind.Cache.mutex",
    "cython": "fgdemo_cython.Ledger.lock",
    "cffi": "fgdemo_cffi.index_lock",
}


def make(consumer: str) -> Any:
    if consumer == "c":
        return importlib.import_module("fgdemo_c")
    if consumer == "pybind11":
        return importlib.import_module("fgdemo_pybind").Cache()
    if consumer == "cython":
        return importlib.import_module("fgdemo_cython").Ledger()
    importlib.import_module("fgdemo_cffi_use")  # attaches to forkguard
    lib = importlib.import_module("fgdemo_cffi").lib
    return SimpleNamespace(busy=lib.fgdemo_busy, done=lib.fgdemo_done, touch=lib.fgdemo_touch)


def registration(name: str) -> forkguard.Registration:
    found = [r for r in forkguard.registrations() if r.name == name]
    assert len(found) == 1, forkguard.registrations()
    return found[0]


def lock(consumer: str) -> None:
    """The consumer's native thread holds its lock at fork: fine registered, hung not."""
    obj = make(consumer)
    reg = registration(NAMES[consumer])
    assert reg.active and reg.policy == "reset", reg
    obj.busy()
    try:
        result = run_in_child(obj.touch, deadline=OK)
        assert result.status == "ok", result.detail
        assert reg.unregister() is True
        assert reg.unregister() is False
        assert run_in_child(obj.touch, deadline=HANG).status == "hung"
    finally:
        obj.done()
    print("lock ok")


def hooks(_consumer: str) -> None:
    """Child hook once per fork in the child only; parent hook once in the parent."""
    mod = importlib.import_module("fgdemo_c")
    reg = registration("fgdemo_c.hooks")
    assert reg.kind == "C hooks", reg
    for n in range(1, 4):
        before = mod.fork_counts()
        assert before == (n - 1, n - 1, 0), before
        result = run_in_child(lambda n=n: mod.fork_counts() == (n, n - 1, 1), deadline=OK)
        assert result.status == "ok", (n, mod.fork_counts(), result.detail)
        assert mod.fork_counts() == (n, n, 0)
    assert reg.unregister() is True
    assert run_in_child(lambda: mod.fork_counts() == (3, 3, 0), deadline=OK)
    assert mod.fork_counts() == (3, 3, 0)  # unregistered hooks never run again
    print("hooks ok")


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    {"lock": lock, "hooks": hooks}[sys.argv[2]](sys.argv[3])
