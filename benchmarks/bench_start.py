"""Start methods: fork, fork + forkguard, forkserver and spawn.

Process start to first result (Process start + join; Pool(1) start + first
apply) and steady Pool(2) throughput with tiny tasks, each with a bare parent and
with about 200 MB and 1 GB of live Python objects; and the seed scenario (a thread
logging through QueueHandler), where plain fork would deadlock.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks
from common import ballast

METHODS = ("fork", "fork+forkguard", "forkserver", "spawn")
SIZES = {"bare": 0, "200MB": 200, "1GB": 1000}
TASKS_PER_VALUE = 200  # tiny tasks per measured value of the throughput benchmark
RESULT_DEADLINE = 60.0  # seconds: a hung worker fails the benchmark instead of stalling it

_state: dict[str, Any] = {}  # this worker's parent state: ballast, pools, logging


def _context(method: str) -> Any:
    if method == "fork+forkguard":
        import forkguard

        # What an application guarding fork typically has registered.
        q: queue.Queue[Any] = queue.Queue()
        _state["guarded"] = (q, forkguard.register(q))
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context(method)


def _prepare(method: str, megabytes: int) -> Any:
    if "ctx" not in _state:
        _state["ballast"] = ballast(megabytes)
        _state["ctx"] = _context(method)
    return _state["ctx"]


def process_start(method: str, megabytes: int) -> Any:
    def time_it(loops: int) -> float:
        ctx = _prepare(method, megabytes)
        total = 0.0
        for _ in range(loops):
            start = time.perf_counter()
            p = ctx.Process(target=tasks.noop)
            p.start()
            p.join()
            total += time.perf_counter() - start
        return total

    return time_it


def pool1_first_result(method: str, megabytes: int, work: Any = tasks.noop) -> Any:
    def time_it(loops: int) -> float:
        ctx = _prepare(method, megabytes)
        total = 0.0
        for _ in range(loops):
            start = time.perf_counter()
            pool = ctx.Pool(1)
            pool.apply_async(work).get(timeout=RESULT_DEADLINE)
            total += time.perf_counter() - start
            pool.terminate()  # shutting the pool down is not part of the measure
            pool.join()
        return total

    return time_it


def pool2_throughput(method: str, megabytes: int) -> Any:
    def time_it(loops: int) -> float:
        ctx = _prepare(method, megabytes)
        if "pool" not in _state:
            _state["pool"] = ctx.Pool(2)
            _state["pool"].map(tasks.tiny, range(10))  # both workers up
        pool = _state["pool"]
        start = time.perf_counter()
        for _ in range(loops):
            pool.map(tasks.tiny, range(TASKS_PER_VALUE), chunksize=1)
        return time.perf_counter() - start

    return time_it


def seed_pool1(method: str) -> Any:
    """The seed program's parent: a listener thread and a thread logging non-stop."""

    def setup_logging() -> None:
        if "log_queue" in _state:
            return
        log_queue: queue.Queue[Any] = queue.Queue()
        QueueListener(log_queue, logging.FileHandler(os.devnull)).start()
        logging.getLogger().addHandler(QueueHandler(log_queue))

        def write_logs() -> None:
            while True:
                logging.error("hello, I just did something")

        threading.Thread(target=write_logs, daemon=True).start()
        _state["log_queue"] = log_queue
        if method == "fork+forkguard":
            import forkguard

            _state["guard"] = forkguard.register(log_queue)

    inner = pool1_first_result("fork" if method == "fork+forkguard" else method, 0, tasks.log_once)

    def time_it(loops: int) -> float:
        setup_logging()
        return float(inner(loops))

    return time_it


def main() -> None:
    # loops=1: each value is one start (or one batch of tasks); no calibration runs.
    runner = pyperf.Runner(loops=1)
    runner.metadata["description"] = "multiprocessing start methods; seconds"
    for size, megabytes in SIZES.items():
        for method in METHODS:
            runner.bench_time_func(
                f"start/process/{method}/{size}", process_start(method, megabytes)
            )
            runner.bench_time_func(
                f"start/pool1/{method}/{size}", pool1_first_result(method, megabytes)
            )
            runner.bench_time_func(
                f"start/pool2-task/{method}/{size}",
                pool2_throughput(method, megabytes),
                inner_loops=TASKS_PER_VALUE,
            )
    for method in ("fork+forkguard", "forkserver", "spawn"):
        runner.bench_time_func(f"seed/pool1/{method}", seed_pool1(method))


if __name__ == "__main__":
    main()
