"""gunicorn settings for tests/test_gunicorn.py.

- A worker killed for a timeout says where it was: the master sends SIGABRT to a
  worker that stopped answering, and this handler writes every thread's stack to
  ``$FORKGUARD_TEST_STACKS`` before gunicorn's own handler runs.
- No control socket (gunicorn 24+): its default path is shared by every gunicorn on
  the machine, and test runs side by side would take it from each other.  Older
  versions ignore the setting.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from typing import Any

control_socket_disable = True

_files: list[Any] = []  # kept open while the worker lives


def post_worker_init(worker: Any) -> None:
    path = os.environ.get("FORKGUARD_TEST_STACKS")
    if not path:
        return
    _files.append(open(path, "a"))  # noqa: SIM115
    gunicorns = signal.getsignal(signal.SIGABRT)

    def dump_then_abort(signum: int, frame: Any) -> None:
        faulthandler.dump_traceback(_files[-1], all_threads=True)
        _files[-1].flush()
        if callable(gunicorns):
            gunicorns(signum, frame)

    signal.signal(signal.SIGABRT, dump_then_abort)
