"""forkguard.protect(): what a tracked lock costs to make and to use, and what it adds
to a fork, with no lock held and with many held by another thread."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fork_exit_wait

LOCKS = 10_000  # tracked locks alive in the process during the fork benchmarks
HELD = 1_000  # of which this many are held by another thread in fork/held
_state: dict[str, Any] = {}  # keeps this worker's set-up alive


def _protect(on: bool) -> None:
    import forkguard

    if on:
        _state["protection"] = forkguard.protect()


def create(what: str, on: bool) -> Callable[[int], float]:
    def time_creation(loops: int) -> float:
        if not _state:
            _protect(on)
        make = getattr(threading, what)
        keep = [None] * loops  # creation, not deallocation, is measured
        start = time.perf_counter()
        for i in range(loops):
            keep[i] = make()
        seconds = time.perf_counter() - start
        del keep
        return seconds

    return time_creation


def with_block(on: bool) -> Callable[[int], float]:
    def time_with(loops: int) -> float:
        if not _state:
            _protect(on)
            _state["lock"] = threading.Lock()
        lock = _state["lock"]
        start = time.perf_counter()
        for _ in range(loops):
            with lock:
                pass
        return time.perf_counter() - start

    return time_with


def fork(on: bool, held: int | None = None) -> Callable[[int], float]:
    def time_forks(loops: int) -> float:
        if not _state:
            _protect(on)
            locks = [threading.Lock() for _ in range(LOCKS)]
            _state["locks"] = locks
            for lock in locks[:1]:  # a used lock, not only fresh ones
                with lock:
                    pass
            if held is not None:  # a second thread, holding `held` of the locks
                taken, done = threading.Event(), threading.Event()

                def hold() -> None:
                    for lock in locks[:held]:
                        lock.acquire()
                    taken.set()
                    done.wait()

                threading.Thread(target=hold, daemon=True).start()
                taken.wait()
                _state["done"] = done
        return fork_exit_wait(loops)

    return time_forks


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["description"] = "forkguard.protect(): tracked locks and forks"
    bench = runner.bench_time_func
    for what in ("Lock", "RLock"):
        bench(f"protect/create/{what}/bare", create(what, on=False))
        bench(f"protect/create/{what}/tracked", create(what, on=True))
    bench("protect/with/Lock/bare", with_block(on=False))
    bench("protect/with/Lock/tracked", with_block(on=True))
    bench(f"protect/fork/{LOCKS}/bare", fork(on=False))
    bench(f"protect/fork/{LOCKS}/tracked", fork(on=True))
    bench(f"protect/fork/{LOCKS}/tracked-thread-0-held", fork(on=True, held=0))
    bench(f"protect/fork/{LOCKS}/tracked-thread-{HELD}-held", fork(on=True, held=HELD))


if __name__ == "__main__":
    main()
