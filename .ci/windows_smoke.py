"""Windows (no fork): forkguard imports, and its public calls accept what they accept
elsewhere and do nothing else.  Run by the workflow's Windows job; exits non-zero on
any surprise."""

from __future__ import annotations

import logging.handlers
import queue
import threading

import forkguard

assert forkguard.__version__, "no version"
# (kept in variables: forkguard holds what it registers weakly)
lock, rlock, q = threading.Lock(), threading.RLock(), queue.Queue()
listener = logging.handlers.QueueListener(q)
regs = [
    forkguard.register(lock),
    forkguard.register(q),
    forkguard.register(rlock, policy="hold"),
    forkguard.register(listener),
]
assert all(r.active for r in regs), regs
try:
    forkguard.register(1.5)
except TypeError as exc:
    print(f"refused as it should be: {exc}")
else:
    raise AssertionError("register(1.5) was accepted")
assert all(r.unregister() for r in regs)
protection = forkguard.protect()
threading.Lock()  # made under protect(): nothing to do without fork
protection.undo()
watching = forkguard.watch()
watching.stop()
print(forkguard.audit())
print(f"forkguard {forkguard.__version__}: the no-fork path works")
