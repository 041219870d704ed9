"""The seed program: a thread logs through QueueHandler while multiprocessing Pools fork.

The pool worker inherits the log queue's mutex held by the logging thread, which
does not exist in the child, so its first log call blocks forever.  ``--register
queue`` registers the queue with forkguard: the worker's copy is reset after the
fork, nothing hangs, but the worker's records go into its own copy of the queue,
which nothing reads.  ``--register listener`` registers the QueueListener: the
queue is reset and the worker's records travel to the parent's listener.

Every record that reaches the listener is counted (the file it writes is
``os.devnull``, as the thread logs without pause): each pool's worker logs one
record, and the parent's records are counted as sent and as handled.

Run as ``python -m forkguard._seed [--register none|queue|listener] [--pools N]
[--deadline S] [--method fork|forkserver|spawn]``.  It prints one JSON line and
exits with ``os._exit`` so that a hung worker or the endless logging thread
cannot keep it alive; whoever starts it kills its process group afterwards.
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
from threading import Event, Thread
from typing import Any

CHILD_MESSAGE = "hello, I did something"
PARENT_MESSAGE = "hello, I just did something"


class Counter(logging.Handler):
    """Counts what reaches the listener, by message (keeps no record)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.counts[message] = self.counts.get(message, 0) + 1


class Seed:
    """The seed's logging set-up: a listener thread drains the queue to a file
    (and a counter), and a second thread logs without pause."""

    def __init__(self, path: str) -> None:
        self.queue: Queue[Any] = Queue()
        self.counter = Counter()
        self.listener = QueueListener(self.queue, logging.FileHandler(path), self.counter)
        self.listener.start()
        logging.getLogger().addHandler(QueueHandler(self.queue))
        self.sent = 0
        self._stop = Event()
        self._thread = Thread(target=self._write_logs, daemon=True)
        self._thread.start()

    def _write_logs(self) -> None:
        while not self._stop.is_set():
            logging.error(PARENT_MESSAGE)
            self.sent += 1
            # The backlog is bounded (a writer faster than the listener would grow it
            # without end, and each child's record would wait behind it), and the
            # queue's mutex stays busy meanwhile: the writer waits by asking qsize(),
            # which takes the mutex, not by sleeping, which would leave the mutex free
            # at nearly every fork (the bare seed then ran 100 pools clean).
            while self.queue.qsize() > 1000 and not self._stop.is_set():
                pass

    def finish(self) -> dict[str, int]:
        """Stop logging, let the listener handle everything, and count."""
        self._stop.set()
        self._thread.join(10)
        self.listener.stop()
        return {
            "child_records": self.counter.counts.get(CHILD_MESSAGE, 0),
            "parent_sent": self.sent,
            "parent_handled": self.counter.counts.get(PARENT_MESSAGE, 0),
        }


def runs_in_subprocess() -> int:
    logging.error(CHILD_MESSAGE)
    return os.getpid()


def run(*, register: str, pools: int, deadline: float, method: str) -> dict[str, Any]:
    """Start `pools` pools one after another; stop at the first that hangs."""
    seed = Seed(os.devnull)
    if register != "none":
        import forkguard

        forkguard.register(seed.listener if register == "listener" else seed.queue)
    ctx = multiprocessing.get_context(method)
    seconds: list[float] = []
    result: dict[str, Any] = {"result": "clean", "pool": pools, "clean_pools": pools}
    for n in range(1, pools + 1):
        start = time.perf_counter()
        pool = ctx.Pool(2)
        try:
            pool.apply_async(runs_in_subprocess).get(timeout=deadline)
        except multiprocessing.TimeoutError:
            result = {"result": "deadlocked", "pool": n, "clean_pools": n - 1}
            break
        pool.close()
        pool.join()
        seconds.append(time.perf_counter() - start)
    result["seconds"] = seconds
    if result["result"] == "clean":  # a hung worker's pool is never joined: no count then
        result.update(seed.finish(), child_expected=pools)
    return result


def run_isolated(
    *, register: str, pools: int, deadline: float, method: str = "fork", limit: float = 120.0
) -> dict[str, Any]:
    """Run the seed program in its own session, at most `limit` seconds, and
    kill whatever it leaves behind (hung pool workers included).

    Its output goes to a file, not a pipe: hung workers would hold a pipe open.
    Its temporary files (multiprocessing's ``pymp-*`` folder, which a program ended
    by ``os._exit()`` or a kill never removes) go to a folder removed afterwards.
    """
    cmd = [sys.executable, "-m", "forkguard._seed", "--pools", str(pools)]
    cmd += ["--deadline", str(deadline), "--method", method, "--register", register]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
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
    parser.add_argument(
        "--register",
        default="none",
        choices=("none", "queue", "listener"),
        help="what to register with forkguard",
    )
    parser.add_argument("--pools", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds per pool")
    parser.add_argument("--method", default="fork", choices=("fork", "forkserver", "spawn"))
    args = parser.parse_args()
    result = run(
        register=args.register, pools=args.pools, deadline=args.deadline, method=args.method
    )
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
