"""What can be registered, and how each kind of object is reset, held and released.

A registration's target is either a Python object (held weakly, restored by the
"after in child" hook) or a C object (passed to the C registry by address and
restored by the C child handler, for every fork in the process).
"""

from __future__ import annotations

import io
import queue
import sys
import threading
import weakref
from collections.abc import Callable

from forkguard import _backend, _sem_owners

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

DEFAULT_TIMEOUT: Final = 1.0
# Modules of CPython's C types that guard their state with a lock of their own
# (_cpython_locks.py): hashes (reset), and (de)compressors (refused).
HASH_MODULES: Final = frozenset(
    {"_hashlib", "_blake2", "_sha3", "_md5", "_sha1", "_sha2", "_sha256", "_sha512"}
)
CODEC_MODULES: Final = frozenset({"zlib", "_bz2", "_lzma"})
_C_LOCK_MODULES: Final = HASH_MODULES | CODEC_MODULES

SUPPORTED = (
    "threading.Lock, RLock, Condition, Semaphore, BoundedSemaphore, Event; "
    "queue.Queue and its subclasses; io.BufferedWriter, BufferedReader, BufferedRandom, "
    "BufferedRWPair and TextIOWrapper (sys.stdout, open() files); hashlib's hash and HMAC "
    "objects; logging.handlers.QueueListener; a cffi pointer to "
    "pthread_mutex_t, pthread_rwlock_t or sem_t; an integer address with "
    "kind='pthread_mutex', 'pthread_rwlock' or 'sem'; "
    "any object with a __forkguard_reset__() method"
)


# --------------------------------------------------------------------------
# Python locks.  CPython's own locks have _at_fork_reinit() (3.9+), which
# replaces the lock's internals in place: the object keeps its identity, so a
# Condition or Queue that refers to it keeps working.


def _lock_is_resettable(lock: object) -> bool:
    return callable(getattr(lock, "_at_fork_reinit", None))


def reset_lock(lock: Any) -> None:
    """Unlock `lock` in a child unless the forking thread itself owns it (an RLock)."""
    is_owned = getattr(lock, "_is_owned", None)
    if is_owned is not None and is_owned():
        return
    lock._at_fork_reinit()


def _release_held_lock(lock: Any) -> None:
    """Undo our own hold in a child: an RLock keeps any outer ownership of this thread."""
    if hasattr(lock, "_is_owned"):
        lock.release()
    else:
        lock._at_fork_reinit()


def _clear_waiters(cond: Any) -> None:
    # Waiters belong to threads that do not exist in the child; a notify()
    # would wake one of them instead of a live thread.
    cond._waiters.clear()


