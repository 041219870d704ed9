"""Fork under a deadline: forkguard.testing, under the names the tests use."""

from __future__ import annotations

from forkguard.testing import ChildResult, run_in_child
from forkguard.testing import verdict as wait_status

__all__ = ["STALLED_FILE", "ChildResult", "run_in_child", "wait_status"]

# Script text: a buffered file `f` whose raw write() stops until `go_on` is set, with
# `inside` set once it has started (a thread writing to it holds the file's lock).
STALLED_FILE = """
import io, threading
inside, go_on = threading.Event(), threading.Event()

class Stalled(io.RawIOBase):  # a slow consumer: write() takes its time
    def writable(self):
        return True

    def write(self, b):
        inside.set()
        go_on.wait(30)
        return len(b)

f = io.BufferedWriter(Stalled())
"""
