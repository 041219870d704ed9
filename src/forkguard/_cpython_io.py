"""CPython's buffered I/O objects: the C-level lock no Python code can name.

``io.BufferedWriter`` (and Reader, Random) guards its buffer with a C lock,
``PyThread_type_lock lock`` plus ``unsigned long owner`` (the holder's thread id),
in CPython's ``buffered`` struct.  A thread that is writing when another forks
leaves the child's copy locked for ever: the child's next ``print()``/``flush()``,
or its exit-time flush, hangs.  CPython does not repair it after fork.

In the child forkguard gives such an object a fresh lock and empty buffers by
calling the type's own ``__init__`` again with the same raw stream and buffer
size: CPython's initialiser frees the old lock and buffer and allocates new
ones.  That is also the rule for buffered data: **bytes buffered at the fork
belong to the parent** (which still has them and will write them), so the child
starts empty and never writes a record twice; a reader starts at the file's
shared offset.  A ``TextIOWrapper`` keeps text of its own before it reaches the
buffer (``pending_bytes``); that is dropped in the child for the same reason.

An object with nothing buffered and its lock free is left as it is: it already
is what ``__init__`` would make of it, and idle files (stdio) then cost a fork
nothing.

What is read from the object's memory is found and checked on the running
interpreter the first time it is needed (never assumed): ``owner`` (so that an
object the forking thread itself is inside is left alone), the lock's pointer,
``read_end`` / ``write_end`` (-1 while nothing is buffered), and the
TextIOWrapper's ``pending_bytes`` / ``pending_bytes_count``.  Where they cannot be
verified, registration is refused with the reason.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import io
import struct
import sys
import threading
from collections.abc import Callable

from forkguard._cpython_locks import LayoutError, layout_error, lock_pointers, seen_held
from forkguard._targets import PyKind
from forkguard._targets import _type_name as type_name

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any, Final, Literal, TypeAlias

    Outcome: TypeAlias = Literal["reset", "idle", "inside", "closed"]


_WORD: Final = struct.calcsize("P")
_BUFFERED_TYPES: Final = (io.BufferedRandom, io.BufferedWriter, io.BufferedReader)
_PROBE_SIZE: Final = 4099  # an odd size, so that a match on it is no coincidence


class _Layout:
    __slots__ = ("basicsize", "ends", "lock", "owner", "pair", "pending", "pending_count")

    def __init__(
        self,
        locking: tuple[int, int],
        basicsize: int,
        pending: tuple[int, int],
        pair: tuple[int, int],
        ends: tuple[int, int],
    ) -> None:
        self.owner, self.lock = locking  # the holder's thread id; the lock's pointer
        self.basicsize = basicsize
        self.pending, self.pending_count = pending
        self.pair = pair  # where BufferedRWPair keeps its reader and its writer
        self.ends = ends  # read_end and write_end: -1 while nothing is buffered


class _ProbeRaw(io.RawIOBase):
    """A raw stream that photographs the buffered object above it from inside write(),
    where that object's lock is held by this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.above: object = None
        self.inside: bytes | None = None
        self.data = bytearray()
        self.watch: Callable[[], set[int]] = set  # also called from inside write()
        self.watched: set[int] = set()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.above is not None and self.inside is None:
            self.inside = _memory(self.above)
            self.watched = self.watch()
        self.data += bytes(b)
        return len(b)


def _memory(obj: object) -> bytes:
    return ctypes.string_at(id(obj), type(obj).__basicsize__)


def _words(image: bytes) -> list[int]:
    return [struct.unpack_from("P", image, at)[0] for at in range(0, len(image) - _WORD + 1, _WORD)]


