"""What forkguard adds to a fork: os.fork() + _exit + waitpid with N registrations,
against what a user would write by hand without forkguard.

pyperf runs each benchmark in fresh worker processes, so every benchmark sets up
its own registrations (lazily, on its first call) and none sees another's.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fork_exit_wait, native

COUNTS = (10, 100, 1000, 10000)
_state: dict[str, Any] = {}  # keeps this worker's set-up alive


def _once(setup: Callable[[], None]) -> Callable[[int], float]:
    def time_forks(loops: int) -> float:
        if not _state:
            setup()
            _state["ready"] = True
        return fork_exit_wait(loops)

    return time_forks


def _mutexes(n: int) -> list[Any]:
    lib = native().lib
    array = lib.bench_mutexes(max(n, 1))
    _state["array"] = array
    return [lib.bench_mutex_at(array, i) for i in range(n)]


def forkguard_nothing() -> None:
    import forkguard  # noqa: F401 - imported: its hooks run at every fork


def forkguard_c_mutexes(n: int) -> Callable[[], None]:
    def setup() -> None:
        import forkguard

        _state["regs"] = [forkguard.register(m, mutex_type="normal") for m in _mutexes(n)]

    return setup


def forkguard_py_locks(n: int) -> Callable[[], None]:
    def setup() -> None:
        import forkguard

        locks = [threading.Lock() for _ in range(n)]
        _state["locks"] = locks
        _state["regs"] = [forkguard.register(lock) for lock in locks]

    return setup


def hand_py_locks(n: int) -> Callable[[], None]:
    """What one writes without forkguard: a hook that re-initialises each lock."""

    def setup() -> None:
        locks = [threading.Lock() for _ in range(n)]
        _state["locks"] = locks

        def reinit() -> None:
            for lock in locks:
                lock._at_fork_reinit()  # type: ignore[attr-defined]

        os.register_at_fork(after_in_child=reinit)

    return setup


def hand_ctypes_mutexes(n: int) -> Callable[[], None]:
    """...and for C mutexes: pthread_mutex_init through ctypes in the child."""

    def setup() -> None:
        import ctypes

        ffi = native().ffi
        addresses = [ctypes.c_void_p(int(ffi.cast("uintptr_t", m))) for m in _mutexes(n)]
        init = ctypes.CDLL(None).pthread_mutex_init
        _state["addresses"] = addresses

        def reinit() -> None:
            for address in addresses:
                init(address, None)

        os.register_at_fork(after_in_child=reinit)

    return setup


def forkguard_hold_free(what: str) -> Callable[[], None]:
    """One hold-policy registration whose lock is free at every fork."""

    def setup() -> None:
        import forkguard

        if what == "py-lock":
            _state["lock"] = lock = threading.Lock()
            _state["reg"] = forkguard.register(lock, policy="hold")
        else:
            (mutex,) = _mutexes(1)
            _state["reg"] = forkguard.register(mutex, policy="hold", mutex_type="normal")

    return setup


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["description"] = "os.fork() + os._exit(0) + os.waitpid(); seconds per fork"
    bench = runner.bench_time_func
    bench("fork/bare/0", _once(lambda: None))
    bench("fork/none/0", _once(forkguard_nothing))
    # The C columns' own baselines: the extension that owns the mutexes loaded (cffi and
    # its .so mapped, which a fork copies) and its mutexes made, none registered; the
    # ctypes hook installed over no mutex.
    bench("fork/c-mutex/0", _once(forkguard_c_mutexes(0)))
    bench("fork/hand-ctypes-mutex/0", _once(hand_ctypes_mutexes(0)))
    for n in COUNTS:
        bench(f"fork/c-mutex/{n}", _once(forkguard_c_mutexes(n)))
        bench(f"fork/py-lock/{n}", _once(forkguard_py_locks(n)))
        bench(f"fork/hand-py-lock/{n}", _once(hand_py_locks(n)))
        bench(f"fork/hand-ctypes-mutex/{n}", _once(hand_ctypes_mutexes(n)))
    bench("fork/hold-free/py-lock", _once(forkguard_hold_free("py-lock")))
    bench("fork/hold-free/c-mutex", _once(forkguard_hold_free("c-mutex")))


if __name__ == "__main__":
    main()
