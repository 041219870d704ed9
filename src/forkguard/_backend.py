"""The C registry as Python sees it: the cffi module, or nothing where there is no fork.

Every call that can fail turns the C error code into an exception that says
what was wrong and what is accepted.  Python-level argument checks happen
before a call reaches here; the C core checks again for its C callers.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading

# Not imported at run time: `import forkguard` stays cheap (docs/design.md, "Import").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, Protocol
else:
    Protocol = object

# Kinds of C object, as named in the Python API.
MUTEX: Final = "pthread_mutex"
RWLOCK: Final = "pthread_rwlock"
SEM: Final = "sem"
HOOKS: Final = "hooks"  # C hooks, registered through the C API
C_KINDS: Final = (MUTEX, RWLOCK, SEM)
C_TYPE_NAMES: Final = {MUTEX: "pthread_mutex_t", RWLOCK: "pthread_rwlock_t", SEM: "sem_t"}

MUTEX_TYPES: Final = ("normal", "recursive", "errorcheck", "adaptive")

POLICY_RESET: Final = 0
POLICY_HOLD: Final = 1


class CInfo:
    """What the C registry records about one registration (read-only by convention)."""

    __slots__ = (
        "address",
        "by_python",
        "hold_timeouts",
        "kind",
        "mutex_type",
        "name",
        "policy",
        "sem_value",
        "timeout",
    )

    def __init__(
        self,
        *,
        kind: str,
        policy: int,
        timeout: float,
        mutex_type: str | None,
        hold_timeouts: int,
        address: int,
        name: str,
        sem_value: int = 0,
        by_python: bool = False,
    ) -> None:
        self.kind = kind
        self.policy = policy
        self.timeout = timeout
        self.mutex_type = mutex_type
        self.hold_timeouts = hold_timeouts
        self.address = address
        self.name = name
        self.sem_value = sem_value
        self.by_python = by_python  # made by register(), not through the C API

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"CInfo({fields})"


class Backend(Protocol):
    """The operations the Python registry needs from the C core."""

    can_fork: bool
    can_read_mutex_type: bool
    has_semaphores: bool
    timeout_max: float

    def register(
        self,
        kind: str,
        address: int,
        policy: int,
        timeout: float,
        name: str | None,
        mutex_type: str | None,
        value: int,
    ) -> int:
        """The new registration's handle, or 0 if the object is registered already."""

    def find(self, address: int) -> int | None:
        """The handle of the registration register() made of the object at `address`,
        None if there is none; ValueError if C code registered it through the C API."""

    def unregister(self, handle: int) -> bool: ...
    def is_active(self, handle: int) -> bool: ...
    def info(self, handle: int) -> CInfo | None: ...
    def sem_value(self, address: int) -> int: ...
    def sem_value_max(self) -> int: ...
    def mutex_owner(self, handle: int) -> int | None: ...
    def mutex_fields(self) -> tuple[int, int] | None: ...
    def handles(self) -> list[int]: ...
    def take_fork_timeouts(self) -> int: ...
    def c_holds_hook(self, report: Callable[[], None]) -> Callable[[], object]: ...
    def count(self) -> int: ...
    def reset_plain_function(self) -> Callable[[int], int] | None: ...


def alignment(kind: str) -> int:
    """Required alignment of a C object of this kind, in bytes."""
    from forkguard._native import lib

    return {MUTEX: lib.FG_ALIGNOF_MUTEX, RWLOCK: lib.FG_ALIGNOF_RWLOCK, SEM: lib.FG_ALIGNOF_SEM}[
        kind
    ]


