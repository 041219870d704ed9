"""A WSGI app as people preload it in gunicorn: the seed's logging set-up, made at import.

Logging goes QueueHandler -> queue.Queue -> QueueListener, whose handlers are a
FileHandler(os.devnull) (a real buffered file, never a growing one) and a counter of
the requests' records.  A thread logs without pause (but for a millisecond when the
listener falls 1,000 records behind, so memory stays bounded), so the master forks its
workers while other threads hold the queue's lock and the file's.  If the test that
started the server dies, the server kills itself.  Every request logs a line
in the worker; a worker leaves after its request quota through sys.exit(), and so
through logging.shutdown(), which flushes the FileHandler.

When the master exits it stops the listener and writes the paths of the requests'
records that reached it to ``$FORKGUARD_TEST_RECORDS`` (JSON).  A worker the master
kills for a timeout (SIGABRT) first writes every thread's stack to
``$FORKGUARD_TEST_STACKS`` (see ``post_worker_init`` in tests/gunicorn_conf.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from logging.handlers import QueueHandler, QueueListener
from typing import Any

MASTER = os.getpid()  # preloaded: imported in the master
requests_logged: list[str] = []  # in the master: what reached the listener


class RequestCounter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("request "):
            requests_logged.append(message.split(" ", 1)[1])


log_queue: queue.Queue[Any] = queue.Queue()
listener = QueueListener(log_queue, logging.FileHandler(os.devnull), RequestCounter())
listener.start()
log = logging.getLogger("gunicorn_app")
log.addHandler(QueueHandler(log_queue))
log.setLevel(logging.INFO)
log.propagate = False


def _report() -> None:
    path = os.environ.get("FORKGUARD_TEST_RECORDS")
    if os.getpid() != MASTER or not path:
        return
    listener.stop()  # everything queued is handled first
    with open(path, "w") as f:
        json.dump(requests_logged, f)


atexit.register(_report)


def _tick() -> None:
    while True:
        log.info("background work")
        if log_queue.qsize() > 1000:  # the listener fell behind: let it catch up
            time.sleep(0.001)


def _watch_parent(parent: int) -> None:
    # Started by a test: if the test's process dies without stopping the server,
    # the server (its whole process group: master and workers) goes too.
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


threading.Thread(target=_tick, daemon=True, name="ticker").start()
threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    log.info("request %s", environ.get("PATH_INFO"))
    body = b"ok %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
