"""Registration throughput: register + unregister pairs, through the Python API and
through the C API (a C loop calling forkguard.h's table)."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import native

_state: dict[str, Any] = {}


def _mutex() -> Any:
    if "mutex" not in _state:
        _state["mutex"] = native().lib.bench_mutexes(1)
    return _state["mutex"]


def python_pairs(make: str) -> Any:
    def time_pairs(loops: int) -> float:
        import forkguard

        register = forkguard.register
        if make == "c-mutex":  # a cffi pointer, as an extension hands it out
            obj: Any = _mutex()
            kwargs: dict[str, Any] = {}
        elif make == "c-mutex-address":  # an integer address, as ctypes gives it
            obj = int(native().ffi.cast("uintptr_t", _mutex()))
            kwargs = {"kind": "pthread_mutex"}
        else:
            obj = _state.setdefault("lock", threading.Lock())
            kwargs = {}
        start = time.perf_counter()
        for _ in range(loops):
            register(obj, **kwargs).unregister()
        return time.perf_counter() - start

    return time_pairs


def c_api_pairs(loops: int) -> float:
    import forkguard

    mod = native()
    table = mod.ffi.cast("void *", forkguard._C_API_ADDRESS)
    seconds = float(mod.lib.bench_c_api_pairs(table, _mutex(), loops))
    if seconds < 0:
        raise RuntimeError("forkguard's C API refused the benchmark's registration")
    return seconds


def c_calls_pairs(loops: int) -> float:
    """The floor of a Python API pair: only its two calls into the C core, through
    cffi (which releases and retakes the GIL around each), no Python bookkeeping."""
    from forkguard import _native

    lib = _native.lib
    kind, detect, null = lib.FG_KIND_MUTEX, lib.FORKGUARD_MUTEX_DETECT, _native.ffi.NULL
    register, unregister = lib.fgpy_register, lib.fg_unregister
    address = int(native().ffi.cast("uintptr_t", _mutex()))
    start = time.perf_counter()
    for _ in range(loops):
        unregister(register(kind, address, detect, 0, 0, 1.0, null))
    return time.perf_counter() - start


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["description"] = "one forkguard register + unregister pair; seconds"
    for make in ("c-mutex", "c-mutex-address", "py-lock"):
        runner.bench_time_func(f"register/python-api/{make}", python_pairs(make))
    runner.bench_time_func("register/c-api/c-mutex", c_api_pairs)
    runner.bench_time_func("register/c-calls-only/c-mutex", c_calls_pairs)


if __name__ == "__main__":
    main()
