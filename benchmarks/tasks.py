"""Functions the start-method benchmarks run in child processes (importable by spawn
and forkserver children, which do not inherit the benchmark script's globals)."""

from __future__ import annotations

import logging
import os


def noop() -> None:
    """The smallest unit of work: start-up cost is all that is measured."""


def tiny(x: int) -> int:
    return x


def log_once() -> int:
    """The seed program's worker: one log call, through the QueueHandler a forked
    worker inherits (a spawned one has no handler: it logs nowhere, quietly)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    logging.error("hello from a pool worker")
    return os.getpid()
