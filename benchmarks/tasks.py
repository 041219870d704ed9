"""Functions the start-method benchmarks run in child processes (importable by spawn
and forkserver children, which do not inherit the benchmark script's globals)."""

from __future__ import annotations

import logging
import os
from typing import Any


def noop() -> None:
    """The smallest unit of work: start-up cost is all that is measured."""


def tiny(x: int) -> int:
    return x


def log_once(k: int) -> int:
    """The seed program's worker: one numbered record, through the QueueHandler a
    forked worker inherits or the one ``log_to`` gave a spawned one."""
    logging.error("seed record %d", k)
    return os.getpid()


def log_to(records: Any) -> None:
    """Pool initializer for spawn and forkserver workers: their records go to the
    parent through a multiprocessing queue (the logging cookbook's way)."""
    from logging.handlers import QueueHandler

    logging.getLogger().addHandler(QueueHandler(records))