def _find_locking(cls: type) -> tuple[int, int]:
    """The offsets of the lock's owner and of the lock pointer, seen from inside a
    write() that holds the lock."""
    raw = _ProbeRaw()
    buffered = cls(raw, _PROBE_SIZE)
    raw.above = buffered
    before = _memory(buffered)
    pointers, peek, states = lock_pointers(before)
    try:
        raw.watch = lambda: seen_held(pointers, peek, states)
        buffered.write(b"x" * (_PROBE_SIZE + 1))  # more than fits: written through, lock held
        still_free = seen_held(pointers, peek, states, held=False)
    finally:
        peek.close()
    after = _words(_memory(buffered))
    if raw.inside is None:
        raise LayoutError(f"{cls.__qualname__} did not call its raw stream's write()")
    inside = _words(raw.inside)
    me = threading.get_ident()
    hits = [
        i * _WORD
        for i, (b, n, a) in enumerate(zip(_words(before), inside, after, strict=True))
        if b == 0 and n == me and a == 0
    ]
    if len(hits) != 1:
        raise LayoutError(
            f"found {len(hits)} candidate fields for {cls.__qualname__}'s lock owner, expected 1"
        )
    locks = sorted(at for at in pointers if at in raw.watched and at in still_free)
    if len(locks) != 1:
        raise LayoutError(f"found {len(locks)} fields behaving as {cls.__qualname__}'s lock")
    if buffered.__sizeof__() - cls.__basicsize__ != _PROBE_SIZE:
        raise LayoutError(f"{cls.__qualname__}.__sizeof__() does not count its buffer")
    # The reset: __init__ again drops buffered bytes and leaves the object usable.
    buffered.write(b"parent's")
    cls.__init__(buffered, raw, _PROBE_SIZE)  # type: ignore[misc]
    raw.data.clear()
    buffered.write(b"child's")
    buffered.flush()
    if bytes(raw.data) != b"child's":
        raise LayoutError(f"{cls.__qualname__}.__init__() did not start with an empty buffer")
    return hits[0], locks[0]


