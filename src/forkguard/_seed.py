"""The seed program: a thread logs through QueueHandler while multiprocessing Pools fork.

The pool worker inherits the log queue's mutex held by the logging thread, which
does not exist in the child, so its first log call blocks forever.  With
``--protect`` the queue is registered with forkguard and the worker's copy is
reset after the fork.

Run as ``python -m forkguard._seed [--protect] [--pools N] [--deadline S]
[--method fork|forkserver|spawn]``.  It prints one JSON line and exits with
``os._exit`` so that a hung worker or the endless logging thread cannot keep it
alive; whoever starts it kills its process group afterwards (hung workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from logging.handlers import QueueHandler, QueueListener
from queue import Queue
from threading import Thread
from typing import Any


def setup_logging(path: str) -> Queue[Any]:
    """The seed's logging set-up: a listener thread drains the queue to a file,
    and a second thread logs without pause."""
    log_queue: Queue[Any] = Queue()
    QueueListener(log_queue, logging.FileHandler(path)).start()
    logging.getLogger().addHandler(QueueHandler(log_queue))

    def write_logs() -> None:
        while True:
            logging.error("hello, I just did something")

    Thread(target=write_logs, daemon=True).start()
    return log_queue


def runs_in_subprocess() -> int:
    logging.error("hello, I did something")
    return os.getpid()


def run(*, protect: bool, pools: int, deadline: float, method: str) -> dict[str, Any]:
    """Start `pools` pools one after another; stop at the first that hangs."""
    log_queue = setup_logging(os.devnull)
    if protect:
        import forkguard

        forkguard.register(log_queue)
    ctx = multiprocessing.get_context(method)
    seconds: list[float] = []
    for n in range(1, pools + 1):
        start = time.perf_counter()
        pool = ctx.Pool(2)
        try:
            pool.apply_async(runs_in_subprocess).get(timeout=deadline)
        except multiprocessing.TimeoutError:
            return {"result": "deadlocked", "pool": n, "clean_pools": n - 1, "seconds": seconds}
        pool.close()
        pool.join()
        seconds.append(time.perf_counter() - start)
    return {"result": "clean", "pool": pools, "clean_pools": pools, "seconds": seconds}


def run_isolated(
    *, protect: bool, pools: int, deadline: float, method: str = "fork", limit: float = 120.0
) -> dict[str, Any]:
    """Run the seed program in its own session, at most `limit` seconds, and
    kill whatever it leaves behind (hung pool workers included).

    Its output goes to a file, not a pipe: hung workers would hold a pipe open.
    """
    cmd = [sys.executable, "-m", "forkguard._seed", "--pools", str(pools)]
    cmd += ["--deadline", str(deadline), "--method", method]
    if protect:
        cmd.append("--protect")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        text = out.read().strip()
    if not text:
        return {
            "result": "no answer",
            "pool": 0,
            "clean_pools": 0,
            "seconds": [],
            "returncode": proc.returncode,
        }
    result: dict[str, Any] = json.loads(text.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m forkguard._seed")
    parser.add_argument("--protect", action="store_true", help="register the log queue")
    parser.add_argument("--pools", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds per pool")
    parser.add_argument("--method", default="fork", choices=("fork", "forkserver", "spawn"))
    args = parser.parse_args()
    result = run(protect=args.protect, pools=args.pools, deadline=args.deadline, method=args.method)
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
