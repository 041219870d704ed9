"""``forkguard.protect()``: every lock ``threading`` hands out, repaired in forked children.

From the call on, ``threading.Lock`` and ``threading.RLock`` (and so Condition,
Semaphore, BoundedSemaphore, Event, Barrier, ``queue.Queue``, logging handlers and
any library that makes its locks the usual way) make *tracked* locks:

- ``Lock`` is a small Python class around a ``_thread`` lock that records which
  thread acquired it.  Its inner lock is made on first use, so creating one costs
  about what creating a bare lock costs.
- ``RLock`` is a subclass of CPython's C RLock (which records its owner itself).

A tracked lock is listed while some thread holds it or waits for it, and only
then: nothing is kept for a lock nobody holds (so an idle lock costs nothing per
fork and is never kept alive), and a fork's only work is in the child, one step
per listed lock.  In the child every listed lock held by a thread other than the
forking thread (gone in the child) is made free; what the forking thread holds
stays held, a plain ``Lock`` included, since the wrapper knows who acquired it.

At the call, the objects that can be found are enrolled with ``register()``:
queues, conditions, semaphores and events alive now, logging handlers' locks and
streams, and ``sys.stdin``/``stdout``/``stderr``; files opened afterwards through
``open()`` / ``io.open()`` are enrolled as they are opened, and every
``QueueListener`` started from now on (or found running now) is registered, so
what children log reaches it (``_forward.py``).  The child also frees importlib's
module locks (``_import_locks.py``) and ``_strptime``'s lock, which no tracking
can reach.
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import functools
import gc
import io
import os
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable

from forkguard import _cpython_io, _import_locks, _registry

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any

_get_ident = _thread.get_ident
_allocate = _thread.allocate_lock
_CRLock: Any = _thread.RLock

# Locks held or waited for, one entry per holder or waiter (list.append and
# list.remove are each one atomic step under the GIL, and locked internally on a
# free-threaded build).
_active: list[Any] = []
_enter = _active.append
_leave = _active.remove
_make_lock = _allocate()  # guards the lazy creation of a Lock's inner lock


class Lock:
    """A ``threading.Lock`` that remembers who holds it (made by ``protect()``)."""

    __slots__ = ("__weakref__", "_block", "_owner")
    _block: Any
    _owner: int

    def _inner(self) -> Any:
        try:
            return self._block
        except AttributeError:
            pass
        with _make_lock:
            try:
                return self._block
            except AttributeError:
                block = self._block = _allocate()
                return block

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        try:
            block = self._block
        except AttributeError:
            block = self._inner()
        _enter(self)
        try:
            got = block.acquire(blocking, timeout)
        except BaseException:
            _leave(self)
            raise
        if got:
            self._owner = _get_ident()
        else:
            _leave(self)
        return bool(got)

    __enter__ = acquire

    def release(self) -> None:
        try:
            block = self._block
        except AttributeError:
            raise RuntimeError("release unlocked lock") from None
        self._owner = 0
        block.release()
        _leave(self)

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def locked(self) -> bool:
        try:
            return bool(self._block.locked())
        except AttributeError:
            return False

    def _is_owned(self) -> bool:
        return self.locked() and getattr(self, "_owner", 0) == _get_ident()

    def _at_fork_reinit(self) -> None:
        self._inner()._at_fork_reinit()
        self._owner = 0

    def _forkguard_child(self, me: int) -> bool:
        """In a child, for thread `me`: free unless `me` holds it (then True: held)."""
        block = self._block  # a listed lock has been acquired, so it has one
        if block.acquire(False):  # really free (locked() can lag: see below)
            block.release()
            return False
        if not block.locked():
            # Taken at the OS level by a waiter that had not yet got the GIL back to say
            # so (3.10-3.13): release() would refuse, so a fresh lock.
            block._at_fork_reinit()
        elif getattr(self, "_owner", 0) == me:  # unset: never acquired
            return True
        else:
            # Held by a thread that is gone.  Any thread may release a _thread lock,
            # and it is cheaper than _at_fork_reinit(), which allocates a new lock.
            block.release()
        return False

    def __repr__(self) -> str:
        state = "locked" if self.locked() else "unlocked"
        return f"<{state} forkguard-tracked lock object at {id(self):#x}>"


class RLock(_CRLock):  # type: ignore[misc]
    """A ``threading.RLock`` that is listed while held (made by ``protect()``)."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        _enter(self)
        try:
            got = _CRLock.acquire(self, blocking, timeout)
        except BaseException:
            _leave(self)
            raise
        if not got:
            _leave(self)
        return bool(got)

    __enter__ = acquire

    def release(self) -> None:
        _CRLock.release(self)
        _leave(self)

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _forkguard_child(self, me: int) -> bool:
        if self._is_owned():
            return True
        self._at_fork_reinit()
        return False


