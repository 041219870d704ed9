"""What the whole-program scenario scripts share: forking the children (in the
script) and running a script and collecting what arrived (in the tests).

A script prints its summary as one JSON line on stderr, and its children write
their marks ("done K") to the fd given with ``--results``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

CHILD_ALARM = 2


def fork_children(
    forks: int,
    child: Callable[[int], object],
    before: Callable[[int], object] | None = None,
) -> dict[str, int]:
    """Fork `forks` children, a little apart, each running ``child(k)`` under a
    2 s alarm (and ``before(k)`` in the parent just before each fork): how many hung
    (the alarm) and how many failed (raised, or died)."""
    warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded ... fork()"
    pids = []
    for k in range(forks):
        time.sleep(0.003)
        if before is not None:
            before(k)
        pid = os.fork()
        if pid == 0:
            signal.alarm(CHILD_ALARM)
            status = 1
            try:
                child(k)
                status = 0
            except BaseException as exc:  # counted as failed; say why without stderr's lock
                os.write(2, b"child %d: %r\n" % (k, exc))
            finally:
                os._exit(status)
        pids.append(pid)
    hung = failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            hung += os.WTERMSIG(status) == signal.SIGALRM
            failed += os.WTERMSIG(status) != signal.SIGALRM
        else:
            failed += os.WEXITSTATUS(status) != 0
    return {"forks": forks, "hung": hung, "failed": failed}


def run_script(script: str, *args: str) -> tuple[dict[str, Any], str, str]:
    """Run `script` with `args` and ``--results FD``: its summary, its stdout, and
    the marks its children wrote.  PYTHONUNBUFFERED is dropped: stdout must be
    block-buffered, as under a process manager."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, script, *args, "--results", str(write_end)],
            capture_output=True,
            env=env,
            timeout=120,
            pass_fds=(write_end,),
            check=False,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as marks:
            done = marks.read().decode()
    finally:
        with contextlib.suppress(OSError):  # closed above unless run() failed
            os.close(write_end)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    summary: dict[str, Any] = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    return summary, proc.stdout.decode(errors="replace"), done
