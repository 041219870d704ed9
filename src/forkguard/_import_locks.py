"""Module import locks: a child forked while another thread imports a module.

importlib gives each module being imported a ``_ModuleLock``
(``importlib._bootstrap._module_locks``), held by the importing thread for the
whole of the module's top-level code.  CPython re-initialises its global import
lock after a fork, not these: a child forked during another thread's import
waits for ever on its own ``import`` of that module (or gets it half-initialised).

Under ``protect()`` the child repairs them: for every module lock owned by a
thread other than the forking one, its two internal locks are re-initialised,
its owner, count and waiters are cleared, and the half-imported module is taken
out of ``sys.modules``, so that the child's own import runs the module afresh, as
a spawned child would.  A lock the forking thread owns (a fork from a module's
top-level code) stays as it is; only its waiters, other threads, are forgotten.

These are importlib's private structures, so their shape is checked on the
running interpreter before use (``unverified()``): a probe lock is acquired and
released and must behave as described.  Where it does not, protect() says so
and leaves import locks alone.
"""

from __future__ import annotations

import sys
import threading

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any


def _bootstrap() -> Any:
    # The frozen module CPython imports with: "importlib._bootstrap" is the same module,
    # but listed only once something has imported the importlib package.
    return sys.modules.get("_frozen_importlib") or sys.modules.get("importlib._bootstrap")


def _empty(counter: object) -> object:
    """A cleared count or waiters field: 0 (3.10, 3.11) or [] (3.12+)."""
    return [] if isinstance(counter, list) else 0


def unverified() -> str | None:
    """Why the module locks cannot be repaired here; None if they can."""
    bootstrap = _bootstrap()
    locks = getattr(bootstrap, "_module_locks", None)
    cls = getattr(bootstrap, "_ModuleLock", None)
    if not isinstance(locks, dict) or not isinstance(cls, type):
        return "importlib._bootstrap has no _module_locks dict and _ModuleLock class"
    try:
        probe = cls("forkguard probe")
        fields = [probe.lock, probe.wakeup]
        if not all(callable(getattr(f, "_at_fork_reinit", None)) for f in fields):
            return "a module lock's internal locks cannot be re-initialised"
        empty = (probe.owner, probe.count, probe.waiters)
        if empty not in ((None, 0, 0), (None, [], [])):
            return f"a new module lock has owner, count and waiters {empty!r}"
        probe.acquire()
        count = probe.count
        held = (probe.owner, count.copy() if isinstance(count, list) else count)
        probe.release()
        if held not in ((threading.get_ident(), 1), (threading.get_ident(), [True])):
            return f"an acquired module lock has owner and count {held!r}"
        if (probe.owner, probe.count) != empty[:2]:
            return "a released module lock does not return to its empty state"
    except Exception as exc:  # any surprise means "not verified"
        return f"{type(exc).__name__}: {exc}"
    return None


def _free(lock: Any) -> None:
    # Held by a thread the child does not have: re-initialise it.  (A lock this
    # thread holds again is released straight away.)
    if lock.acquire(False):
        lock.release()
    else:
        lock._at_fork_reinit()


def repair_in_child(me: int) -> None:
    bootstrap = _bootstrap()
    cls = bootstrap._ModuleLock
    for ref in list(bootstrap._module_locks.values()):
        module_lock = ref()
        if type(module_lock) is not cls:
            continue
        _free(module_lock.lock)
        if module_lock.waiters:
            module_lock.waiters = _empty(module_lock.waiters)
            module_lock.wakeup._at_fork_reinit()
        owner = module_lock.owner
        if owner is None or owner == me:
            continue
        module_lock.owner = None
        module_lock.count = _empty(module_lock.count)
        module_lock.wakeup._at_fork_reinit()
        module = sys.modules.get(module_lock.name)
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            del sys.modules[module_lock.name]