class _ReaderRaw(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        b[:20] = b"r" * 20
        return 20


def _signed(image: bytes) -> list[int]:
    return [struct.unpack_from("n", image, at)[0] for at in range(0, len(image) - _WORD + 1, _WORD)]


def _find_ends() -> tuple[int, int]:
    """read_end and write_end, by what they hold: -1 while nothing is buffered, else
    where the buffered bytes end."""
    writer = io.BufferedWriter(_ProbeRaw(), _PROBE_SIZE)
    images = [_signed(_memory(writer))]
    for step in (lambda: writer.write(b"abc"), lambda: writer.write(b"defg"), writer.flush):
        step()
        images.append(_signed(_memory(writer)))
    write_end = [i for i, seen in enumerate(zip(*images, strict=True)) if seen == (-1, 3, 7, -1)]
    reader = io.BufferedReader(_ReaderRaw(), _PROBE_SIZE)
    images = [_signed(_memory(reader))]
    reader.read(1)
    images.append(_signed(_memory(reader)))
    read_end = [i for i, seen in enumerate(zip(*images, strict=True)) if seen == (-1, 20)]
    if len(read_end) != 1 or len(write_end) != 1 or read_end == write_end:
        raise LayoutError("could not find the buffered objects' read_end and write_end")
    return read_end[0] * _WORD, write_end[0] * _WORD


def _find_pending() -> tuple[int, int]:
    text = io.TextIOWrapper(io.BufferedWriter(_ProbeRaw(), 1 << 16), encoding="utf-8")
    first = "".join(["fork", "guard"])  # a fresh, ASCII str: kept as it is
    second = "".join(["pro", "be"])
    images = [_words(_memory(text))]
    text.write(first)
    images.append(_words(_memory(text)))
    text.write(second)
    images.append(_words(_memory(text)))
    pointer = [
        i
        for i, (a, b) in enumerate(zip(images[0], images[1], strict=True))
        if a == 0 and b == id(first)
    ]
    count = [
        i
        for i, (a, b, c) in enumerate(zip(*images, strict=True))
        if a == 0 and b == len(first) and c == len(first) + len(second)
    ]
    if len(pointer) != 1 or len(count) != 1:
        raise LayoutError("could not find TextIOWrapper's pending_bytes and its count")
    now = images[2][pointer[0]]
    if not any(id(r) == now and r == [first, second] for r in gc.get_referents(text)):
        raise LayoutError("TextIOWrapper's pending text is not where it was found")
    text.detach()  # nothing of it reaches a real file; drop it quietly
    return pointer[0] * _WORD, count[0] * _WORD


def _find_pair() -> tuple[int, int]:
    # Not every CPython lists the pair's halves to the gc (3.10 and 3.11 do not), so
    # find them through their raw streams, which they do list.
    reader_raw, writer_raw = io.BytesIO(b"r"), io.BytesIO()
    pair = io.BufferedRWPair(reader_raw, writer_raw)
    words = _words(_memory(pair))
    found = []
    for raw, cls in ((reader_raw, io.BufferedReader), (writer_raw, io.BufferedWriter)):
        halves = [r for r in gc.get_referrers(raw) if type(r) is cls and r.raw is raw]
        at = [i for i, w in enumerate(words) if len(halves) == 1 and w == id(halves[0])]
        if len(at) != 1:
            raise LayoutError("could not find io.BufferedRWPair's reader and writer")
        found.append(at[0] * _WORD)
    return found[0], found[1]


@functools.lru_cache(maxsize=1)
def _layout() -> _Layout | str:
    """The verified layout, or why there is none."""
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    sizes = {cls.__basicsize__ for cls in _BUFFERED_TYPES}
    if len(sizes) != 1:
        return "io.BufferedReader, BufferedWriter and BufferedRandom differ in size"
    try:
        locking = _find_locking(io.BufferedWriter)
        pending = _find_pending()
        pair = _find_pair()
        ends = _find_ends()
    except Exception as exc:  # any surprise means "not verified"
        return str(exc) or type(exc).__name__
    return _Layout(locking, sizes.pop(), pending, pair, ends)


def layout() -> _Layout:
    found = _layout()
    if isinstance(found, str):
        raise layout_error("verify the layout of CPython's io objects", found)
    return found


# --------------------------------------------------------------------------
# Resetting, in the child.


def _owner(obj: object, lay: _Layout) -> int:
    return ctypes.c_ulong.from_address(id(obj) + lay.owner).value


def _buffer_size(obj: object) -> int:
    return int(obj.__sizeof__()) - type(obj).__basicsize__


def _c_type(obj: object) -> type:
    return next(cls for cls in _BUFFERED_TYPES if isinstance(obj, cls))


def _idle(obj: object, lay: _Layout) -> bool:
    """Nothing buffered and the lock free: the object is as __init__ would leave it."""
    base = id(obj)
    read_end, write_end = lay.ends
    # A writer never sets read_end, nor a reader write_end (they stay 0).
    cls = _c_type(obj)
    ends: tuple[int, ...] = (read_end,) if cls is io.BufferedReader else (write_end,)
    if cls is io.BufferedRandom:
        ends = lay.ends
    if any(ctypes.c_ssize_t.from_address(base + at).value != -1 for at in ends):
        return False
    lock = ctypes.c_void_p.from_address(base + lay.lock).value
    if not lock or not _try_lock(lock, 0):
        return False
    _unlock(lock)
    return True


def lock_taken(obj: object) -> bool:
    """True if the C lock of buffered object `obj` is taken.  Its owner field can lag
    behind the lock: a thread that got the lock while waiting without the GIL sets
    its owner only once it has the GIL back, and a fork can come in between."""
    lock = ctypes.c_void_p.from_address(id(obj) + layout().lock).value
    if not lock or not _try_lock(lock, 0):
        return bool(lock)
    _unlock(lock)
    return False


def reset_buffered(obj: Any) -> Outcome:
    """Fresh lock and empty buffers ("reset"), unless nothing was buffered and the lock
    is free ("idle": already so), the forking thread is inside `obj` ("inside": left
    alone), or it has been closed ("closed")."""
    lay = layout()
    owner = _owner(obj, lay)
    if owner == threading.get_ident():
        return "inside"
    size = _buffer_size(obj)
    if size <= 0:  # closed since: no buffer, nothing to use
        return "closed"
    if owner == 0 and _idle(obj, lay):
        return "idle"
    _c_type(obj).__init__(obj, obj.raw, size)  # type: ignore[misc]
    return "reset"


_try_lock = ctypes.pythonapi.PyThread_acquire_lock
_try_lock.argtypes = [ctypes.c_void_p, ctypes.c_int]
_try_lock.restype = ctypes.c_int
_unlock = ctypes.pythonapi.PyThread_release_lock
_unlock.argtypes = [ctypes.c_void_p]
_unlock.restype = None
_decref = ctypes.pythonapi.Py_DecRef
_decref.argtypes = [ctypes.c_void_p]
_decref.restype = None


def _drop_pending_text(text: object, lay: _Layout) -> None:
    field = ctypes.c_void_p.from_address(id(text) + lay.pending)
    pending = field.value
    if pending:
        field.value = None
        ctypes.c_ssize_t.from_address(id(text) + lay.pending_count).value = 0
        _decref(pending)


def _inner_buffers(pair: object) -> list[Any]:
    """The pair's reader and writer (both always set while the pair is initialised)."""
    lay = layout()
    pointers = [ctypes.c_void_p.from_address(id(pair) + at).value for at in lay.pair]
    return [ctypes.cast(p, ctypes.py_object).value for p in pointers if p]


# --------------------------------------------------------------------------
# What register() accepts.


def _check_open(obj: Any, label: str) -> None:
    try:
        closed = obj.closed
    except ValueError as exc:  # detached, or never initialised
        raise ValueError(f"cannot register this {label}: {exc}") from None
    if closed:
        raise ValueError(f"cannot register a closed {label}")


class BufferedKind(PyKind):
    not_holdable = "holding it would mean flushing it, which can block without bound"

    def __init__(self, label: str) -> None:
        self.label = label

    def check(self, obj: Any) -> None:
        _check_open(obj, self.label)
        _verified(self.label)

    def holdable(self, obj: Any) -> bool:
        return False

    def reset(self, obj: Any, value: int | None) -> None:
        reset_buffered(obj)

    release_child = reset


class PairKind(BufferedKind):
    """io.BufferedRWPair: no lock of its own; its reader and writer have one each."""

    def reset(self, obj: Any, value: int | None) -> None:
        for inner in _inner_buffers(obj):
            reset_buffered(inner)

    release_child = reset


class TextKind(BufferedKind):
    """io.TextIOWrapper: reset through its buffer, and its pending text dropped."""

    def check(self, obj: Any) -> None:
        _check_open(obj, self.label)
        buffer = obj.buffer
        if not isinstance(buffer, (*_BUFFERED_TYPES, io.BufferedRWPair, io.FileIO)):
            raise TypeError(
                f"cannot register an io.TextIOWrapper over {type_name(buffer)}: forkguard "
                f"resets text files whose buffer is an io.BufferedWriter, BufferedReader, "
                f"BufferedRandom, BufferedRWPair or (unbuffered, as under python -u) FileIO"
            )
        _verified(self.label)

    def reset(self, obj: Any, value: int | None) -> None:
        buffer = obj.buffer
        lay = layout()
        if isinstance(buffer, io.BufferedRWPair):
            for inner in _inner_buffers(buffer):
                reset_buffered(inner)
        elif isinstance(buffer, _BUFFERED_TYPES) and reset_buffered(buffer) in ("inside", "closed"):
            return  # the forking thread is inside it: leave the text layer alone too
        _drop_pending_text(obj, lay)

    release_child = reset


def _verified(label: str) -> None:
    try:
        layout()
    except LayoutError as exc:
        raise TypeError(f"cannot register {label}: {exc}") from None


_RAW_TYPES: Final = (io.RawIOBase, io.FileIO)


def _label(obj: object) -> str:
    cls = type(obj)
    return f"io.{cls.__qualname__}" if cls.__module__ == "_io" else type_name(obj)


def kind_for(obj: object) -> PyKind | None:
    """The kind for an io object; None if `obj` is not one.  Raises TypeError for
    io objects that have no lock (raw files) or that are not CPython's own."""
    for cls in _BUFFERED_TYPES:
        if isinstance(obj, cls):
            return BufferedKind(_label(obj))
    if isinstance(obj, io.BufferedRWPair):
        return PairKind(_label(obj))
    if isinstance(obj, io.TextIOWrapper):
        return TextKind(_label(obj))
    if isinstance(obj, _RAW_TYPES):
        raise TypeError(
            f"cannot register {type_name(obj)}: an unbuffered raw file has no lock and no "
            f"buffer, so there is nothing to reset; register the buffered or text file "
            f"that wraps it"
        )
    if isinstance(obj, io.IOBase) and type(obj).__module__ == "_pyio":
        raise TypeError(
            f"cannot register {type_name(obj)}: forkguard resets CPython's C io objects "
            f"(io.*), not the pure-Python _pyio ones"
        )
    return None
