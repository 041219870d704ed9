"""Fork under a deadline: a child that hangs is killed and reported, never waited for."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ChildResult:
    status: str  # "ok", "failed" (raised or returned False), "hung", "crashed"
    detail: str = ""

    def __bool__(self) -> bool:
        return self.status == "ok"


def run_in_child(check: Callable[[], object], *, deadline: float = 20.0) -> ChildResult:
    """Fork; in the child run `check()` with an alarm `deadline` seconds away.

    The child is "ok" when `check` returns anything but False, "failed" when it
    returns False or raises (the traceback is in `detail`), "hung" when the alarm
    (or, as a fallback, the parent) killed it, "crashed" on any other signal.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test runner
        code = 3
        try:
            os.close(read_end)
            # SIGALRM's default action kills the process even while a thread
            # is blocked inside a C lock call.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, deadline)
            result = check()
            code = 1 if result is False else 0
            if code:
                os.write(write_end, b"check returned False")
        except BaseException:
            os.write(write_end, traceback.format_exc().encode()[-4000:])
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    give_up = time.monotonic() + deadline + 10.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > give_up:  # the alarm did not fire: kill it ourselves
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    with os.fdopen(read_end, "rb") as pipe:
        detail = pipe.read().decode(errors="replace")
    if os.WIFEXITED(status):
        return ChildResult("ok" if os.WEXITSTATUS(status) == 0 else "failed", detail)
    sig = os.WTERMSIG(status)
    if sig in (signal.SIGALRM, signal.SIGKILL):
        return ChildResult("hung", f"killed by {signal.Signals(sig).name} after {deadline} s")
    return ChildResult("crashed", f"killed by {signal.Signals(sig).name}\n{detail}")


def wait_status(status: int) -> str:
    """A waitpid() status from C code, in the same words as ChildResult.status."""
    if os.WIFEXITED(status):
        return "ok" if os.WEXITSTATUS(status) == 0 else "failed"
    if os.WTERMSIG(status) in (signal.SIGALRM, signal.SIGKILL):
        return "hung"
    return "crashed"
