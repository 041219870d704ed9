"""A forked child's log records, three ways: forwarded to the parent's QueueListener
(what ``register(listener)`` does), handled by the child itself through the same
handlers (the alternative design), and a plain FileHandler in the child (what a spawn
or forkserver worker would have; the floor).

Each value: fork a child that logs RECORDS records and leaves with ``os._exit``;
the time runs until every record was handled (for forwarding: by the parent's
listener, drained).  The handlers write to ``os.devnull``.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener
from typing import Any

import pyperf

RECORDS = 1000
_state: dict[str, Any] = {}


def _set_up(design: str) -> logging.Logger:
    log = logging.getLogger(f"bench-{design}")
    log.propagate = False
    if design == "plain":
        log.addHandler(logging.FileHandler(os.devnull))
        return log
    q: queue.Queue[Any] = queue.Queue()
    listener = QueueListener(q, logging.FileHandler(os.devnull))
    listener.start()
    log.addHandler(QueueHandler(q))
    if design == "forward":
        import forkguard

        _state["registration"] = forkguard.register(listener)
        _state["drain"] = listener
    else:  # the child's own consumer: its puts handled right there, synchronously

        def own_consumer() -> None:
            q.put = lambda item, block=True, timeout=None: listener.handle(item)  # type: ignore[method-assign]
            q.put_nowait = listener.handle  # type: ignore[method-assign]

        os.register_at_fork(after_in_child=own_consumer)
    _state["listener"] = listener
    return log


def child_records(design: str) -> Callable[[int], float]:
    def time_it(loops: int) -> float:
        if "log" not in _state:
            _state["log"] = _set_up(design)
        log = _state["log"]
        total = 0.0
        for _ in range(loops):
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                for i in range(RECORDS):
                    log.error("record %d", i)
                os._exit(0)
            os.waitpid(pid, 0)
            if design == "forward":
                from forkguard import _forward

                _forward._channels[id(_state["listener"])].drain(10)
                # ... and the listener thread has handled them: its queue is empty
                q = _state["listener"].queue
                while q.unfinished_tasks:
                    time.sleep(0.0001)
            total += time.perf_counter() - start
        return total

    return time_it


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["description"] = "a forked child's log records: forwarded, own consumer"
    for design in ("forward", "own-consumer", "plain"):
        runner.bench_time_func(f"forward/child-{RECORDS}-records/{design}", child_records(design))


if __name__ == "__main__":
    sys.exit(main())
