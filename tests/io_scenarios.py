"""Whole-program scenarios around CPython's buffered I/O lock, run as scripts.

``print``: a thread prints to a block-buffered stdout (a pipe) without pause while
the main thread forks; each child prints one line, flushes and leaves.
``buffered``: no thread; the parent prints a line (left in stdout's buffer) before
each fork, and each child prints one line, flushes and leaves.
``shutdown``: the seed's logging set-up (QueueHandler -> Queue -> QueueListener ->
FileHandler) with a thread logging without pause; each child logs, then exits
through ``logging.shutdown()``, which flushes the FileHandler's stream.

``--mode``: ``bare`` (no forkguard), ``queue`` (the log queue registered, not the
stream), ``register`` (everything the scenario needs registered) or ``protect``
(``forkguard.protect()`` alone).  Every child runs under a 2 s alarm.  The script
prints its own summary as one JSON line on stderr; stdout is the stream under test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from logging.handlers import QueueHandler, QueueListener
from queue import Queue
from typing import Any

from scenario_script import fork_children

THREAD_LINES = 200_000  # the printing thread's bound: at most ~2.6 MB through the pipe


def _protect(mode: str, *objects: object) -> None:
    import forkguard

    if mode == "protect":
        forkguard.protect()
        return
    for obj in objects:
        forkguard.register(obj)


def print_scenario(mode: str, forks: int) -> dict[str, int]:
    if mode != "bare":
        _protect(mode, sys.stdout)
    stop = threading.Event()

    def printer() -> None:
        for i in range(THREAD_LINES):
            if stop.is_set():
                break
            print("thread", i)

    thread = threading.Thread(target=printer, daemon=True)
    thread.start()

    def child(k: int) -> None:
        print("child", k)
        sys.stdout.flush()

    summary = fork_children(forks, child)
    stop.set()
    thread.join()
    sys.stdout.flush()
    return summary


def buffered_scenario(mode: str, forks: int) -> dict[str, int]:
    if mode != "bare":
        _protect(mode, sys.stdout)

    def child(k: int) -> None:
        print("child", k)
        sys.stdout.flush()

    # Each fork finds the parent's lines in stdout's buffer, its lock free.
    summary = fork_children(forks, child, before=lambda k: print("parent", k))
    sys.stdout.flush()
    return summary


def shutdown_scenario(mode: str, forks: int, results: int) -> dict[str, int]:
    if mode == "protect":  # first, as `python -m forkguard run` would
        _protect(mode)
    log_queue: Queue[Any] = Queue()
    handler = logging.FileHandler(os.devnull)  # a loop writes here: never a real file
    if mode == "queue":
        _protect(mode, log_queue)
    elif mode == "register":
        _protect(mode, log_queue, handler.stream)
    listener = QueueListener(log_queue, handler)
    listener.start()
    logging.getLogger().addHandler(QueueHandler(log_queue))
    stop = threading.Event()

    def log_without_pause() -> None:
        while not stop.is_set():
            logging.error("hello, I just did something")

    thread = threading.Thread(target=log_without_pause, daemon=True)
    thread.start()

    def child(k: int) -> None:
        logging.error("hello from child %d", k)
        logging.shutdown()
        os.write(results, b"done %d\n" % k)

    summary = fork_children(forks, child)
    stop.set()
    thread.join()
    listener.stop()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("print", "buffered", "shutdown"))
    parser.add_argument("--mode", choices=("bare", "queue", "register", "protect"), required=True)
    parser.add_argument("--forks", type=int, default=30)
    parser.add_argument("--results", type=int, default=-1, help="fd for the children's marks")
    args = parser.parse_args()
    if args.scenario == "print":
        summary = print_scenario(args.mode, args.forks)
    elif args.scenario == "buffered":
        summary = buffered_scenario(args.mode, args.forks)
    else:
        summary = shutdown_scenario(args.mode, args.forks, args.results)
    print(json.dumps(summary), file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