class Condition(threading.Condition):
    """A ``threading.Condition`` that is listed while some thread waits on it."""

    def wait(self, timeout: float | None = None) -> bool:
        _enter(self)
        try:
            return super().wait(timeout)
        finally:
            _leave(self)

    def _forkguard_child(self, me: int) -> bool:
        # The waiters were other threads (the forking thread is not waiting): gone.
        # Left in the list, a notify() would "wake" one of them instead of a live thread.
        self._waiters.clear()  # type: ignore[attr-defined]
        return False


def _rlock(*args: object, **kwargs: object) -> RLock:
    return RLock(*args, **kwargs)


def _child_repairs() -> None:
    """In the child: free every listed lock the forking thread does not hold, and
    forget the waiters of listed conditions."""
    if not _active:
        return
    # Only the entries seen here are rewritten: a thread started by an earlier child
    # hook may add entries of its own meanwhile, and must find them at its release().
    n = len(_active)
    entries = _active[:n]
    me = _get_ident()
    kept = {id(obj) for obj in dict.fromkeys(entries) if obj._forkguard_child(me)}
    _active[:n] = [obj for obj in entries if id(obj) in kept] if kept else []


# --------------------------------------------------------------------------
# The switch.


class Protection:
    """What ``protect()`` returns: ``undo()`` it (or leave its ``with`` block)."""

    def __init__(self) -> None:
        self.active = False
        self._imports = False  # module import locks repaired in children
        self._saved: list[tuple[Any, str, Any]] = []
        # Weak: a registration ends when its object goes (a closed, dropped file), and a
        # long-running program opens files without end.
        self._enrolled: weakref.WeakSet[_registry.Registration] = weakref.WeakSet()

    def __enter__(self) -> Protection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def undo(self) -> None:
        """Locks made from now on are plain again; enrolled objects are unregistered.

        Tracked locks made meanwhile keep working as locks, no longer repaired."""
        global _current
        with _switch_lock():
            if not self.active:
                return
            self.active = False  # first: an object enrolled from now on is let go
            for owner, name, value in reversed(self._saved):
                if owner is sys.meta_path:  # an import hook that has not fired yet
                    with contextlib.suppress(ValueError):
                        sys.meta_path.remove(value)
                else:
                    setattr(owner, name, value)
            enrolled = list(self._enrolled)
            self._saved.clear()
            self._enrolled.clear()
            _current = None
        for reg in enrolled:
            reg.unregister()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<forkguard.Protection {state}, {len(self._enrolled)} objects enrolled>"

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _enroll(self, obj: object) -> None:
        # Not everything found can be reset (a closed file, a raw one ...): skip those.
        try:
            reg = _REGISTRY().register(obj)
        except (TypeError, ValueError):
            return
        with _switch_lock():
            if self.active:
                self._enrolled.add(reg)
                return
        reg.unregister()  # undone meanwhile (by another thread)


_current: Protection | None = None
_hooked = False
_switch = (os.getpid(), _thread.allocate_lock())


def _switch_lock() -> Any:
    """The lock of protect(), undo() and enrolling: taken by no fork hook, and made
    afresh in a forked child (where another thread may have held the parent's).  It is
    held only for bookkeeping and patching, never while registering, unregistering or
    running foreign code; so it adds no edge to the lock order."""
    global _switch
    if _switch[0] != os.getpid():
        _switch = (os.getpid(), _thread.allocate_lock())
    return _switch[1]


def _REGISTRY() -> _registry.Registry:
    import forkguard

    return forkguard._REGISTRY


# Module-level locks of the standard library made with _thread directly, so never
# tracked; freed in the child when their module is loaded.  Only held inside code
# that cannot fork, so a held one belongs to a vanished thread.
_STDLIB_LOCKS = (("_strptime", "_cache_lock"),)  # time.strptime, datetime.strptime


