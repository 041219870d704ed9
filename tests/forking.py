"""Fork under a deadline (forkguard.testing), and the same words for C-made children."""

from __future__ import annotations

import os
import signal

from forkguard.testing import ChildResult, run_in_child

__all__ = ["ChildResult", "run_in_child", "wait_status"]


def wait_status(status: int) -> str:
    """A waitpid() status from C code, in the same words as ChildResult.status."""
    if os.WIFEXITED(status):
        return "ok" if os.WEXITSTATUS(status) == 0 else "failed"
    if os.WTERMSIG(status) in (signal.SIGALRM, signal.SIGKILL):
        return "hung"
    return "crashed"
