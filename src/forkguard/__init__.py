"""forkguard: fork safety for the locks CPython cannot repair.

When a process forks while another thread holds a lock, the child inherits the
lock held and no thread will ever release it.  CPython repairs its own locks;
forkguard repairs the rest: ``queue.Queue``'s mutex, your own locks, and locks
owned by C extensions::

    import forkguard
    forkguard.register(log_queue)          # reset in every forked child

See the README for policies ("reset" and "hold"), C objects, and limits.
"""

from __future__ import annotations

import os

from forkguard import _backend, _fork_phases, _registry
from forkguard._registry import HoldTimeoutWarning, Registration
from forkguard._targets import DEFAULT_TIMEOUT

# typing, and the modules behind protect() and forward(), are imported on first use:
# `import forkguard` stays cheap (docs/design.md, "Import").
TYPE_CHECKING = False
if TYPE_CHECKING:
    import queue
    from typing import Any, Literal

    from forkguard._audit import AuditReport
    from forkguard._forward import Forwarding
    from forkguard._protect import Protection
    from forkguard._registry import Policy
    from forkguard._watch import Watch

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_TIMEOUT",
    "HANG_EXIT_STATUS",
    "AuditReport",
    "Forwarding",
    "HoldTimeoutWarning",
    "Policy",
    "Protection",
    "Registration",
    "Watch",
    "at_fork",
    "audit",
    "forward",
    "get_include",
    "protect",
    "register",
    "registrations",
    "watch",
]

# Its fork hooks are installed as registrations need them (_fork_phases.py).
_REGISTRY = _registry.Registry(_backend.load())


def register(
    obj: object,
    *,
    policy: Policy = "reset",
    name: str | None = None,
    timeout: float | None = None,
    kind: Literal["pthread_mutex", "pthread_rwlock", "sem"] | None = None,
    value: int | None = None,
    mutex_type: Literal["normal", "recursive", "errorcheck", "adaptive"] | None = None,
) -> Registration:
    """Make `obj` usable in every child forked from now on.

    obj
        A ``threading`` Lock, RLock, Condition, Semaphore, BoundedSemaphore or
        Event; a ``queue.Queue`` (or subclass); a cffi pointer to a
        ``pthread_mutex_t``, ``pthread_rwlock_t`` or ``sem_t`` (from any FFI);
        an integer address of one of those with `kind`; or any object with a
        ``__forkguard_reset__()`` method.  Python objects are held weakly: the
        registration ends when the object is collected.  C objects stay
        registered until ``unregister()``; a cffi pointer is kept alive until then.
    policy
        ``"reset"`` (default): the child gets the object unlocked, with no
        waiters; the data it protects may be half-updated.  ``"hold"``: the
        object is acquired before the fork and released on both sides, so the
        child sees consistent data; a fork waits up to `timeout` for it.
    name
        For ``repr`` and diagnostics.
    timeout
        Seconds a hold may wait (default ``DEFAULT_TIMEOUT``); past it the fork
        goes ahead, the object is reset in that child, and a
        ``HoldTimeoutWarning`` is issued.
    kind
        What an integer address (or ``void *``) points to.
    value
        Semaphores: the count the child gets back (default: the count now).
    mutex_type
        C mutexes: ``"normal"``, ``"recursive"``, ``"errorcheck"`` or
        ``"adaptive"``.  Read from the mutex on Linux (checked if given);
        required where the platform does not record it (macOS).

    Registering an object that is already registered with the same policy,
    timeout and value returns the existing registration; with different
    ones it raises ``ValueError``.  Bad arguments raise ``TypeError`` or
    ``ValueError`` and leave the registry unchanged.
    """
    return _REGISTRY.register(obj, policy, name, timeout, kind, value, mutex_type)


def protect() -> Protection:
    """Repair every lock the program makes, in every forked child: one call for applications.

    From the call on, ``threading.Lock``, ``RLock`` and ``Condition`` make tracked
    objects, so every Condition, Semaphore, Event, Barrier, ``queue.Queue``, logging
    handler and third-party lock made the usual way is covered; files opened through
    ``open()`` are registered as they are opened.  Queues, conditions, semaphores,
    events, logging handlers (their locks and streams) and ``sys.stdin``/``stdout``/
    ``stderr`` that exist already are registered now.

    In each forked child, a tracked lock that a thread other than the forking thread
    held at the fork is free; what the forking thread holds stays held (a plain
    ``Lock`` too: a tracked Lock records who acquired it).  Only locks held (or
    waited for) at the fork cost anything per fork.  The child also gets importlib's
    module locks and ``_strptime``'s lock back free (a module another thread was
    importing is imported afresh), and every ``QueueListener`` found now or started
    later is registered, so children's records reach it.

    Libraries should use ``register()`` instead.  Calling ``protect()`` again returns
    the same handle; ``handle.undo()`` (or leaving ``with forkguard.protect():``)
    switches it off.  Run a whole program protected with
    ``python -m forkguard run script.py`` (see the README).
    """
    from forkguard import _protect

    return _protect.protect()