class NativeBackend:
    """The real registry: forkguard._native, one per process.

    The cffi module is loaded at the first use that needs it (a C registration, a
    listing, the C API), not at ``import forkguard``: loading it and _cffi_backend
    is about a quarter of the import, and a program that registers only Python
    objects never needs it.  What registering Python objects asks of the backend is
    known without it (the class attributes below)."""

    can_fork = True
    timeout_max = 1e9  # forkguard.h's FORKGUARD_TIMEOUT_MAX, checked when the core loads

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set yet: the first one loads the core and sets all.
        if name.startswith("__") or "_lib" in self.__dict__:
            raise AttributeError(name)
        self._load()
        return getattr(self, name)

    def _load(self) -> None:
        """Load the C core and set what the methods use (harmless if two threads do)."""
        from forkguard._native import ffi, lib

        rc = lib.fg_init()
        if rc != lib.FORKGUARD_OK:
            reason = ffi.string(lib.fg_strerror(rc)).decode()
            raise OSError(f"forkguard: cannot start its C core: {reason}")
        if float(lib.FORKGUARD_TIMEOUT_MAX) != self.timeout_max:
            raise ImportError(
                f"forkguard's C core allows timeouts up to {lib.FORKGUARD_TIMEOUT_MAX} s "
                f"but its Python side expects {self.timeout_max}: a mismatched build"
            )
        features = lib.fg_features()
        self.can_read_mutex_type = bool(features & lib.FG_FEATURE_MUTEX_TYPE)
        self.has_semaphores = bool(features & lib.FG_FEATURE_SEM)
        self.owner_rule = bool(features & lib.FG_FEATURE_OWNER)
        self._ffi = ffi
        self._no_name = ffi.NULL
        self._kind_ids = {
            MUTEX: lib.FG_KIND_MUTEX,
            RWLOCK: lib.FG_KIND_RWLOCK,
            SEM: lib.FG_KIND_SEM,
        }
        # (whole before it is published: another thread may be loading too)
        self._kind_codes = {**{v: k for k, v in self._kind_ids.items()}, lib.FG_KIND_HOOKS: HOOKS}
        self._type_codes = {
            "normal": lib.FORKGUARD_MUTEX_NORMAL,
            "recursive": lib.FORKGUARD_MUTEX_RECURSIVE,
            "errorcheck": lib.FORKGUARD_MUTEX_ERRORCHECK,
            "adaptive": lib.FORKGUARD_MUTEX_ADAPTIVE,
        }
        self._type_names = {v: k for k, v in self._type_codes.items()}
        # The codes the registration path compares with, read from lib once.
        self._ok, self._busy = lib.FORKGUARD_OK, lib.FORKGUARD_EBUSY
        self._exists = lib.FORKGUARD_EEXIST
        self._detect = lib.FORKGUARD_MUTEX_DETECT
        self._lib = lib  # last: its presence means everything above is set

    def _strerror(self, rc: int) -> str:
        return str(self._ffi.string(self._lib.fg_strerror(rc)).decode())

    def register(
        self,
        kind: str,
        address: int,
        policy: int,
        timeout: float,
        name: str | None,
        mutex_type: str | None,
        value: int,
    ) -> int:
        code = self._detect if mutex_type is None else self._type_codes[mutex_type]
        cname = self._no_name if name is None else name.encode()[: self._lib.FG_NAME_MAX - 1]
        handle = self._lib.fgpy_register(
            self._kind_ids[kind], address, code, value, policy, timeout, cname
        )
        if handle > 0:
            return int(handle)
        if handle == self._exists:
            return 0
        raise self._register_error(handle, kind, address, mutex_type)

    def find(self, address: int) -> int | None:
        handle = self._lib.fgpy_find(address)
        if handle > 0:
            return int(handle)
        if handle == self._exists:
            raise ValueError(
                f"the object at {address:#x} is already registered by C code through "
                f"forkguard's C API; that code unregisters it"
            )
        return None

    def _register_error(
        self, rc: int, kind: str, address: int, mutex_type: str | None
    ) -> Exception:
        lib = self._lib
        what = f"{C_TYPE_NAMES[kind]} at {address:#x}"
        if rc == lib.FORKGUARD_ESHARED:
            return TypeError(
                f"{what} is process-shared (PTHREAD_PROCESS_SHARED): resetting it in a "
                f"child would break the other processes using it, so forkguard refuses it"
            )
        if rc == lib.FORKGUARD_ETYPE:
            return ValueError(
                f"{what} is a {self.mutex_type(address)} mutex, not {mutex_type!r}; "
                f"pass its real type or leave mutex_type=None to read it from the mutex"
            )
        if rc == lib.FORKGUARD_ENOTSUP:
            if kind == MUTEX and self.can_read_mutex_type:
                return TypeError(
                    f"{what} is a robust or priority-protect mutex, which forkguard cannot "
                    f"restore; supported: normal, recursive, errorcheck and adaptive "
                    f"mutexes (priority-inherit included)"
                )
            if kind == MUTEX:
                return ValueError(
                    f"{what}: this platform does not record a mutex's type where forkguard "
                    f"can read it; pass mutex_type= one of 'normal', 'recursive', "
                    f"'errorcheck'"
                )
            return TypeError(f"{what}: {C_TYPE_NAMES[kind]} is not supported on this platform")
        if rc == lib.FORKGUARD_ENOMEM:
            return MemoryError(
                f"cannot register {what}: out of memory, or the registry is full "
                f"(at most {lib.FG_MAX_ENTRIES:,} registrations)"
            )
        if rc == lib.FORKGUARD_EBUSY:
            return RuntimeError(_BUSY)
        if rc == lib.FORKGUARD_EALIGN:
            return ValueError(
                f"{what} is misaligned: a {C_TYPE_NAMES[kind]} address must be a "
                f"multiple of {alignment(kind)}"
            )
        return ValueError(f"cannot register {what}: {self._strerror(rc)}")

    def unregister(self, handle: int) -> bool:
        rc = self._lib.fg_unregister(handle)
        if rc == self._busy:
            raise RuntimeError(_BUSY)
        return rc == self._ok

    def is_active(self, handle: int) -> bool:
        return bool(self._lib.fg_is_active(handle))

    def info(self, handle: int) -> CInfo | None:
        ffi, lib = self._ffi, self._lib
        out = ffi.new("fg_info_t *")
        if lib.fg_info(handle, out) != lib.FORKGUARD_OK:
            return None
        return CInfo(
            kind=self._kind_codes[out.kind],
            policy=int(out.policy),
            timeout=float(out.timeout),
            mutex_type=self._type_names.get(out.mutex_type),
            hold_timeouts=int(out.hold_timeouts),
            address=int(out.address),
            name=ffi.string(out.name).decode("utf-8", "replace"),
            sem_value=int(out.sem_value),
            by_python=bool(out.by_python),
        )

    def mutex_type(self, address: int) -> str:
        """The type of the mutex at `address`, read from the mutex (Linux only)."""
        ffi, lib = self._ffi, self._lib
        out = ffi.new("int *")
        rc = lib.fg_mutex_type(ffi.cast("pthread_mutex_t *", address), out)
        if rc != lib.FORKGUARD_OK:
            raise self._register_error(rc, MUTEX, address, None)
        return self._type_names[out[0]]

    def mutex_owner(self, handle: int) -> int | None:
        """Who holds the mutex of registration `handle` now: 0 free, the holder's native
        thread id, -1 held by an owner not recorded; None if it is no longer registered
        or the C library's layout is not known (forkguard.audit() reads it)."""
        out = self._ffi.new("long *")
        rc = self._lib.fg_mutex_owner(handle, out)
        return int(out[0]) if rc == self._ok else None

    def mutex_fields(self) -> tuple[int, int] | None:
        """(offset of a mutex's lock word, offset of its owner's thread id) where the C
        library's layout is known and checked, else None (forkguard.watch() reads it)."""
        lock_at, owner_at = self._ffi.new("size_t *"), self._ffi.new("size_t *")
        if self._lib.fg_mutex_fields(lock_at, owner_at) != self._ok:
            return None
        return int(lock_at[0]), int(owner_at[0])

    def sem_value(self, address: int) -> int:
        ffi, lib = self._ffi, self._lib
        out = ffi.new("unsigned int *")
        rc = lib.fg_sem_value(ffi.cast("sem_t *", address), out)
        if rc != lib.FORKGUARD_OK:
            reason = self._strerror(rc)
            raise ValueError(f"cannot read the count of sem_t at {address:#x}: {reason}")
        return int(out[0])

    def sem_value_max(self) -> int:
        return int(self._lib.FG_SEM_VALUE_MAX)

    def _loaded(self) -> bool:
        # Until the core is loaded nothing can be registered in C (the C API is
        # reached through capsule() or api_address(), which load it first).
        return "_lib" in self.__dict__

    def handles(self) -> list[int]:
        """Every live C registration, objects then hooks, oldest first."""
        if not self._loaded():
            return []
        ffi, lib = self._ffi, self._lib
        cap = lib.fg_count() + 16
        while True:
            buf = ffi.new("uint64_t[]", cap)
            n = int(lib.fg_list(buf, cap))
            if n <= cap:
                return [int(buf[i]) for i in range(n)]
            cap = n + 16  # registrations arrived meanwhile

    def api_address(self) -> int:
        """Address of the C API table (forkguard.h's forkguard_api)."""
        return int(self._ffi.cast("uintptr_t", self._lib.fg_api()))

    def capsule(self) -> object:
        """A PyCapsule named "forkguard._C_API" holding the C API table.

        Made with ctypes because cffi cannot return Python objects from C; the
        name is a string literal in the C core, so it outlives the capsule."""
        import ctypes

        new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        capsule_new = new(("PyCapsule_New", ctypes.pythonapi))
        name = int(self._ffi.cast("uintptr_t", self._lib.fg_capsule_name()))
        return capsule_new(self.api_address(), name, None)

    def take_fork_timeouts(self) -> int:
        """Holds that timed out in this thread's most recent fork, not taken yet; taken."""
        return int(self._lib.fg_take_fork_timeouts()) if self._loaded() else 0

    def c_holds_hook(self, report: Callable[[], None]) -> Callable[[], object]:
        """The C_HOLDS fork phase (loading the core): a C function object
        (csrc/forkguard_holds.c) that calls `report` when this thread's most recent
        fork has holds that timed out, not taken yet."""
        box: list[Callable[[], object]] = []
        if self._lib.fgpy_holds_hook(id(box), id(report)) != 0:
            raise MemoryError("forkguard: could not make the C_HOLDS fork hook")
        return box[0]

    def count(self) -> int:
        return int(self._lib.fg_count()) if self._loaded() else 0

    def reset_plain_function(self) -> Callable[[int], int] | None:
        """The C loop of a child's reset of plain locks (csrc/forkguard_plain.c), loading
        the core if need be; None where it cannot be used (the Python loops do it then):
        not CPython (it finds the registry's tuple by id()), a free-threaded build (it
        walks live dicts with borrowed references), or a core that cannot be loaded."""
        import sysconfig  # (once per process, and only here)

        if sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED"):
            return None
        try:
            return self._lib.fgpy_reset_plain
        except (ImportError, OSError):
            return None


