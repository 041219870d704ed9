"""CPython objects with a C lock of their own: hashes (and the codecs left alone).

hashlib's objects (OpenSSL's and the built-in ones) and HMAC guard their state
with a C lock, taken while ``update()`` works with the GIL released.  A thread
inside ``update()`` when another thread forks leaves the child's copy locked for
ever: the child's next ``update()``, ``copy()`` or ``digest()`` hangs.  CPython
does not repair these after fork.

The lock is one field of the object's C struct: a pointer to a
``PyThread_type_lock`` (3.10-3.12; made at the first update of 2 KiB or more) or
an inline ``PyMutex`` (3.13+).  Which one, and where, is found on the running
interpreter, per type, the first time an object of that type is registered, and
only from what can be observed: a thread runs ``update()`` on a fresh object of
the type, and the one field that reads as a free lock before the call, as a held
lock during it and as a free lock after it is the lock.  Memory behind a
candidate pointer is read through write(2) on a pipe, which fails with EFAULT
instead of crashing where a word is not a pointer; no candidate is written to.
Where not exactly one field behaves so, registration is refused with the reason.

In the child a held lock can only belong to a thread that no longer exists (the
lock is taken in C code that calls no Python, so the forking thread cannot be
inside): a lock pointer is replaced by a fresh lock (the held one stays
allocated; nothing will use it), an inline mutex is cleared.  The hash state is
what the vanished thread left mid-update: fixed-size numbers, no pointers, so
the object works, but its digest is not the digest of anything.

The zlib, bz2 and lzma (de)compressors (and gzip, bz2 and lzma files) have such a
lock too, but are refused: their stream state holds pointers and buffers that a
call cut short leaves inconsistent, and a child that goes on with it can crash
(bz2: "stack smashing detected"), which is worse than the hang.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator

from forkguard._targets import CODEC_MODULES, HASH_MODULES, PyKind
from forkguard._targets import _type_name as type_name

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any, Final


_WORD: Final = ctypes.sizeof(ctypes.c_void_p)
_HEAD: Final = object.__basicsize__  # refcount and type: never the lock
_ATTEMPTS: Final = 4  # update() is made longer each time the lock was not caught held

_COMPRESSED_FILES: Final = (("gzip", "GzipFile"), ("bz2", "BZ2File"), ("lzma", "LZMAFile"))

_api = ctypes.pythonapi
_allocate = _api.PyThread_allocate_lock
_allocate.argtypes = []
_allocate.restype = ctypes.c_void_p
_acquire = _api.PyThread_acquire_lock
_acquire.argtypes = [ctypes.c_void_p, ctypes.c_int]
_acquire.restype = ctypes.c_int
_release = _api.PyThread_release_lock
_release.argtypes = [ctypes.c_void_p]
_release.restype = None
_free = _api.PyThread_free_lock
_free.argtypes = [ctypes.c_void_p]
_free.restype = None


class LayoutError(Exception):
    """A CPython object's internals could not be found and verified on this interpreter."""


def layout_error(what: str, reason: str) -> LayoutError:
    """The error for a check that failed: what could not be done here, and why."""
    version = ".".join(map(str, sys.version_info[:3]))
    return LayoutError(
        f"forkguard could not {what} on {sys.implementation.name} {version} ({reason}), "
        f"so it cannot reset it"
    )


class _Field:
    """Where a type keeps its lock: the offset, and whether it is an inline PyMutex."""

    __slots__ = ("inline", "offset")

    def __init__(self, offset: int, inline: bool) -> None:
        self.offset = offset
        self.inline = inline


# --------------------------------------------------------------------------
# Finding the lock.