def forward(q: queue.Queue[Any], *, name: str | None = None) -> Forwarding:
    """Carry what forked children put on `q` to this process's `q`, for a queue
    whose consumer thread lives here (a ``QueueListener`` is registered with
    ``register(listener)`` instead).

    In every child forked from now on, ``q.put()`` pickles the item and sends it
    here before returning, so nothing is lost when the child exits, however it
    exits; a thread here puts it on `q`.  The child's copy of `q` starts empty:
    items queued here at the fork stay here, handled once.  `q` is also
    registered (its lock reset in the child).  ``unregister()`` the result to stop.
    """
    from forkguard import _forward

    return _forward.forward(q, name=name)


def at_fork(
    before: _registry.Hook | None = None,
    after_in_parent: _registry.Hook | None = None,
    after_in_child: _registry.Hook | None = None,
    *,
    name: str | None = None,
) -> Registration:
    """Like ``os.register_at_fork``, but the hooks can be unregistered.

    ``before`` hooks run newest first, before forkguard takes its holds;
    ``after_in_*`` hooks run oldest first, after registered objects are
    restored.  An exception in a hook does not stop the others; it is
    reported through ``sys.unraisablehook``.  The hooks are held strongly.
    """
    return _REGISTRY.at_fork(before, after_in_parent, after_in_child, name=name)


def audit() -> AuditReport:
    """What would hang a child forked now, and the line that fixes each.

    Lists every held lock forkguard can see (registered objects, C mutexes included,
    the locks ``protect()`` tracks, CPython's buffered files, and the locks of the queues,
    conditions, semaphores, events and logging handlers alive), with the thread that
    holds it where the lock records one and that thread's stack; every thread,
    native ones included (Linux); and loaded native libraries known to misbehave
    after fork, each with what to do and a source.  Reads only; changes nothing.
    ``print(report)`` for a terminal, ``report.as_dict()`` for JSON.
    """
    from forkguard import _audit

    return _audit.audit()


HANG_EXIT_STATUS = 86  # the exit status of a child ended by watch(action="exit")


def watch(timeout: float = 5.0, action: Literal["report", "exit"] = "report") -> Watch:
    """From now on, a forked child stuck for `timeout` seconds on a lock that was held
    when it was forked writes one report to its stderr: its pid, where it is stuck,
    the lock, the parent's thread that held it at the fork (with that thread's stack
    then), and the fix.  ``action="exit"`` then ends it with exit status
    ``HANG_EXIT_STATUS``.  Children that do not hang are left as they were.

    Before each fork the parent tries the locks ``audit()`` looks at; only a child
    forked while one was taken (or while threads ``threading`` does not know were
    alive) runs a watchdog thread.
    Calling it again replaces the settings; ``handle.stop()`` switches it off.
    ``python -m forkguard doctor`` runs a whole program this way.
    """
    from forkguard import _watch

    return _watch.watch(timeout, action)


def registrations() -> list[Registration]:
    """A snapshot of the active registrations, oldest first."""
    return _REGISTRY.registrations()


def get_include() -> str:
    """The folder holding ``forkguard.h``, to compile extensions against forkguard's
    C API (see docs/c-api.md); Cython declarations come with the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def __getattr__(name: str) -> object:
    if name == "Policy":  # typing is imported only for it
        return _registry.Policy
    if name == "Protection":
        from forkguard._protect import Protection

        return Protection
    if name == "AuditReport":
        from forkguard._audit import AuditReport

        return AuditReport
    if name == "Watch":
        from forkguard._watch import Watch

        return Watch
    if name == "Forwarding":
        from forkguard._forward import Forwarding

        return Forwarding
    # The C API, made on first use: `_C_API` is the capsule forkguard_import()
    # imports; `_C_API_ADDRESS` is the table's address for cffi and ctypes users.
    if name in ("_C_API", "_C_API_ADDRESS") and isinstance(
        _REGISTRY.backend, _backend.NativeBackend
    ):
        value = _REGISTRY.backend.capsule() if name == "_C_API" else _REGISTRY.backend.api_address()
        # C code may register holds from now on: their timeouts are reported after forks.
        _REGISTRY.need_fork_phases(_fork_phases.C_HOLDS)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forkguard' has no attribute {name!r}")