_BUSY = (
    "cannot register or unregister C objects from inside a fork handler running in the "
    "forking thread (a C hook, or a signal handler that interrupted forkguard); do it "
    "before or after the fork"
)


class NoForkBackend:
    """Platforms without fork() (Windows): registrations are kept, nothing ever runs."""

    can_fork = False
    can_read_mutex_type = False
    has_semaphores = True
    owner_rule = False
    timeout_max = 1e9  # FORKGUARD_TIMEOUT_MAX in forkguard.h

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._live: dict[int, CInfo] = {}
        # The registry takes no lock for C objects (the C core's own decides there):
        # this one stands in for it.
        self._lock = threading.Lock()

    def register(
        self,
        kind: str,
        address: int,
        policy: int,
        timeout: float,
        name: str | None,
        mutex_type: str | None,
        value: int,
    ) -> int:
        with self._lock:
            if self._find(address) is not None:
                return 0
            handle = next(self._next)
            self._live[handle] = CInfo(
                kind=kind,
                policy=policy,
                timeout=timeout,
                mutex_type=mutex_type,
                hold_timeouts=0,
                address=address,
                name=name or "",
                sem_value=value,
                by_python=True,
            )
        return handle

    def find(self, address: int) -> int | None:
        with self._lock:
            return self._find(address)

    def _find(self, address: int) -> int | None:
        return next((h for h, i in self._live.items() if i.address == address), None)

    def unregister(self, handle: int) -> bool:
        with self._lock:
            return self._live.pop(handle, None) is not None

    def is_active(self, handle: int) -> bool:
        return handle in self._live

    def info(self, handle: int) -> CInfo | None:
        return self._live.get(handle)

    def sem_value(self, address: int) -> int:
        return 0

    def mutex_owner(self, handle: int) -> int | None:
        return None

    def mutex_fields(self) -> tuple[int, int] | None:
        return None

    def sem_value_max(self) -> int:
        return 2**31 - 1

    def take_fork_timeouts(self) -> int:
        return 0

    def c_holds_hook(self, report: Callable[[], None]) -> Callable[[], object]:
        return report  # (never asked for: nothing forks)

    def count(self) -> int:
        return len(self._live)

    def reset_plain_function(self) -> Callable[[int], int] | None:
        return None  # nothing forks

    def handles(self) -> list[int]:
        return list(self._live)


def load() -> NativeBackend | NoForkBackend:
    """The backend for this process; import errors on fork platforms are real errors."""
    if not hasattr(os, "fork"):
        return NoForkBackend()
    return NativeBackend()