class _Peek:
    """Reads one byte anywhere without risk: write(2) from that address into a pipe
    fails with EFAULT where nothing is mapped."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._write = libc.write
        self._write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self._write.restype = ctypes.c_ssize_t
        self._r, self._w = os.pipe()

    def byte(self, address: int) -> int | None:
        if self._write(self._w, address, 1) != 1:
            return None
        return os.read(self._r, 1)[0]

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def _lock_states(peek: _Peek) -> tuple[int, int]:
    """The first byte of a fresh PyThread lock, free and held, on this interpreter."""
    lock = _allocate()
    if not lock:
        raise MemoryError("PyThread_allocate_lock() failed")
    try:
        free = peek.byte(lock)
        _acquire(lock, 0)
        held = peek.byte(lock)
        _release(lock)
    finally:
        _free(lock)
    if free is None or held is None or free == held:
        raise LayoutError("a PyThread lock's state could not be read")
    return free, held


def _image(obj: object) -> bytes:
    return ctypes.string_at(id(obj), type(obj).__basicsize__)


def _pointer_at(image: bytes, offset: int) -> int:
    return int.from_bytes(image[offset : offset + _WORD], sys.byteorder)


def lock_pointers(image: bytes) -> tuple[dict[int, int], _Peek, tuple[int, int]]:
    """The words of an object's `image` that point at what reads as a free lock, with
    the peek (to close) and the lock states to watch them with."""
    peek = _Peek()
    try:
        states = _lock_states(peek)
    except BaseException:
        peek.close()
        raise
    pointers = {
        at: p
        for at in range(_HEAD, len(image) - _WORD + 1, _WORD)
        if (p := _pointer_at(image, at)) and p % _WORD == 0 and peek.byte(p) == states[0]
    }
    return pointers, peek, states


def seen_held(
    pointers: dict[int, int], peek: _Peek, states: tuple[int, int], *, held: bool = True
) -> set[int]:
    """The offsets among `pointers` whose lock reads as held now (or free)."""
    want = states[1] if held else states[0]
    return {at for at, p in pointers.items() if peek.byte(p) == want}


def _catch_held(obj: object, call: Callable[[], object]) -> _Field | None:
    """Run `call` (which takes `obj`'s lock with the GIL released) in a thread and
    watch every candidate field; the field seen free, held, then free again."""
    before = _image(obj)
    pointers, peek, states = lock_pointers(before)
    try:
        return _watch(obj, call, before, pointers, peek, states)
    finally:
        peek.close()


def _watch(
    obj: object,
    call: Callable[[], object],
    before: bytes,
    pointers: dict[int, int],
    peek: _Peek,
    states: tuple[int, int],
) -> _Field | None:
    # A PyMutex is a single byte, 0 when free and 1 when locked (3.13+).
    inline = [at for at in range(_HEAD, len(before)) if before[at] == 0]
    base = id(obj)
    seen: set[tuple[int, bool]] = set()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    while worker.is_alive():
        seen.update((at, False) for at in seen_held(pointers, peek, states))
        now = ctypes.string_at(base, len(before))
        seen.update((at, True) for at in inline if now[at] == 1)
    worker.join()
    after = _image(obj)
    free_now = seen_held(pointers, peek, states, held=False)
    found = [
        _Field(at, is_inline)
        for at, is_inline in seen
        if (after[at] == 0 if is_inline else _pointer_at(after, at) == pointers[at])
        and (is_inline or at in free_now)
    ]
    # A lock pointer is the rule; an inline mutex only where no pointer behaved so
    # (other small fields of a stream's state can flip too while it works).
    if any(not f.inline for f in found):
        found = [f for f in found if not f.inline]
    elif sys.version_info < (3, 13):
        found = []  # PyMutex is new in 3.13
    if len(found) > 1:
        names = ", ".join(str(f.offset) for f in found)
        raise LayoutError(f"several fields behaved like its lock (at {names})")
    return found[0] if found else None


def _probes(sample: Any) -> Iterator[tuple[Any, Callable[[], object]]]:
    """Fresh objects of `sample`'s type, each with an update() that takes its lock
    (with the GIL let go: 2 KiB or more), longer each time."""
    for attempt in range(_ATTEMPTS):
        data = bytes((1 << 18) << (2 * attempt))  # 256 KiB to 16 MiB
        # copy() makes a fresh object of the very same type; a first big update
        # makes the lock where it is made on demand (3.10-3.12).
        fresh = sample.copy()
        fresh.update(data[:4096])
        yield fresh, functools.partial(fresh.update, data)


_found: dict[type, _Field | str] = {}
_found_lock = threading.Lock()


def _find(sample: object) -> _Field | str:
    try:
        for fresh, call in _probes(sample):
            field = _catch_held(fresh, call)
            if field is not None:
                return field
        return "no field behaved like a lock while it worked; the type may have none here"
    except Exception as exc:  # any surprise means "not verified"
        return str(exc) or type(exc).__name__


def field_of(obj: object, *, find: bool = True) -> _Field:
    """Where objects of `obj`'s type keep their lock (found once per type, at
    registration: a child only looks it up)."""
    cls = type(obj)
    found = _found.get(cls)
    if found is None and not find:
        found = "it was not verified before the fork"
    elif found is None:
        if sys.implementation.name != "cpython":
            found = f"{sys.implementation.name} is not CPython"
        else:
            found = _find(obj)
        with _found_lock:
            found = _found.setdefault(cls, found)
    if isinstance(found, str):
        raise layout_error(f"find and verify where {type_name(obj)} keeps its lock", found)
    return found


# --------------------------------------------------------------------------
# Resetting, in the child.


def repair(obj: object) -> bool:
    """Free `obj`'s lock if it is held (by a thread the child does not have).
    True if it was held."""
    field = field_of(obj, find=False)
    address = id(obj) + field.offset
    if field.inline:
        mutex = ctypes.c_ubyte.from_address(address)
        if not mutex.value:
            return False
        mutex.value = 0  # no thread is parked on it in the child
        return True
    slot = ctypes.c_void_p.from_address(address)
    lock = slot.value
    if not lock or _acquire(lock, 0):
        if lock:
            _release(lock)
        return False
    fresh = _allocate()
    if not fresh:
        raise MemoryError(f"could not allocate a new lock for {type_name(obj)}")
    slot.value = fresh  # the held one is left as it is: its holder is gone
    return True


def _compressed_file_types() -> tuple[type, ...]:
    # Only modules already imported: a GzipFile cannot exist without gzip.
    found = []
    for module, name in _COMPRESSED_FILES:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


# --------------------------------------------------------------------------
# What register() accepts.

_NOT_HOLDABLE: Final = (
    "its lock is taken only inside CPython's C code, so forkguard can free it in the "
    "child but not hold it across the fork"
)


class HashKind(PyKind):
    """A hash object; registered strongly (it has no weak references)."""

    not_holdable = _NOT_HOLDABLE
    weak = False

    def __init__(self, label: str) -> None:
        self.label = label

    def check(self, obj: Any) -> None:
        try:
            field_of(obj)
        except LayoutError as exc:
            raise TypeError(f"cannot register {self.label}: {exc}") from None

    def holdable(self, obj: Any) -> bool:
        return False

    def reset(self, obj: Any, value: int | None) -> None:
        repair(obj)

    release_child = reset


_CODEC_REFUSED: Final = (
    "a thread inside it at a fork leaves its stream cut mid-call, and a child that "
    "goes on with that stream can crash, so forkguard does not free its lock; make "
    "a new one in the child (or open the file again there)"
)


def kind_for(obj: object) -> PyKind | None:
    """The kind for a hash object; None if `obj` is none.  Raises TypeError for the
    codecs, whose lock it will not free."""
    module = type(obj).__module__
    if module in CODEC_MODULES or isinstance(obj, _compressed_file_types()):
        raise TypeError(f"cannot register {type_name(obj)}: {_CODEC_REFUSED}")
    if module in HASH_MODULES and callable(getattr(obj, "update", None)):
        return HashKind(type_name(obj))
    return None
