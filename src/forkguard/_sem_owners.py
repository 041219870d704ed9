"""Which threads hold units of a registered ``threading.Semaphore``.

A semaphore records only its count, so after a fork nothing says how many of the
missing units belong to the forking thread (which will release them in the child)
and how many to threads that vanished (which never will).  While a semaphore is
registered, forkguard gives the object a subclass of its own class (same layout,
same name; the object keeps its identity, so whatever refers to it keeps working)
whose acquire/release also count units per thread, under the semaphore's own lock.
The child then gets the registered count minus what the forking thread holds.

Units taken before registration are not counted: the registered count (by default
the count at registration) already leaves them out.  A unit released by a thread
that holds none (a semaphore used as a signal) is taken off another holder's count,
so the total stays exact; which thread it is taken from is then a guess.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_UNITS = "_forkguard_units"  # instance attribute: {thread ident: units held}
_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    sub = _SUBCLASSES.get(base)
    if sub is not None:
        return sub

    def acquire(self: Any, blocking: bool = True, timeout: float | None = None) -> bool:
        ok = bool(base.acquire(self, blocking, timeout))  # type: ignore[attr-defined]
        if ok:
            with self._cond:
                # (None: untracked by another thread since this call began)
                units = getattr(self, _UNITS, None)
                if units is not None:
                    me = threading.get_ident()
                    units[me] = units.get(me, 0) + 1
        return ok

    def release(self: Any, n: int = 1) -> None:
        base.release(self, n)  # type: ignore[attr-defined]
        with self._cond:
            units = getattr(self, _UNITS, None)
            if units is None:  # untracked by another thread since this call began
                return
            holders = [threading.get_ident(), *units]  # this thread's units first
            for ident in holders:
                if n == 0:
                    break
                take = min(n, units.get(ident, 0))
                n -= take
                if take:
                    units[ident] -= take
                    if not units[ident]:
                        del units[ident]

    namespace = {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "acquire": acquire,
        "__enter__": acquire,
        "release": release,
        "_forkguard_base": base,
    }
    # (setdefault: two threads making it at once end up with the same class)
    return _SUBCLASSES.setdefault(base, type(base.__name__, (base,), namespace))


def track(sem: Any) -> None:
    """Start counting `sem`'s units per thread (idempotent)."""
    if hasattr(type(sem), "_forkguard_base"):
        return
    with sem._cond:
        setattr(sem, _UNITS, {})
        sem.__class__ = _subclass(type(sem))


def untrack(sem: Any) -> None:
    base = getattr(type(sem), "_forkguard_base", None)
    if base is None:
        return
    with sem._cond:
        sem.__class__ = base
        sem.__dict__.pop(_UNITS, None)


def keep_only_this_thread(sem: Any, give_back: int = 0) -> int:
    """In a child: forget the units of threads that vanished, and `give_back` of this
    thread's (a hold's); return how many this thread still holds."""
    units = getattr(sem, _UNITS, None)
    if units is None:
        return 0
    mine = max(0, int(units.get(threading.get_ident(), 0)) - give_back)
    units.clear()
    if mine:
        units[threading.get_ident()] = mine
    return mine


def only_this_thread_holds(sem: Any) -> bool:
    """True if every counted unit is this thread's (and it holds some)."""
    units = getattr(sem, _UNITS, {})
    return bool(units) and set(units) == {threading.get_ident()}
