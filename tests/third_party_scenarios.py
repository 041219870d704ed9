"""Fork hangs reported against real PyPI libraries, run as whole programs.

``loguru`` (Delgan/loguru#231, loguru 0.4): a thread logs through a loguru sink
without pause while the main thread forks; each child logs one record, which must
reach the sink.  The sink writes under the handler's ``_lock``; a child forked while
the thread held it waits on it forever.
``prometheus`` (prometheus/client_python#431): multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), a thread increments a Counter without pause; each
child increments it once and reads its own value back.  Every value shares one
module-level lock in ``prometheus_client.values``, made at import.

``--mode``: ``bare`` (no forkguard) or ``protect`` (``forkguard.protect()`` before
the library is imported, since both make their locks at import or set-up time).
Every child runs under a 2 s alarm and reports "done K" on the ``--results`` fd.
The script prints its summary as one JSON line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from scenario_script import fork_children

THREAD_CALLS = 2_000_000  # the background thread's bound, should the main thread stall


def _import(name: str, mode: str) -> Any:
    """The library, imported after forkguard.protect() in protect mode."""
    if mode == "protect":
        import forkguard

        forkguard.protect()
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # a test extra: say how to get it rather than a bare trace
        sys.exit(f"{name} is not installed: pip install '.[test]' ({exc})")


def _in_background(call: Callable[[], None]) -> Callable[[], None]:
    """Start a thread repeating ``call``; return what stops and joins it."""
    stop = threading.Event()

    def loop() -> None:
        for _ in range(THREAD_CALLS):
            if stop.is_set():
                break
            call()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join()

    return finish


def loguru_scenario(mode: str, forks: int, results: int) -> dict[str, int]:
    logger = _import("loguru", mode).logger
    logger.remove()  # the default stderr sink
    # A loop writes here: never a real file.  A raw fd, so that the handler's lock is
    # the only lock on the way (no buffered file's lock).
    devnull = os.open(os.devnull, os.O_WRONLY)

    def sink(message: Any) -> None:
        # Called under the handler's lock; one write(2) per record, as a flushed file sink.
        # Only a child's record is reported, so "done K" proves that record got through.
        os.write(devnull, message.encode())
        child = message.record["extra"].get("child")
        if child is not None:
            os.write(results, b"done %d\n" % child)

    logger.add(sink, format="{time} {level} {message}")
    finish = _in_background(lambda: logger.info("hello from the thread"))

    def child(k: int) -> None:
        logger.bind(child=k).info("hello from child {}", k)

    summary = fork_children(forks, child)
    finish()
    return summary


def prometheus_scenario(mode: str, forks: int, results: int) -> dict[str, int]:
    # Multiprocess mode is chosen at import, from the environment: set it first.
    store = tempfile.mkdtemp(prefix="forkguard-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = store
    try:
        prometheus_client = _import("prometheus_client", mode)
        counter = prometheus_client.Counter("forkguard_calls", "calls", registry=None)
        finish = _in_background(counter.inc)

        def child(k: int) -> None:
            counter.inc()
            # The child starts its own per-pid file, so its own increment is all it sees.
            (sample,) = [s for s in counter.collect()[0].samples if s.name.endswith("_total")]
            if sample.value != 1.0:
                raise RuntimeError(f"child {k} reads {sample.value}, not 1.0")
            os.write(results, b"done %d\n" % k)

        summary = fork_children(forks, child)
        finish()
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return summary


SCENARIOS = {"loguru": loguru_scenario, "prometheus": prometheus_scenario}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("library", choices=sorted(SCENARIOS))
    parser.add_argument("--mode", choices=("bare", "protect"), required=True)
    parser.add_argument("--forks", type=int, default=30)
    parser.add_argument("--results", type=int, required=True, help="fd for the children's marks")
    args = parser.parse_args()
    summary = SCENARIOS[args.library](args.mode, args.forks, args.results)
    print(json.dumps(summary), file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