class PyKind:
    """How one kind of Python object is restored in a child, and held across a fork."""

    label: str = ""
    weak = True  # registered through a weak reference (else kept alive while registered)
    not_holdable = (
        "objects with __forkguard_reset__ also need __forkguard_acquire__ and __forkguard_release__"
    )

    def check(self, obj: Any) -> None:
        """Raise TypeError if `obj` lacks the internals this kind relies on."""

    def holdable(self, obj: Any) -> bool:
        return True

    def reset(self, obj: Any, value: int | None) -> None:
        raise NotImplementedError

    def plain_parts(self, obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
        """(lock, waiter lists) when resetting `obj` is exactly: re-initialise that
        ``threading.Lock``, or CPython's C ``RLock`` unless the forking thread owns
        it, and empty those Conditions' waiter lists.  The child then does it in
        plain loops inside one Python call, with no call per object; None (the
        default) means ``reset()`` is called."""
        return None

    def hold_lock(self, obj: Any) -> object:
        """The object a hold acquires (two registrations sharing it hold it once)."""
        return obj

    def held_only_by_this_thread(self, obj: Any) -> bool:
        """True if a hold by this thread could only wait for itself: then the data is
        consistent already (no other thread is inside), and the hold is skipped."""
        return False

    def acquire(self, obj: Any, timeout: float) -> bool:
        return bool(obj.acquire(timeout=timeout))

    def release(self, obj: Any) -> None:
        obj.release()

    def release_child(self, obj: Any, value: int | None) -> None:
        raise NotImplementedError

    def on_register(self, obj: Any) -> None:
        """Called when `obj` is registered (while the registration lasts)."""

    def on_end(self, obj: Any) -> None:
        """Called when the registration of the still-living `obj` ends."""


class LockKind(PyKind):
    def __init__(self, label: str) -> None:
        self.label = label

    def reset(self, obj: Any, value: int | None) -> None:
        reset_lock(obj)

    def plain_parts(self, obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
        return (obj, ()) if type(obj) in PLAIN_LOCK_TYPES else None

    def release_child(self, obj: Any, value: int | None) -> None:
        _release_held_lock(obj)


class ConditionKind(PyKind):
    label = "threading.Condition"

    def check(self, obj: Any) -> None:
        if not _lock_is_resettable(obj._lock):
            raise TypeError(
                f"cannot register a threading.Condition built on {type(obj._lock).__qualname__}: "
                f"forkguard can only reset a Condition whose lock is a threading.Lock or RLock"
            )

    def reset(self, obj: Any, value: int | None) -> None:
        reset_lock(obj._lock)
        _clear_waiters(obj)

    def plain_parts(self, obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
        return (obj._lock, (obj._waiters,)) if type(obj._lock) in PLAIN_LOCK_TYPES else None

    def hold_lock(self, obj: Any) -> object:
        return obj._lock

    def release_child(self, obj: Any, value: int | None) -> None:
        _release_held_lock(obj._lock)
        _clear_waiters(obj)


class SemaphoreKind(PyKind):
    """A hold takes one unit.  The child gets the registered count back, less the
    units the forking thread holds (counted per thread while registered)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def on_register(self, obj: Any) -> None:
        _sem_owners.track(obj)

    def held_only_by_this_thread(self, obj: Any) -> bool:
        return obj._value == 0 and _sem_owners.only_this_thread_holds(obj)

    def on_end(self, obj: Any) -> None:
        _sem_owners.untrack(obj)

    def reset(self, obj: Any, value: int | None, give_back: int = 0) -> None:
        reset_lock(obj._cond._lock)
        _clear_waiters(obj._cond)
        mine = _sem_owners.keep_only_this_thread(obj, give_back)
        obj._value = max(0, (value or 0) - mine)

    def release_child(self, obj: Any, value: int | None) -> None:
        self.reset(obj, value, give_back=1)  # the hold's unit is back


class EventKind(PyKind):
    label = "threading.Event"
    not_holdable = "it has no lock of its own to hold"

    def holdable(self, obj: Any) -> bool:
        return False

    def reset(self, obj: Any, value: int | None) -> None:
        reset_lock(obj._cond._lock)
        _clear_waiters(obj._cond)

    release_child = reset


class QueueKind(PyKind):
    def __init__(self, label: str) -> None:
        self.label = label

    def check(self, obj: Any) -> None:
        if not _lock_is_resettable(obj.mutex):
            raise TypeError(
                f"cannot register {self.label}: its mutex is a {type(obj.mutex).__qualname__}, "
                f"and forkguard can only reset a threading.Lock or RLock"
            )

    @staticmethod
    def _conditions(obj: Any) -> tuple[Any, ...]:
        return (obj.not_empty, obj.not_full, obj.all_tasks_done)

    def _clear(self, obj: Any) -> None:
        for cond in self._conditions(obj):
            _clear_waiters(cond)

    def reset(self, obj: Any, value: int | None) -> None:
        reset_lock(obj.mutex)
        self._clear(obj)

    def plain_parts(self, obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
        if type(obj.mutex) not in PLAIN_LOCK_TYPES:
            return None
        return obj.mutex, tuple(c._waiters for c in self._conditions(obj))

    def hold_lock(self, obj: Any) -> object:
        return obj.mutex

    def acquire(self, obj: Any, timeout: float) -> bool:
        return bool(obj.mutex.acquire(timeout=timeout))

    def release(self, obj: Any) -> None:
        obj.mutex.release()

    def release_child(self, obj: Any, value: int | None) -> None:
        _release_held_lock(obj.mutex)
        self._clear(obj)


class ProtocolKind(PyKind):
    """Objects that restore themselves: ``__forkguard_reset__()``.

    With ``__forkguard_acquire__(timeout) -> bool`` and ``__forkguard_release__()``
    they can also be held.
    """

    def __init__(self, label: str) -> None:
        self.label = label

    def holdable(self, obj: Any) -> bool:
        return callable(getattr(obj, "__forkguard_acquire__", None)) and callable(
            getattr(obj, "__forkguard_release__", None)
        )

    def reset(self, obj: Any, value: int | None) -> None:
        obj.__forkguard_reset__()

    def acquire(self, obj: Any, timeout: float) -> bool:
        return bool(obj.__forkguard_acquire__(timeout))

    def release(self, obj: Any) -> None:
        obj.__forkguard_release__()

    def release_child(self, obj: Any, value: int | None) -> None:
        obj.__forkguard_release__()


_LOCK = LockKind("threading.Lock")
_RLOCK = LockKind("threading.RLock")
_CONDITION = ConditionKind()
_SEMAPHORE = SemaphoreKind("threading.Semaphore")
_BOUNDED = SemaphoreKind("threading.BoundedSemaphore")
_EVENT = EventKind()

LOCK_TYPE: Final = type(threading.Lock())
LOCK_REINIT: Final = LOCK_TYPE._at_fork_reinit  # type: ignore[attr-defined]
RLOCK_TYPE: Final = type(threading.RLock())  # CPython's C RLock
RLOCK_REINIT: Final = RLOCK_TYPE._at_fork_reinit  # type: ignore[attr-defined]
RLOCK_IS_OWNED: Final = RLOCK_TYPE._is_owned  # type: ignore[attr-defined]
PLAIN_LOCK_TYPES: Final = (LOCK_TYPE, RLOCK_TYPE)
_LOCK_TYPES: tuple[type, ...] = (LOCK_TYPE,)
_RLOCK_TYPES: tuple[type, ...] = (RLOCK_TYPE, threading._PyRLock)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Classification.


class PyTarget:
    """A recognised Python object."""

    __slots__ = ("kind", "obj", "value")

    def __init__(self, obj: Any, kind: PyKind, value: int | None) -> None:
        self.obj = obj
        self.kind = kind
        self.value = value


class CTarget:
    """A recognised C object: its kind (_backend.MUTEX, RWLOCK or SEM) and address."""

    __slots__ = ("address", "keepalive", "kind", "mutex_type", "value")

    def __init__(
        self,
        kind: str,
        address: int,
        keepalive: object,  # the cffi pointer, kept alive while registered
        mutex_type: str | None,
        value: int | None,  # semaphores only
    ) -> None:
        self.kind = kind
        self.address = address
        self.keepalive = keepalive
        self.mutex_type = mutex_type
        self.value = value


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _process_shared_reason(obj: object) -> str | None:
    """Why `obj` belongs to several processes, if it is one of multiprocessing's."""
    module = type(obj).__module__ or ""
    if not module.startswith(("multiprocessing", "_multiprocessing")):
        return None
    sync = sys.modules.get("multiprocessing.synchronize")
    shared: tuple[type, ...] = ()
    if sync is not None:
        shared += (sync.SemLock, sync.Condition, sync.Event, sync.Barrier)
    mp_queues = sys.modules.get("multiprocessing.queues")
    if mp_queues is not None:
        shared += (mp_queues.Queue, mp_queues.SimpleQueue)
    native = sys.modules.get("_multiprocessing")
    if native is not None and hasattr(native, "SemLock"):
        shared += (native.SemLock,)
    managers = sys.modules.get("multiprocessing.managers")
    if managers is not None and isinstance(obj, managers.BaseProxy):
        return "it is a proxy for an object that lives in a manager process"
    if isinstance(obj, shared):
        return (
            "it is built on a process-shared semaphore (multiprocessing's SemLock), which "
            "the parent and its other children use too: resetting it in one child would "
            "break them all"
        )
    return None


def _check_value(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"value= must be an int (the {what}'s count), not {_type_name(value)}")
    if value < 0:
        raise ValueError(f"value= must be >= 0 (the {what}'s count), not {value}")
    return value


def check_policy(policy: object) -> bool:
    """True for "hold", False for "reset"."""
    if policy == "reset" and type(policy) is str:
        return False
    if policy == "hold" and type(policy) is str:
        return True
    raise ValueError(f"policy must be 'reset' or 'hold', not {policy!r}")


def check_timeout(timeout: object, core_max: float) -> float:
    """Seconds for a hold, within what both the C core (`core_max`, its
    FORKGUARD_TIMEOUT_MAX) and Python's locks (threading.TIMEOUT_MAX) accept, so
    one limit holds for every kind of object."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {_type_name(timeout)}")
    t = float(timeout)
    limit = min(core_max, threading.TIMEOUT_MAX)
    if not (0 <= t <= limit):  # also refuses NaN and infinities
        raise ValueError(
            f"timeout must be a number of seconds from 0 to {limit:g}, not {timeout!r}"
        )
    return t


def check_name(name: object) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {_type_name(name)}")
    return name


def classify(
    obj: object,
    kind: object,
    value: object,
    mutex_type: object,
    backend: _backend.Backend,
) -> PyTarget | CTarget:
    """Recognise `obj` or raise TypeError/ValueError saying what is accepted."""
    if kind is not None and (not isinstance(kind, str) or kind not in _backend.C_KINDS):
        raise ValueError(
            f"kind must be None, 'pthread_mutex', 'pthread_rwlock' or 'sem', not {kind!r}"
        )
    if mutex_type is not None and (
        not isinstance(mutex_type, str) or mutex_type not in _backend.MUTEX_TYPES
    ):
        raise ValueError(
            f"mutex_type must be None or one of {', '.join(map(repr, _backend.MUTEX_TYPES))}, "
            f"not {mutex_type!r}"
        )
    if type(obj) is int:
        return _classify_address(obj, None, kind, value, mutex_type, backend)
    cffi_kind = _cffi_pointer_kind(obj)
    if cffi_kind is not None:
        address, ctype_kind = cffi_kind
        if ctype_kind is None and kind is None:
            raise TypeError(
                f"cannot tell what the cffi pointer {obj!r} points to; declare it as "
                f"pthread_mutex_t *, pthread_rwlock_t * or sem_t *, or pass kind="
            )
        if ctype_kind is not None and kind is not None and kind != ctype_kind:
            raise ValueError(f"kind={kind!r} contradicts the pointer's type in {obj!r}")
        return _classify_address(address, obj, ctype_kind or kind, value, mutex_type, backend)
    return _classify_python(obj, kind, value, mutex_type)


_POINTEE_KINDS: Final = {
    "pthread_mutex_t": _backend.MUTEX,
    "pthread_rwlock_t": _backend.RWLOCK,
    "sem_t": _backend.SEM,
    "void": None,  # untyped: needs kind=
    "char": None,
    "unsigned char": None,
}


class _CData:
    """cffi inspection, set up on first use (cdata from every FFI share one backend)."""

    ffi: Any = None
    uintptr: Any = None
    kinds: dict[Any, str | None] = {}  # noqa: RUF012 - ctype -> kind, filled as seen

    @classmethod
    def load(cls) -> Any:
        if cls.ffi is None:
            try:
                from forkguard._native import ffi
            except ImportError:  # no compiled core (platforms without fork)
                import cffi

                ffi = cffi.FFI()
            cls.uintptr = ffi.typeof("uintptr_t")
            cls.ffi = ffi
        return cls.ffi


def _cffi_pointer_kind(obj: object) -> tuple[int, str | None] | None:
    """(address, kind or None) for a cffi pointer or array from any FFI; None otherwise."""
    if "_cffi_backend" not in sys.modules:
        return None  # no cffi object can exist yet
    ffi = _CData.ffi or _CData.load()
    if not isinstance(obj, ffi.CData):
        return None
    ctype = ffi.typeof(obj)
    try:
        kind = _CData.kinds[ctype]
    except KeyError:
        kind = _pointee_kind(ctype)
        _CData.kinds[ctype] = kind
    return int(ffi.cast(_CData.uintptr, obj)), kind


def cffi_mutex_address(obj: object) -> int | None:
    """The address of a cffi ``pthread_mutex_t *`` of a type seen before, else None:
    the registry's short path, the rest goes through classify()."""
    ffi = _CData.ffi
    if ffi is None or not isinstance(obj, ffi.CData):
        return None
    if _CData.kinds.get(ffi.typeof(obj)) != _backend.MUTEX:
        return None
    address = int(ffi.cast(_CData.uintptr, obj))
    return address if 0 < address < _ADDRESS_END else None


def _pointee_kind(ctype: Any) -> str | None:
    if ctype.kind not in ("pointer", "array"):
        raise TypeError(
            f"a cffi object must be a pointer to the lock, not a {ctype.kind} ({ctype.cname})"
        )
    item = ctype.item.cname.removeprefix("const ").removeprefix("volatile ").strip()
    if item in _POINTEE_KINDS:
        return _POINTEE_KINDS[item]
    raise TypeError(
        f"cffi pointer of type {ctype.cname!r} is not a lock forkguard knows; accepted: "
        f"pthread_mutex_t *, pthread_rwlock_t *, sem_t * (or void * with kind=)"
    )


def _classify_address(
    address: int,
    keepalive: object,
    kind: str | None,
    value: object,
    mutex_type: object,
    backend: _backend.Backend,
) -> CTarget:
    if kind is None:
        raise TypeError(
            "an integer address needs kind='pthread_mutex', 'pthread_rwlock' or 'sem' "
            "to say what it points to"
        )
    if kind == _backend.MUTEX and 0 < address < _ADDRESS_END and value is None:  # most
        return CTarget(kind, address, keepalive, mutex_type, None)  # type: ignore[arg-type]
    ctype = _backend.C_TYPE_NAMES[kind]
    if not 0 < address < _ADDRESS_END:
        if address == 0:
            raise ValueError(f"NULL {ctype} pointer: forkguard needs the address of a live {ctype}")
        raise ValueError(f"{address:#x} is not a valid address for a {ctype}")
    if mutex_type is not None and kind != _backend.MUTEX:
        raise ValueError(f"mutex_type= applies only to pthread_mutex_t, not {ctype}")
    sem_value: int | None = None
    if kind == _backend.SEM:
        if value is None:
            sem_value = backend.sem_value(address) if backend.has_semaphores else 0
        else:
            sem_value = _check_value(value, "semaphore")
        limit = backend.sem_value_max()
        if sem_value > limit:
            raise ValueError(f"value= must be at most SEM_VALUE_MAX ({limit}), not {sem_value}")
    elif value is not None:
        raise ValueError(f"value= applies only to semaphores, not {ctype}")
    return CTarget(kind, address, keepalive, mutex_type, sem_value)  # type: ignore[arg-type]


_ADDRESS_END: Final = 2**64 if sys.maxsize > 2**32 else 2**32  # one past the last address


def _classify_python(obj: object, kind: object, value: object, mutex_type: object) -> PyTarget:
    if kind is not None:
        raise ValueError(
            f"kind= names the type of a C object given by address; "
            f"{_type_name(obj)} is a Python object, so leave kind=None"
        )
    if mutex_type is not None:
        raise ValueError("mutex_type= applies only to pthread_mutex_t objects")
    if obj is None:
        raise TypeError(f"cannot register None; supported: {SUPPORTED}")
    pykind = _python_kind(obj)
    pykind.check(obj)
    target_value: int | None = None
    if isinstance(pykind, SemaphoreKind):
        if value is None:
            target_value = obj._value  # type: ignore[attr-defined]
        else:
            target_value = _check_value(value, "semaphore")
            bound = getattr(obj, "_initial_value", None)
            if pykind is _BOUNDED and bound is not None and target_value > bound:
                raise ValueError(
                    f"value= must not exceed the BoundedSemaphore's bound ({bound}), "
                    f"not {target_value}"
                )
    elif value is not None:
        raise ValueError(f"value= applies only to semaphores, not {pykind.label}")
    return PyTarget(obj, pykind, target_value)


class StrongReference:
    """Stands in for a weak reference to an object that supports none."""

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __call__(self) -> Any:
        return self._obj


class TokenReference(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that carries its registration's token, so one callback of
    the registry's serves them all: a bound method per registration would cost a
    fork's page tables about 60 bytes more per registered object."""

    __slots__ = ("token",)

    token: int


def reference(
    obj: object, kind: PyKind, token: int, callback: Callable[[Any], None]
) -> TokenReference | StrongReference:
    if not kind.weak:
        return StrongReference(obj)
    try:
        ref = TokenReference(obj, callback)
    except TypeError:
        raise TypeError(
            f"cannot register {_type_name(obj)}: forkguard holds Python objects through "
            f"weak references, which it does not support (add '__weakref__' to its "
            f"__slots__)"
        ) from None
    ref.token = token
    return ref


def _python_kind(obj: object) -> PyKind:
    cls = type(obj)
    if callable(getattr(cls, "__forkguard_reset__", None)):
        return ProtocolKind(_type_name(obj))
    reason = _process_shared_reason(obj)
    if reason is not None:
        raise TypeError(f"cannot register {_type_name(obj)}: {reason}")
    if isinstance(obj, _LOCK_TYPES):
        return _LOCK
    if isinstance(obj, _RLOCK_TYPES):
        return _RLOCK
    if isinstance(obj, threading.Condition):
        return _CONDITION
    if isinstance(obj, threading.BoundedSemaphore):
        return _BOUNDED
    if isinstance(obj, threading.Semaphore):
        return _SEMAPHORE
    if isinstance(obj, threading.Event):
        return _EVENT
    if isinstance(obj, queue.Queue):
        return QueueKind(_type_name(obj))
    handlers = sys.modules.get("logging.handlers")  # no listener without it
    if handlers is not None and isinstance(obj, handlers.QueueListener):
        from forkguard import _forward

        return _forward.ListenerKind(_type_name(obj))
    if isinstance(obj, io.IOBase):
        from forkguard import _cpython_io  # ctypes and the layout probe: only when needed

        io_kind = _cpython_io.kind_for(obj)
        if io_kind is not None:
            return io_kind
    if cls.__module__ in _C_LOCK_MODULES or isinstance(obj, io.IOBase):
        from forkguard import _cpython_locks

        c_lock_kind = _cpython_locks.kind_for(obj)
        if c_lock_kind is not None:
            return c_lock_kind
    raise TypeError(f"cannot register {_type_name(obj)}; supported: {SUPPORTED}")
