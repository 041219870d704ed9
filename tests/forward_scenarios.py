"""The seed's logging with children that log and leave, as a whole program.

QueueHandler -> queue.Queue -> QueueListener -> FileHandler, a parent thread
logging numbered records without pause, and children that log numbered records
and then leave: ``os._exit`` (as multiprocessing's workers do), ``sys.exit`` (the
interpreter's own shutdown, atexit and ``logging.shutdown()`` included), SIGTERM
right after logging, or a fork Pool terminated while its workers are idle.

``--mode``: ``queue`` (only the queue registered: no hang, the children's records
are lost), ``listener`` (``register(listener)``) or ``protect`` (``protect()``
first, before logging is set up).  The log file is in a temporary folder; the
script counts what reached it and prints one JSON line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
from typing import Any

CHILD_RECORDS = 20
PARENT_BOUND = 200_000  # the parent thread's bound (a loop never writes without end)


def _task(k: int) -> int:
    logging.getLogger("seed").error("child %d %d", k, 0)
    return k


def run_children(how: str, children: int, results: int, log: logging.Logger) -> dict[str, Any]:
    """Children that log and leave `how`; how many hung or failed."""
    summary: dict[str, Any] = {"hung": 0, "failed": 0}
    if how == "pool":
        pool = multiprocessing.get_context("fork").Pool(2)
        try:
            done = pool.map_async(_task, range(children), chunksize=1).get(timeout=30)
            summary["failed"] = children - len(done)
        except multiprocessing.TimeoutError:
            summary["hung"] = 1
        finally:
            pool.terminate()  # idle workers: SIGTERM
            pool.join()
    else:
        for k in range(children):
            pid = os.fork()
            if pid == 0:
                signal.alarm(5)
                for j in range(CHILD_RECORDS):
                    log.error("child %d %d", k, j)
                os.write(results, b"done %d\n" % k)
                if how == "sys.exit":
                    sys.exit(0)  # unwinds main(): the interpreter shuts down as usual
                if how == "SIGTERM":
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    os.kill(os.getpid(), signal.SIGTERM)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
                summary["hung"] += 1
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
                summary["failed"] += 1
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("queue", "listener", "protect"), required=True)
    parser.add_argument("--exit", choices=("os._exit", "sys.exit", "SIGTERM", "pool"))
    parser.add_argument("--children", type=int, default=10)
    parser.add_argument("--results", type=int, required=True)
    args = parser.parse_args()

    import forkguard

    if args.mode == "protect":
        forkguard.protect()
    from logging.handlers import QueueHandler, QueueListener
    from queue import Queue

    folder = tempfile.mkdtemp(prefix="forkguard-forward-")
    path = os.path.join(folder, "out.log")
    log_queue: Queue[Any] = Queue()
    handler = logging.FileHandler(path)
    listener = QueueListener(log_queue, handler)
    listener.start()
    if args.mode == "listener":
        forkguard.register(listener)
    elif args.mode == "queue":
        forkguard.register(log_queue)
    log = logging.getLogger("seed")
    log.propagate = False
    log.addHandler(QueueHandler(log_queue))

    sent = [0]
    stop = threading.Event()

    def parent_logs() -> None:
        while not stop.is_set() and sent[0] < PARENT_BOUND:
            log.error("parent %d", sent[0])
            sent[0] += 1

    thread = threading.Thread(target=parent_logs, daemon=True)
    thread.start()

    summary = run_children(args.exit, args.children, args.results, log)
    stop.set()
    thread.join()
    listener.stop()
    handler.close()
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    os.rmdir(folder)
    children = re.findall(r"^child (\d+) (\d+)$", text, re.M)
    parent = re.findall(r"^parent (\d+)$", text, re.M)
    per_child = 1 if args.exit == "pool" else CHILD_RECORDS
    summary.update(
        child_records=len(children),
        child_unique=len(set(children)),
        child_expected=args.children * per_child,
        parent_sent=sent[0],
        parent_found=len(parent),
        parent_unique=len(set(parent)),
    )
    print(json.dumps(summary), file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
