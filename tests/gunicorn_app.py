"""A WSGI app as people preload it in gunicorn: the seed's logging set-up, made at import.

Logging goes QueueHandler -> queue.Queue -> QueueListener -> FileHandler(os.devnull)
(a real buffered file, never a growing one), and a thread logs without pause, so the
master forks its workers while other threads hold the queue's lock and the file's.
Every request logs a line; a worker leaves after its request quota through sys.exit(),
and so through logging.shutdown(), which flushes the FileHandler.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from logging.handlers import QueueHandler, QueueListener
from typing import Any

log_queue: queue.Queue[Any] = queue.Queue()
handler = logging.FileHandler(os.devnull)
listener = QueueListener(log_queue, handler)
listener.start()
log = logging.getLogger("gunicorn_app")
log.addHandler(QueueHandler(log_queue))
log.setLevel(logging.INFO)
log.propagate = False


def _tick() -> None:
    while True:
        log.info("background work")


threading.Thread(target=_tick, daemon=True, name="ticker").start()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    log.info("request %s", environ.get("PATH_INFO"))
    body = b"ok %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