def _free_stdlib_locks() -> None:
    for module, name in _STDLIB_LOCKS:
        lock = getattr(sys.modules.get(module), name, None)
        if lock is None:
            continue
        if lock.acquire(False):
            lock.release()
        else:
            lock._at_fork_reinit()


def _after_in_child() -> None:
    global _make_lock
    _make_lock = _allocate()  # another thread may have held it
    if _current is not None:
        _child_repairs()
        _free_stdlib_locks()
        if _current._imports:
            _import_locks.repair_in_child(_get_ident())


def protect() -> Protection:
    global _current, _hooked
    if not hasattr(os, "register_at_fork"):  # no fork() here (Windows): nothing to do
        with _switch_lock():
            if _current is None:
                _current = Protection()
                _current.active = True
            return _current
    # Import ctypes and probe the io layout now: both open files, which must not
    # re-enter the open() wrapped below.  (Before the lock: they may take a while.)
    _cpython_io._layout()
    reason = _import_locks.unverified()
    with _switch_lock():  # two threads calling protect() at once get one protection
        if _current is not None:
            return _current
        if not _hooked:
            os.register_at_fork(after_in_child=_after_in_child)
            _hooked = True
        handle = Protection()
        handle._imports = reason is None
        handle._patch(threading, "Lock", Lock)
        handle._patch(threading, "RLock", _rlock)
        handle._patch(threading, "Condition", Condition)
        _wrap_open(handle)
        _wrap_listeners(handle)
        handle.active = True
        _current = handle
    if reason is not None:  # (after the lock: a warning may run a handler of the user's)
        warnings.warn(
            f"forkguard.protect(): module import locks will not be repaired in children "
            f"on this interpreter ({reason})",
            RuntimeWarning,
            stacklevel=2,
        )
    for obj in _findable():
        handle._enroll(obj)
    return handle


def _wrap_listeners(handle: Protection) -> None:
    """QueueListeners started from now on are registered (their queue forwarded from
    children); logging.handlers is patched now or when it is first imported."""
    module = sys.modules.get("logging.handlers")
    if module is not None:
        _wrap_listener_start(handle, module)
        return
    finder = _OnImport("logging.handlers", lambda m: _wrap_listener_start(handle, m))
    sys.meta_path.insert(0, finder)
    handle._saved.append((sys.meta_path, "remove", finder))  # undo() takes it out


def _wrap_listener_start(handle: Protection, module: Any) -> None:
    original = module.QueueListener.start

    @functools.wraps(original)
    def start(self: Any) -> None:
        original(self)
        if handle.active:
            handle._enroll(self)

    handle._patch(module.QueueListener, "start", start)


class _OnImport:
    """A meta path finder that calls `then(module)` once `name` has been imported."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.name:
            return None
        import importlib.machinery

        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            self.then(module)

        loader.exec_module = exec_module
        return spec


def _wrap_open(handle: Protection) -> None:
    original: Callable[..., Any] = io.open

    @functools.wraps(original)
    def open(*args: Any, **kwargs: Any) -> Any:
        f = original(*args, **kwargs)
        if handle.active and isinstance(f, (io.TextIOWrapper, io.BufferedIOBase)):
            handle._enroll(f)
        return f

    handle._patch(io, "open", open)
    handle._patch(builtins, "open", open)


_FINDABLE = (queue.Queue, threading.Condition, threading.Semaphore, threading.Event)


def _findable() -> list[object]:
    """Objects alive now whose locks protect() can no longer wrap."""
    found: list[object] = [f for f in (sys.stdin, sys.stdout, sys.stderr) if f is not None]
    # Not imported here: no logging, no handlers (and no logging at-fork hook to pay for).
    logging = sys.modules.get("logging")
    handler = logging.Handler if logging is not None else ()
    handlers = sys.modules.get("logging.handlers")
    listener = handlers.QueueListener if handlers is not None else ()
    for obj in gc.get_objects():
        if isinstance(obj, _FINDABLE):
            found.append(obj)
        elif isinstance(obj, listener):
            if obj._thread is not None:  # started: its consumer lives here
                found.append(obj)
        elif isinstance(obj, handler):
            if obj.lock is not None:
                found.append(obj.lock)
            stream = getattr(obj, "stream", None)
            if stream is not None:
                found.append(stream)
    return found
