"""Start methods: fork, fork + forkguard, forkserver and spawn.

Process start to first result (Process start + join; Pool(1) start + first
apply) and steady Pool(2) throughput with tiny tasks, each with a bare parent and
with about 200 MB and 1 GB of live Python objects; and the seed scenario (a thread
logging through QueueHandler), where plain fork would deadlock.
"""

from __future__ import annotations

import collections
import itertools
import json
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
from common import RECORDS_ENV, ballast

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


class SeedRecords(logging.Handler):
    """The parent's count of the workers' numbered records, as they reach a listener."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("seed record "):
            self.seen.append(int(message.rsplit(" ", 1)[1]))


def seed_pool1(method: str) -> Any:
    """The seed program's parent: a listener thread and a thread logging non-stop; each
    value is one Pool(1) start and one task that logs one numbered record.

    fork+forkguard registers the listener (the workers' records are forwarded to it);
    spawn and forkserver workers log to the parent through a multiprocessing queue and
    a second listener, the cookbook's way.  After each batch of values the records that
    arrived are counted (the waiting is not timed) and appended to $RECORDS_ENV."""

    def setup_logging() -> SeedRecords:
        if "seed_records" in _state:
            return _state["seed_records"]  # type: ignore[no-any-return]
        counted = _state["seed_records"] = SeedRecords()
        log_queue: queue.Queue[Any] = queue.Queue()
        listener = QueueListener(log_queue, logging.FileHandler(os.devnull), counted)
        listener.start()
        logging.getLogger().addHandler(QueueHandler(log_queue))

        def write_logs() -> None:
            while True:
                logging.error("hello, I just did something")
                # Bounded: a writer faster than the listener grew the queue by millions
                # of records (gigabytes), and a worker's record then waited behind them.
                # It waits by asking qsize() (which takes the queue's mutex), not by
                # sleeping: the mutex stays as busy as in the seed.
                while log_queue.qsize() > 1000:
                    pass

        threading.Thread(target=write_logs, daemon=True).start()
        if method == "fork+forkguard":
            import forkguard

            _state["guard"] = forkguard.register(listener)
            _state["seed_pool"] = {}
        else:
            records = multiprocessing.get_context(method).Queue()
            QueueListener(records, counted).start()
            _state["seed_pool"] = {"initializer": tasks.log_to, "initargs": (records,)}
        return counted

    ctx = multiprocessing.get_context("fork" if method == "fork+forkguard" else method)
    numbers = itertools.count()

    def time_it(loops: int) -> float:
        counted = setup_logging()
        total = 0.0
        sent = []
        for _ in range(loops):
            k = next(numbers)
            start = time.perf_counter()
            pool = ctx.Pool(1, **_state["seed_pool"])
            pool.apply_async(tasks.log_once, (k,)).get(timeout=RESULT_DEADLINE)
            total += time.perf_counter() - start
            sent.append(k)
            # Not terminate(): a spawn or forkserver worker killed while its queue's
            # feeder thread writes can cut a record in half on the shared pipe, and
            # the parent's listener then stops for good (multiprocessing warns of it).
            pool.close()
            pool.join()
        _count_records(method, sent, counted)
        return total

    return time_it


def _count_records(method: str, sent: list[int], counted: SeedRecords) -> None:
    """Wait (up to RESULT_DEADLINE) for the records of the tasks that returned, then
    append what arrived to the file run.py names."""
    deadline = time.monotonic() + RESULT_DEADLINE
    while not set(sent) <= set(counted.seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = collections.Counter(counted.seen)
    line = {
        "method": method,
        "sent": len(sent),
        "lost": sum(seen[k] == 0 for k in sent),
        "twice": sum(seen[k] > 1 for k in sent),
    }
    path = os.environ.get(RECORDS_ENV)
    if path:
        with open(path, "a") as f:  # a few lines per worker process
            f.write(json.dumps(line) + "\n")


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
