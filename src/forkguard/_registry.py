"""The Python registry: registrations, policies, weak lifetimes, and the os.fork() hooks.

Fork timeline for ``os.fork()`` (and everything built on it), per process:

before            user ``at_fork`` before-hooks (newest first); Python holds taken in
                  registration order.  Nothing here touches the C registry.
fork()            the C core's pthread_atfork handlers: C prepare hooks, C holds, fork,
                  C objects restored in the child, C parent/child hooks.
after_in_child    Python objects reset (or released, if held); user after-hooks.
after_in_parent   Python holds released; warnings and errors reported; user after-hooks.

None of the fork hooks takes the registry's lock, and none waits for the C
registry: a thread that registers may hold the GIL or any lock an earlier
before-hook needs (docs/design.md, "Lock order").  Each phase is installed with
``os.register_at_fork`` when the first registration that needs it arrives
(``_fork_phases.py``): a process that registers nothing in Python pays no
Python at its forks.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable

from forkguard import _backend, _fork_phases, _targets

TYPE_CHECKING = False  # typing is not imported at run time: `import forkguard` stays cheap
if TYPE_CHECKING:
    from typing import Any, Literal, TypeAlias

    Policy: TypeAlias = Literal["reset", "hold"]
    Hook: TypeAlias = Callable[[], object]


def __getattr__(name: str) -> object:
    if name == "Policy":  # the public alias, made when someone asks for it
        from typing import Literal

        return Literal["reset", "hold"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HoldTimeoutWarning(RuntimeWarning):
    """A hold-policy object could not be acquired within its timeout before a fork.

    That fork went ahead and the child got the object reset instead, so the data
    it protects may be inconsistent in that child.
    """


class Registration:
    """One registered object (or set of at-fork hooks); ``unregister()`` ends it.

    Also a context manager that unregisters on exit.
    """

    __slots__ = (
        "__weakref__",
        "_address",
        "_buckets",
        "_ended",
        "_handle",
        "_hooks",
        "_keepalive",
        "_label",
        "_mutex_type",
        "_name",
        "_policy",
        "_pykind",
        "_ref",
        "_registry",
        "_timeout",
        "_timeouts",
        "_token",
        "_value",
    )

    def __init__(self, registry: Registry, token: int, name: str | None, label: str) -> None:
        self._registry = registry
        self._token = token
        self._name = name
        self._label = label
        self._ended: str | None = None
        self._policy: Policy | None = None
        self._timeout: float | None = None
        self._pykind: _targets.PyKind | None = None
        self._ref: weakref.ref[Any] | _targets.StrongReference | None = None
        self._value: int | None = None
        self._handle: int | None = None
        self._address: int | None = None
        self._keepalive: object = None
        self._hooks: tuple[Hook | None, Hook | None, Hook | None] | None = None
        # Python hold policy: the forks that found it timing out; C objects: the
        # C core's count when a warning last named it.
        self._timeouts = 0
        self._buckets: tuple[dict[int, Any], ...] = ()  # the fork hooks' lists it is on
        self._mutex_type: str | None = ""  # C mutexes: None until read from C

    @property
    def name(self) -> str:
        """The name given at registration, or one made from the target."""
        if self._name is None:
            self._name = f"{self._label} at {self._address or 0:#x}"
        return self._name

    @property
    def policy(self) -> Policy | None:
        """``"reset"`` or ``"hold"``; None for at-fork hooks."""
        return self._policy

    @property
    def timeout(self) -> float | None:
        """Seconds a hold waits before falling back to reset; None for at-fork hooks."""
        return self._timeout

    @property
    def kind(self) -> str:
        """What is registered, e.g. ``"queue.Queue"`` or ``"pthread_mutex_t (recursive)"``."""
        backend = self._registry.backend
        if self._mutex_type is None and self._handle is not None:  # read once from C
            info = backend.info(self._handle)
            self._mutex_type = (info.mutex_type if info is not None else None) or ""
        if not self._mutex_type:
            return self._label
        now = self._mutex_type
        if self._address and backend.can_read_mutex_type and self.active:
            # The mutex may have been destroyed and initialised again as another
            # type; the child gets it back as what it is now.
            try:
                now = backend.mutex_type(self._address)  # type: ignore[union-attr]
            except (TypeError, ValueError) as exc:
                now = f"now unrestorable: {exc}"
        if now != self._mutex_type:
            return f"{self._label} ({now}; registered as {self._mutex_type})"
        return f"{self._label} ({now})"

    @property
    def _active(self) -> bool:
        """Not ended here (a C object's owner may have ended it through the C API)."""
        return self._ended is None

    @property
    def active(self) -> bool:
        """True until unregistered, or until the (weakly held) object is collected."""
        if self._active and self._handle is not None:
            return self._registry.backend.is_active(self._handle)
        return self._active

    @property
    def target(self) -> object:
        """The registered object: a Python object (None once collected), the cffi
        pointer or integer address of a C object, or the tuple of hooks."""
        if self._hooks is not None:
            return self._hooks
        if self._ref is not None:
            return self._ref()
        return self._keepalive if self._keepalive is not None else self._address

    @property
    def hold_timeouts(self) -> int:
        """How many forks found this object's hold timing out (it was reset instead)."""
        if self._handle is not None:
            info = self._registry.backend.info(self._handle)
            return info.hold_timeouts if info is not None else self._timeouts
        return self._timeouts

    def unregister(self) -> bool:
        """End this registration: True the first time, False if it had already ended
        (for a C registration, also when its owner ended it through the C API)."""
        return self._registry.unregister(self)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unregister()

    def __repr__(self) -> str:
        if self._hooks is not None:
            what = "at_fork hooks"
        elif self._pykind is not None:
            obj = self._ref() if self._ref is not None else None
            gone = "(gone)" if self._pykind.weak else "(released)"
            what = f"{self._label} at {id(obj):#x}" if obj is not None else f"{self._label} {gone}"
        else:
            what = f"{self.kind} at {self._address:#x}"
        policy = ""
        if self._policy == "hold":
            policy = f", policy='hold' (timeout {self._timeout:g} s)"
        elif self._policy is not None:
            policy = ", policy='reset'"
        state = "active" if self._active else f"ended: {self._ended}"
        return f"<forkguard.Registration {self.name!r}: {what}{policy}, {state}>"


class _ForkState:
    """What the before-hook did for one fork, for the after-hooks to undo."""

    __slots__ = ("c_timeouts", "errors", "held", "timed_out")

    def __init__(self) -> None:
        self.held: list[tuple[Registration, object]] = []
        self.timed_out: list[Registration] = []
        self.errors: list[BaseException] = []
        self.c_timeouts = 0


class Registry:
    """All registrations of one process (a private instance serves the tests)."""

    def __init__(self, backend: _backend.NativeBackend | _backend.NoForkBackend) -> None:
        self.backend = backend
        # The lock of registering, as (pid, lock): see _locked().
        self._lock_entry: tuple[int, threading.Lock] = (os.getpid(), threading.Lock())
        self._child_locks: dict[int, tuple[int, threading.Lock]] = {}
        # Everything, for listing; the fork hooks only walk the buckets below,
        # so C objects (restored in C) and plain locks cost no Python per fork.
        self._objects: dict[int, Registration] = {}  # Python objects, in registration order
        self._c_objects: dict[int, Registration] = {}  # C objects, by handle
        self._hooks: dict[int, Registration] = {}  # at_fork hooks
        self._holds: dict[int, Registration] = {}  # Python objects, policy "hold"
        self._resets: dict[int, Registration] = {}  # Python objects, policy "reset"
        # "reset" objects whose whole reset is a threading Lock or RLock re-initialised
        # and Conditions' waiter lists emptied (Lock, RLock, Condition, Queue): done
        # in plain loops inside the one child call, no Python call per object.
        self._plain_locks: dict[int, weakref.ref[Any]] = {}
        self._plain_rlocks: dict[int, weakref.ref[Any]] = {}
        self._waiters: dict[int, tuple[Any, ...]] = {}
        # Once there are many of them, the child walks those three in C (backend's
        # reset_plain(): a Python loop writes each weak reference it walks, a page
        # fault per page of them).  Everything it needs, in one tuple it finds by id().
        self._plain = (
            self._plain_locks,
            self._plain_rlocks,
            self._waiters,
            _LOCK_REINIT,
            _RLOCK_REINIT,
            _RLOCK_IS_OWNED,
            collections.deque,
        )
        self._plain_id = id(self._plain)
        self._reset_plain: Callable[[int], int] | None = None
        self._reset_plain_looked_up = False  # looked up once per process, when needed
        self._by_id: dict[int, Registration] = {}  # Python objects, by id()
        self._tokens = itertools.count(1)
        # The weak references' one callback (a bound method per registration would
        # cost every fork's page tables its size), and the few tuples of buckets that
        # registrations share (one each would too).
        self._on_collected = self._collected
        self._bucket_sets: dict[tuple[int, ...], tuple[dict[int, Any], ...]] = {}
        # Forks in progress, by forking thread: a stack, since a before-hook may fork.
        self._forks: dict[int, list[_ForkState]] = {}
        self._phases = _fork_phases.Phases(self)

    # ---------------------------------------------------------------- registering

    def _locked(self) -> threading.Lock:
        """The registry's lock.  A forked child makes its own on first use, since a
        thread that no longer exists may have held the parent's at the fork.  No fork
        hook repairs it: a process that registers only C objects runs no Python at a
        fork.  dict.setdefault is atomic under the GIL, so threads of a child racing
        to its first registration get the same lock."""
        pid, lock = self._lock_entry
        if pid != os.getpid():
            pid = os.getpid()
            entry = self._child_locks.setdefault(pid, (pid, threading.Lock()))
            self._lock_entry, lock = entry, entry[1]
            # Earlier generations' entries go: a later descendant could reuse their pid.
            for other in list(self._child_locks):
                if other != pid:
                    self._child_locks.pop(other, None)
        return lock

    def register(  # positional too: forkguard.register() passes them on that way
        self,
        obj: object,
        policy: object = "reset",
        name: object = None,
        timeout: object = None,
        kind: object = None,
        value: object = None,
        mutex_type: object = None,
    ) -> Registration:
        hold = _targets.check_policy(policy)
        if timeout is None:
            seconds = _targets.DEFAULT_TIMEOUT
        else:
            seconds = _targets.check_timeout(timeout, self.backend.timeout_max)
        reg_name = None if name is None else _targets.check_name(name)
        if kind is None and value is None and mutex_type is None:
            # The commonest C registration, a cffi pointer to a mutex, in a few steps:
            # extensions register and unregister at high rates (bench_register.py).
            address = _targets.cffi_mutex_address(obj)
            if address is not None:
                return self._register_c(
                    _backend.MUTEX, address, obj, None, None, hold, seconds, reg_name
                )
        target = _targets.classify(obj, kind, value, mutex_type, self.backend)
        if isinstance(target, _targets.CTarget):
            return self._register_c(
                target.kind,
                target.address,
                target.keepalive,
                target.mutex_type,
                target.value,
                hold,
                seconds,
                reg_name,
            )
        return self._register_python(target, hold, seconds, reg_name)

    def _register_c(  # positional: this is the high-rate path
        self,
        kind: str,
        address: int,
        keepalive: object,
        mutex_type: str | None,
        value: int | None,
        hold: bool,
        seconds: float,
        reg_name: str | None,
    ) -> Registration:
        # Without the registry's lock: the C core decides which of two racing
        # registrations of one object is made, and the Python side of a C object is
        # single dict operations on _c_objects, keyed by its (never reused) handle.
        if hold and not self._phases.installed & _fork_phases.C_HOLDS:
            self.need_fork_phases(_fork_phases.C_HOLDS)
        policy = _backend.POLICY_HOLD if hold else _backend.POLICY_RESET
        while True:
            handle = self.backend.register(
                kind, address, policy, seconds, reg_name, mutex_type, value or 0
            )
            if handle:
                break
            existing = self._registered_c(address, keepalive)
            if existing is not None:
                return self._same_registration(existing, value, hold, seconds)
            # (Unregistered meanwhile: register it.)
        try:
            reg = self._c_registration(
                handle, kind, address, keepalive, hold, seconds, value, reg_name
            )
            return self._c_objects.setdefault(handle, reg)
        except BaseException:  # (a MemoryError): if nothing lists it, end it in C too
            if handle not in self._c_objects:
                self.backend.unregister(handle)
            raise

    def _registered_c(self, address: int, keepalive: object) -> Registration | None:
        """The registration of the C object at `address` that register() made; None if
        there is none any more.  Raises if C code registered it through the C API."""
        deadline = None
        while True:
            handle = self.backend.find(address)
            if handle is None:
                return None
            reg = self._c_objects.get(handle)
            if reg is not None:
                # (Ended but not unlisted yet: the C core has let it go, register anew.)
                return reg if reg._active else None
            # A register() in another thread made it and is about to list it: wait for
            # that, then return its registration.
            now = time.monotonic()
            if deadline is None:
                deadline = now + _LISTING_WAIT
            elif now > deadline:
                break  # an exception stopped that register() before it listed it
            time.sleep(0)
        info = self.backend.info(handle)
        if info is None:
            return None
        reg = self._c_registration(
            handle,
            info.kind,
            address,
            keepalive,
            info.policy == _backend.POLICY_HOLD,
            info.timeout,
            info.sem_value if info.kind == _backend.SEM else None,
            info.name or None,
        )
        reg = self._c_objects.setdefault(handle, reg)
        if not self.backend.is_active(handle):  # unregistered since info(): unlist it
            if self._c_objects.get(handle) is reg:
                self._c_objects.pop(handle, None)
            return None
        return reg

    def _c_registration(
        self,
        handle: int,
        kind: str,
        address: int,
        keepalive: object,
        hold: bool,
        seconds: float,
        value: int | None,
        reg_name: str | None,
    ) -> Registration:
        reg = Registration(self, next(self._tokens), reg_name, _backend.C_TYPE_NAMES[kind])
        reg._policy = "hold" if hold else "reset"
        reg._timeout = seconds
        reg._value = value
        reg._handle = handle
        reg._address = address
        reg._keepalive = keepalive
        reg._mutex_type = None if kind == _backend.MUTEX else ""  # read from C when asked
        return reg

    def _register_python(
        self, target: _targets.PyTarget, hold: bool, seconds: float, reg_name: str | None
    ) -> Registration:
        label = target.kind.label
        if hold and not target.kind.holdable(target.obj):
            raise ValueError(
                f"policy='hold' needs an object that can be acquired, and {label} "
                f"cannot be ({target.kind.not_holdable}); use policy='reset'"
            )
        with self._locked():
            existing = self._by_id.get(id(target.obj))
            if existing is not None and existing._active:
                return self._same_registration(existing, target.value, hold, seconds)
            reg = Registration(self, next(self._tokens), reg_name, label)
            reg._policy = "hold" if hold else "reset"
            reg._timeout = seconds
            reg._value = target.value
            reg._pykind = target.kind
            reg._address = id(target.obj)
            reg._ref = _targets.reference(target.obj, target.kind, reg._token, self._on_collected)
            target.kind.on_register(target.obj)
            entries = self._py_entries(reg, target.obj, hold)
            self._phases.need(_fork_phases.ALL if hold else _fork_phases.CHILD)
            # On the fork hooks' lists before it is listed: a child forked in between
            # (another thread may fork at any bytecode) lists nothing it does not reset.
            reg._buckets = self._bucket_sets.setdefault(
                tuple(id(bucket) for bucket, _ in entries), tuple(b for b, _ in entries)
            )
            for bucket, entry in entries:
                bucket[reg._token] = entry
            self._objects[reg._token] = reg
            self._by_id[reg._address] = reg
        if (
            not self._reset_plain_looked_up
            and len(self._plain_locks) + len(self._plain_rlocks) >= PLAIN_IN_C_FROM
        ):
            self._look_up_reset_plain()
        return reg

    def _look_up_reset_plain(self) -> None:
        # Outside the registry's lock (this may load the C core, an import), after the
        # registration is in: whatever goes wrong here, a stale build without the
        # function say, the registration stands and the Python loops do the work.
        self._reset_plain_looked_up = True
        try:
            self._reset_plain = self.backend.reset_plain_function()
        except Exception:
            self._reset_plain = None

    def need_fork_phases(self, phases: int) -> None:
        """Install these fork phases now if they are not (see _fork_phases.py)."""
        with self._locked():
            self._phases.need(phases)

    def _py_entries(
        self, reg: Registration, obj: object, hold: bool
    ) -> list[tuple[dict[int, Any], Any]]:
        """The fork hooks' lists a Python registration goes on, and its entry on each."""
        if hold:
            return [(self._holds, reg)]
        plain = reg._pykind.plain_parts(obj) if reg._pykind is not None else None
        if plain is None:
            return [(self._resets, reg)]
        lock, waiters = plain
        # A weak reference to the lock: the registration's own reference to `obj`
        # ends it when `obj` goes.  A lock registered itself is reached through that
        # same reference: one object fewer for the child to touch (and copy the page of).
        ref = reg._ref if lock is obj and isinstance(reg._ref, weakref.ref) else weakref.ref(lock)
        locks = self._plain_locks if type(lock) is _targets.LOCK_TYPE else self._plain_rlocks
        entries: list[tuple[dict[int, Any], Any]] = [(locks, ref)]
        if waiters:
            entries.append((self._waiters, waiters))
        return entries

    @staticmethod
    def _same_registration(
        existing: Registration, value: int | None, hold: bool, timeout: float
    ) -> Registration:
        """Registering an object again with the same options returns its registration."""
        if (existing._policy == "hold", existing._timeout, existing._value) == (
            hold,
            timeout,
            value,
        ):
            return existing
        raise ValueError(
            f"this object is already registered as {existing!r} with other options "
            f"(policy, timeout or value); unregister that registration first"
        )

    def at_fork(
        self,
        before: Hook | None = None,
        after_in_parent: Hook | None = None,
        after_in_child: Hook | None = None,
        *,
        name: object = None,
    ) -> Registration:
        hooks = (before, after_in_parent, after_in_child)
        if all(h is None for h in hooks):
            raise TypeError(
                "at_fork() needs at least one of before, after_in_parent, after_in_child"
            )
        for arg, hook in zip(("before", "after_in_parent", "after_in_child"), hooks, strict=True):
            if hook is not None and not callable(hook):
                raise TypeError(f"{arg} must be callable or None, not {type(hook).__qualname__}")

        def default_name() -> str:
            return ", ".join(getattr(h, "__qualname__", repr(h)) for h in hooks if h is not None)

        reg_name = _targets.check_name(name)
        if reg_name is None:
            reg_name = default_name()
        with self._locked():
            reg = Registration(self, next(self._tokens), reg_name, "at_fork hooks")
            reg._hooks = hooks
            self._phases.need(
                (before is not None and _fork_phases.BEFORE)
                | (after_in_parent is not None and _fork_phases.PARENT)
                | (after_in_child is not None and _fork_phases.CHILD)
            )
            self._hooks[reg._token] = reg
        return reg

    def unregister(self, reg: Registration) -> bool:
        if reg._handle is not None:
            # Without the registry's lock, as in _register_c(): the C core decides which
            # of two racing unregisters ended it.  A register() that finds `reg` before
            # it is unlisted returns it, as if it had come just before this call.
            if not reg._active:
                return False
            # May raise (called from a fork handler); the registration stays.
            ended_here = self.backend.unregister(reg._handle)
            reg._ended = "unregistered"
            self._c_objects.pop(reg._handle, None)
            reg._keepalive = None
            return ended_here
        with self._locked():
            if not reg._active:
                return False
            self._end(reg, "unregistered")
        return True

    def _end(self, reg: Registration, why: str) -> None:
        """End a Python object's registration, or at_fork hooks'.  Lock-free (single
        dict operations): weakref callbacks call this from whatever thread drops the
        last reference, possibly inside register()."""
        if not reg._active:
            return
        reg._ended = why
        (self._hooks if reg._hooks is not None else self._objects).pop(reg._token, None)
        for bucket in reg._buckets:
            bucket.pop(reg._token, None)
        address = reg._address
        if reg._pykind is not None and address is not None and self._by_id.get(address) is reg:
            self._by_id.pop(address, None)
        reg._keepalive = None
        if reg._pykind is not None and reg._ref is not None and why != "collected":
            obj = reg._ref()
            if obj is not None:
                if not reg._pykind.weak:  # held strongly while registered: let go of it
                    reg._ref = None
                reg._pykind.on_end(obj)

    def _collected(self, ref: _targets.TokenReference) -> None:
        """Weakref callback: a registered object is gone, so is its registration."""
        reg = self._objects.get(ref.token)
        if reg is not None and reg._ref is ref:
            self._end(reg, "collected")

    def registrations(self) -> list[Registration]:
        """Python-made registrations in registration order, then those made through
        the C API (objects, then hooks, oldest first)."""
        regs = [
            *self._objects.copy().values(),
            *self._c_objects.copy().values(),
            *self._hooks.copy().values(),
        ]
        mine = sorted((r for r in regs if r._active), key=lambda r: r._token)
        known = {r._handle for r in regs}
        theirs = (self._foreign(h) for h in self.backend.handles() if h not in known)
        return mine + [r for r in theirs if r is not None]

    def _foreign(self, handle: int) -> Registration | None:
        """A Registration for something C code registered through the C API."""
        info = self.backend.info(handle)
        if info is None or info.by_python:
            # Unregistered meanwhile, or made by a register() since the copies above,
            # listed where that call returns.
            return None
        if info.kind == _backend.HOOKS:
            label = "C hooks"
        else:
            label = _backend.C_TYPE_NAMES[info.kind]
            if info.mutex_type is not None:
                label = f"{label} ({info.mutex_type})"
        reg = Registration(self, 0, info.name or f"{label} at {info.address:#x}", label)
        reg._handle = handle
        reg._address = info.address
        if info.kind != _backend.HOOKS:
            reg._policy = "hold" if info.policy == _backend.POLICY_HOLD else "reset"
            reg._timeout = info.timeout
        return reg

    # ---------------------------------------------------------------- fork hooks

    def before_fork(self) -> None:
        state = _ForkState()
        outer = self._forks.setdefault(threading.get_ident(), [])
        # A fork started from a before-hook of an outer fork of this thread: what
        # the outer one holds is held already (by this thread, for that fork).
        taken = {id(reg._pykind.hold_lock(obj)) for s in outer for reg, obj in s.held}  # type: ignore[union-attr]
        outer.append(state)
        for reg in reversed(list(self._hooks.values())):
            _call_hook(reg, 0, state.errors)
        for reg in list(self._holds.values()):
            obj = reg._ref() if reg._ref is not None else None
            if obj is None or reg._pykind is None:
                continue
            kind = reg._pykind
            lock_id = id(kind.hold_lock(obj))
            if lock_id in taken:
                continue  # shared with an earlier registration: held (or tried) once
            taken.add(lock_id)
            if kind.held_only_by_this_thread(obj):
                continue  # the forking thread's own: nothing to wait for
            try:
                ok = kind.acquire(obj, reg._timeout or 0.0)
            except BaseException as exc:  # report it in the parent, fork anyway
                _note(exc, f"while holding {reg!r} before fork")
                state.errors.append(exc)
                ok = False
            if ok:
                state.held.append((reg, obj))
            else:
                reg._timeouts += 1
                state.timed_out.append(reg)

    def after_fork_in_parent(self) -> None:
        stack = self._forks.get(threading.get_ident())
        state = stack.pop() if stack else _ForkState()
        errors = state.errors
        for reg, obj in reversed(state.held):
            try:
                reg._pykind.release(obj)  # type: ignore[union-attr]
            except BaseException as exc:
                _note(exc, f"while releasing {reg!r} after fork")
                errors.append(exc)
        # Warnings only now: with the holds taken, a warning routed to logging
        # could have blocked on one of them.
        for reg in state.timed_out:
            _warn_timeout(repr(reg), reg._timeout, stacklevel=3)
        c_timeouts = self.backend.take_fork_timeouts()
        if c_timeouts:
            self._warn_c_timeouts(c_timeouts, stacklevel=4)
        for reg in list(self._hooks.values()):
            _call_hook(reg, 1, errors)
        _raise_all(errors)

    def after_fork_in_child(self) -> None:
        # Every object this touches, code included, costs the child a copy-on-write
        # page fault, so this is kept short and each step is skipped when its list is
        # empty (docs/design.md, "What runs at a fork").  The plain objects (see
        # __init__) are reset by plain loops in this one frame: C iterator chains
        # would save time per object, but their temporaries fault more pages.
        # (Each loop over a copy: a thread started by an earlier child hook may register
        # or unregister meanwhile, and a changed dict would end the loop half-way.)
        errors: list[BaseException] = []
        reset_plain = self._reset_plain
        # In C when there are many; these loops otherwise, or again after a failure
        # there (they do the same, and report what failed).
        if reset_plain is None or reset_plain(self._plain_id) != 0:
            if self._plain_locks:
                for ref in list(self._plain_locks.values()):
                    lock = ref()
                    if lock is not None:
                        try:
                            _LOCK_REINIT(lock)
                        except BaseException as exc:
                            errors.append(exc)
            if self._plain_rlocks:  # apart from the Locks: the forking thread keeps its own
                for ref in list(self._plain_rlocks.values()):
                    lock = ref()
                    if lock is not None and not _RLOCK_IS_OWNED(lock):
                        try:
                            _RLOCK_REINIT(lock)
                        except BaseException as exc:
                            errors.append(exc)
            if self._waiters:
                for lists in list(self._waiters.values()):
                    for waiters in lists:
                        if waiters:
                            waiters.clear()
        if self._forks or self._resets or self._holds or self._hooks:
            self._child_others(errors)
        if errors:
            _raise_all(errors)

    def _child_others(self, errors: list[BaseException]) -> None:
        """The child's work for holds, other Python objects and at_fork hooks."""
        released: set[int] = set()
        if self._forks:  # a before-hook ran: holds to give back
            stack = self._forks.get(threading.get_ident()) or [_ForkState()]
            state = stack.pop()
            # Other threads' forks in progress vanished with them; this thread's outer
            # forks (a before-hook that forked) go on in this child, holds and all.
            self._forks = {threading.get_ident(): stack} if stack else {}
            released = {reg._token for s in stack for reg, _ in s.held}
            for reg, obj in state.held:
                released.add(reg._token)
                try:
                    reg._pykind.release_child(obj, reg._value)  # type: ignore[union-attr]
                except BaseException as exc:
                    _note(exc, f"while releasing {reg!r} in the child")
                    errors.append(exc)
        # C objects were restored by the C child handler; the rest are reset here.
        # (Holds that timed out or were shared get reset too.)
        for reg in [*self._resets.values(), *self._holds.values()]:
            obj = reg._ref() if reg._ref is not None else None
            if obj is None or reg._pykind is None or reg._token in released:
                continue
            try:
                reg._pykind.reset(obj, reg._value)
            except BaseException as exc:  # keep going: never leave the rest locked
                _note(exc, f"while resetting {reg!r} in the child")
                errors.append(exc)
        for reg in list(self._hooks.values()):
            _call_hook(reg, 2, errors)

    def report_c_timeouts(self) -> None:
        """The C_HOLDS phase, at a fork where C holds timed out (_fork_phases.py): warn,
        unless this thread still holds a Python hold of the fork (a warning handler
        could wait on it); the parent phase, which releases those first, warns then."""
        if self._forks.get(threading.get_ident()):
            return
        count = self.backend.take_fork_timeouts()
        if count:
            self._warn_c_timeouts(count, stacklevel=4)

    def _warn_c_timeouts(self, count: int, stacklevel: int) -> None:
        named = 0
        for reg in list(self._c_objects.values()):
            if reg._policy != "hold":
                continue
            info = self.backend.info(reg._handle) if reg._handle is not None else None
            if info is not None and info.hold_timeouts > reg._timeouts:
                reg._timeouts = info.hold_timeouts
                named += 1
                _warn_timeout(repr(reg), reg._timeout, stacklevel=stacklevel)
        if named < count:
            what = f"{count - named} C object(s) registered through the C API"
            _warn_timeout(what, None, stacklevel=stacklevel)


# Seconds a register() waits for another thread's register() of the same C object to
# list it, before it lists it itself: that is microseconds, unless an exception stopped
# the other one half-way.
_LISTING_WAIT = 1.0

# From this many plain locks on, the child resets them in C.  The call into C costs a
# child about 6 pages of its own (the C module's code and cffi's), the Python loop one
# per 60 or so weak references it walks: even at about 500 (child page faults measured
# with 16 to 10,000 registered Locks, against the Python loop and a hand-written one).
PLAIN_IN_C_FROM = 512
_LOCK_REINIT = _targets.LOCK_REINIT
_RLOCK_REINIT = _targets.RLOCK_REINIT
_RLOCK_IS_OWNED = _targets.RLOCK_IS_OWNED


def _call_hook(reg: Registration, phase: int, errors: list[BaseException]) -> None:
    hook = reg._hooks[phase] if reg._hooks is not None and reg._active else None
    if hook is None:
        return
    try:
        hook()
    except BaseException as exc:  # the other hooks still run
        where = ("before", "after_in_parent", "after_in_child")[phase]
        _note(exc, f"in the {where} hook of {reg!r}")
        errors.append(exc)


def _note(exc: BaseException, text: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(f"forkguard: {text}")


def _raise_all(errors: list[BaseException]) -> None:
    """Raise what went wrong; CPython reports it through sys.unraisablehook."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    if sys.version_info >= (3, 11):
        group = f"forkguard: {len(errors)} fork callbacks failed"
        raise BaseExceptionGroup(group, errors)  # noqa: F821 (3.11+ builtin)
    raise RuntimeError(
        f"forkguard: {len(errors)} fork callbacks failed: " + "; ".join(map(repr, errors))
    ) from errors[0]


def _warn_timeout(what: str, timeout: float | None, *, stacklevel: int) -> None:
    """Warn about a hold that timed out; `stacklevel` points at the caller of os.fork()."""
    within = f" within {timeout:g} s" if timeout is not None else ""
    warnings.warn(
        f"forkguard could not hold {what}{within} before fork; the child got it reset "
        f"instead, so the data it protects may be inconsistent there",
        HoldTimeoutWarning,
        stacklevel=stacklevel,
    )
