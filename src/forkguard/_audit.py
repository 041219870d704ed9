"""``forkguard.audit()``: what would hang a child forked now, who holds it, and the fix.

Three kinds of finding, all read from the running process (nothing is changed):

- **Held locks** forkguard can see: the objects registered with ``register()`` (C
  mutexes too, where the C library's layout is known and checked: glibc),
  the locks ``protect()`` tracks (listed while held), CPython's buffered files
  (``sys.stdout`` and every ``io.Buffered*`` alive: their C lock records its owner),
  and the locks inside the queues, conditions, semaphores, events and logging
  handlers among the live objects.  For each: the thread that holds it where the
  lock records one (an ``RLock``, a tracked lock, a buffered file, a C mutex; a plain
  ``Lock`` does not, so the one thread whose stack refers to it is named), that
  thread's Python stack, whether a child forked now gets it back
  free (registered, or tracked by ``protect()``) or hangs on it, and the one line
  that fixes it.
- **Threads**: every thread of the process; on Linux also the native threads Python
  did not start, by their kernel names (``/proc/self/task``).
- **Native libraries** loaded that are known to misbehave after fork
  (``_fork_unsafe.py``: the list, each entry with its source).

A buffered file's owner is read at the offset ``_cpython_io`` verifies on the running
interpreter; where it cannot, files are left out and the report says so.
"""

from __future__ import annotations

import _thread
import gc
import io
import os
import queue
import re
import sys
import threading
import traceback

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any

    from forkguard import _fork_unsafe


_STACK_FRAMES = 12  # of a holder's stack: its innermost frames
_RLOCK_OWNER = re.compile(r"\bowner=(\d+)")


class Holder:
    """The thread that holds a lock: its name and ids, and its Python stack now.  A
    native thread Python did not start has no `ident` and no stack, and its name is
    the kernel's."""

    __slots__ = ("ident", "inferred", "name", "native_id", "stack")

    def __init__(
        self, ident: int | None, name: str | None, native_id: int | None, stack: list[str]
    ):
        self.ident = ident
        self.name = name
        self.native_id = native_id
        self.stack = stack
        # True when the lock records no owner and the holder was told by its stack
        self.inferred = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "ident": self.ident,
            "name": self.name,
            "native_id": self.native_id,
            "inferred": self.inferred,
            "stack": self.stack,
        }


class HeldLock:
    """A lock held now: what it belongs to, who holds it, what a child would get."""

    __slots__ = ("fix", "holder", "lock_type", "protection", "what")

    def __init__(
        self, what: str, lock_type: str, holder: Holder | None, protection: str | None, fix: str
    ):
        self.what = what
        self.lock_type = lock_type
        self.holder = holder
        self.protection = protection  # None: a child forked now hangs on it
        self.fix = fix

    @property
    def would_hang(self) -> bool:
        """True if a child forked now by another thread would find it held for ever."""
        return self.protection is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "lock_type": self.lock_type,
            "holder": self.holder.as_dict() if self.holder is not None else None,
            "would_hang": self.would_hang,
            "protection": self.protection,
            "fix": self.fix,
        }


class ThreadInfo:
    """A thread of this process; `python` is False for native threads Python did not
    start (found on Linux only)."""

    __slots__ = ("current", "daemon", "ident", "name", "native_id", "python")

    def __init__(
        self,
        name: str,
        ident: int | None,
        native_id: int | None,
        python: bool,
        daemon: bool | None,
        current: bool,
    ):
        self.name = name
        self.ident = ident
        self.native_id = native_id
        self.python = python
        self.daemon = daemon
        self.current = current

    def as_dict(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in self.__slots__}


class LibraryFinding:
    """A loaded native library known to misbehave after fork."""

    __slots__ = ("name", "path", "problem", "remedy", "source")

    def __init__(self, library: _fork_unsafe.Library, path: str):
        self.name = library.name
        self.path = path
        self.problem = library.problem
        self.remedy = library.remedy
        self.source = library.source

    def as_dict(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in self.__slots__}


class AuditReport:
    """What ``forkguard.audit()`` found.  ``str(report)`` is for a terminal,
    ``as_dict()`` for JSON."""

    __slots__ = ("held", "libraries", "notes", "threads")

    def __init__(
        self,
        held: list[HeldLock],
        threads: list[ThreadInfo],
        libraries: list[LibraryFinding],
        notes: list[str],
    ):
        self.held = held
        self.threads = threads
        self.libraries = libraries
        self.notes = notes  # what could not be checked, and why

    @property
    def would_hang(self) -> list[HeldLock]:
        """The held locks a child forked now would hang on."""
        return [h for h in self.held if h.would_hang]

    def as_dict(self) -> dict[str, Any]:
        return {
            "held": [h.as_dict() for h in self.held],
            "threads": [t.as_dict() for t in self.threads],
            "libraries": [lib.as_dict() for lib in self.libraries],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        native = sum(not t.python for t in self.threads)
        threads = _count(len(self.threads), "thread") + (f" ({native} native)" if native else "")
        if not self.held and not self.libraries and not native:
            line = (
                f"forkguard.audit(): nothing found that would hang a child forked now "
                f"({threads}, no lock held, no fork-unsafe native library loaded)"
            )
            return "\n".join([line, *(f"note: {n}" for n in self.notes)])
        hang = len(self.would_hang)
        lines = [
            f"forkguard.audit(): {_count(hang, 'held lock')} a child forked now would hang "
            f"on, {_count(len(self.held) - hang, 'held lock')} it would get back free, "
            f"{threads}, {_count(len(self.libraries), 'fork-unsafe native library')}"
        ]
        if self.held:
            lines += ["", "Held locks:"]
            for h in sorted(self.held, key=lambda h: not h.would_hang):
                verdict = "WOULD HANG" if h.would_hang else "repaired"
                lines.append(f"  [{verdict}] {h.what} ({h.lock_type})")
                lines.append(f"    held by {_holder_text(h.holder, h.lock_type)}")
                if h.holder is not None:
                    lines += [f"      {line}" for line in h.holder.stack]
                if h.would_hang:
                    lines.append(f"    fix: {h.fix}")
                else:
                    lines.append(f"    {h.protection}")
        lines += ["", "Threads:"]
        for t in self.threads:
            lines.append(f"  {_thread_text(t)}")
        if self.libraries:
            lines += ["", "Native libraries known to misbehave after fork:"]
            for lib in self.libraries:
                lines += [
                    f"  {lib.name}: {lib.path}",
                    f"    {lib.problem}",
                    f"    what to do: {lib.remedy}",
                    f"    source: {lib.source}",
                ]
        if self.notes:
            lines += ["", *(f"note: {n}" for n in self.notes)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"<forkguard.AuditReport: {len(self.would_hang)} would hang, "
            f"{len(self.held)} held, {len(self.threads)} threads, "
            f"{len(self.libraries)} libraries>"
        )


def _count(n: int, what: str) -> str:
    if n == 1:
        return f"1 {what}"
    plural = what[:-1] + "ies" if what.endswith("library") else what + "s"
    return f"{n} {plural}"


def _holder_text(holder: Holder | None, lock_type: str) -> str:
    if holder is None:
        if lock_type.startswith("pthread_mutex_t"):
            return "a thread the C library did not record"
        return (
            "a thread it does not record (a plain Lock keeps no owner, and no single "
            "other thread's stack refers to it; under protect() it would be recorded)"
        )
    if holder.ident is None:
        if holder.name is None:
            return f"thread {holder.native_id} (native id), which no longer exists"
        return (
            f"native thread {holder.name!r} (native id {holder.native_id}), not known to threading"
        )
    name = repr(holder.name) if holder.name is not None else "a thread Python does not know"
    if holder.ident == threading.get_ident():
        name += " (this thread)"
    native = f", native id {holder.native_id}" if holder.native_id is not None else ""
    if holder.inferred:
        return (
            f"thread {name} (ident {holder.ident}{native}): the lock records no owner, but "
            f"this is the only other thread whose stack refers to it; now at:"
        )
    return f"thread {name} (ident {holder.ident}{native}), now at:"


def _thread_text(t: ThreadInfo) -> str:
    if not t.python:
        return f"native thread {t.name!r} (native id {t.native_id}), not known to threading"
    extra = []
    if t.current:
        extra.append("this thread")
    if t.daemon:
        extra.append("daemon")
    tail = f"; {', '.join(extra)}" if extra else ""
    return f"{t.name!r} (ident {t.ident}, native id {t.native_id}{tail})"


# ---------------------------------------------------------------------- finding


def audit() -> AuditReport:
    """What would hang a child forked now (see the module's docstring)."""
    from forkguard import _REGISTRY

    notes: list[str] = []
    python_threads = {t.ident: t for t in threading.enumerate()}
    frames = sys._current_frames()
    regs = _REGISTRY.registrations()  # one snapshot for every step below
    protected = _protected(regs)
    held: dict[int, HeldLock] = {}

    def holder(ident: int | None) -> Holder | None:
        if not ident:
            return None
        thread = python_threads.get(ident)
        frame = frames.get(ident)
        stack = (
            [
                line.rstrip()
                for entry in traceback.format_stack(frame)[-_STACK_FRAMES:]
                for line in entry.splitlines()
            ]
            if frame is not None
            else []
        )
        return Holder(
            ident,
            thread.name if thread is not None else None,
            getattr(thread, "native_id", None) if thread is not None else None,
            stack,
        )

    for c in _candidates(notes, regs):
        if id(c.lock) in held:
            continue
        state = _held_by(c.lock)
        if state is None:
            continue
        lock_type, ident = state
        inferred = False
        if ident is None:  # a plain Lock: look for the thread whose stack refers to it
            ident = _infer_holder(c, frames)
            inferred = ident is not None
        found = holder(ident)
        if found is not None:
            found.inferred = inferred
        protection = protected.get(id(c.lock)) or c.repaired_by
        held[id(c.lock)] = HeldLock(c.what, lock_type, found, protection, c.fix)
    c_held = _c_mutexes_held(_REGISTRY.backend, regs, notes, python_threads, holder)
    return AuditReport(
        [*held.values(), *c_held], _threads(python_threads), _libraries(notes), notes
    )


def _c_mutexes_held(
    backend: Any,
    regs: list[Any],
    notes: list[str],
    python_threads: dict[int | None, threading.Thread],
    holder: Any,
) -> list[HeldLock]:
    """Registered C mutexes held now, with the thread that holds each (C registers the
    kernel's thread id): a Python thread by its native id, else a native thread."""
    by_native_id = {t.native_id: t.ident for t in python_threads.values()}
    out = []
    mutexes = [r for r in regs if r._handle is not None and r.kind.startswith("pthread_mutex_t")]
    if mutexes and not getattr(backend, "owner_rule", False):
        notes.append("C mutexes were not checked: this C library's layout is not known")
        return []
    for reg in mutexes:
        owner = backend.mutex_owner(reg._handle)  # None: unregistered meanwhile
        if not owner:
            continue
        found = None
        if owner > 0:
            ident = by_native_id.get(owner)
            found = holder(ident) if ident is not None else Holder(None, _comm(owner), owner, [])
        protection = f"registered ({reg.name}): a child gets it back free"
        out.append(HeldLock(f"registered {reg.name}", reg.kind, found, protection, "registered"))
    return out


def _comm(tid: int, pid: int | str = "self") -> str | None:
    """The kernel's name for thread `tid` of process `pid` (Linux); None elsewhere, or
    if there is no such thread."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def gil_on() -> bool:
    """Whether the GIL is on (always, but on a free-threaded CPython running without it;
    once on, it stays on).  Without it, other threads run while this one reads: their
    frames' locals change under the reader, which can crash the interpreter (a holder
    is then left unknown rather than inferred), and an object read by address must be
    kept alive by a reference of the reader's own."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return gil_enabled is None or bool(gil_enabled())


def _infer_holder(c: _Candidate, frames: dict[int, Any]) -> int | None:
    """The one other thread whose Python stack has a frame with the lock or its container
    among its local variables (``self`` in ``Queue.put``, a ``with lock:`` in the
    thread's own function); None if no thread or several threads do.  A thread inside
    ``Condition.wait()`` does not hold that condition's lock (the wait gives it up).
    A thread waiting for the lock matches too, so only a single match is taken as the
    holder.  Module frames are passed over (their locals are the module's globals).
    The calling thread is not looked at: its own frames refer to what it audits."""
    if not gil_on():
        return None
    me = threading.get_ident()
    wanted = (id(c.lock), id(c.container))
    matches = []
    for ident, innermost in frames.items():
        if ident == me or _released(innermost) == id(c.lock):
            continue
        frame, depth = innermost, 0
        while frame is not None and depth < _INFER_DEPTH:
            scope = frame.f_locals
            if scope is not frame.f_globals and any(id(v) in wanted for v in scope.values()):
                matches.append(ident)
                break
            frame, depth = frame.f_back, depth + 1
    return matches[0] if len(matches) == 1 else None


_INFER_DEPTH = 30  # frames looked at per thread, innermost first


def _released(frame: Any) -> int | None:
    """id() of the lock a thread stopped at `frame` gave up: inside Condition.wait(),
    the condition's lock (the wait gives it up meanwhile); else None."""
    code = frame.f_code
    if code.co_name != "wait" or code.co_filename != threading.__file__:
        return None
    if not gil_on():
        return None
    cond = frame.f_locals.get("self")
    return id(cond._lock) if isinstance(cond, threading.Condition) else None  # type: ignore[attr-defined]


def _protected(regs: list[Any]) -> dict[int, str]:
    """id(lock) -> how a child gets it back, for the locks forkguard already repairs."""
    out: dict[int, str] = {}
    for reg in regs:
        target = reg.target
        for lock in _locks_of(target):
            out[id(lock)] = f"registered ({reg.name}): a child gets it back free"
    protect = sys.modules.get("forkguard._protect")
    if protect is not None and protect._current is not None:  # repaired while switched on
        for lock in list(protect._active):
            out.setdefault(id(lock), "tracked by protect(): a child gets it back free")
    return out


def _locks_of(obj: object) -> list[object]:
    """The locks a registered object's registration repairs."""
    if isinstance(obj, queue.Queue):
        return [obj.mutex]
    if isinstance(obj, threading.Condition):
        return [obj._lock]  # type: ignore[attr-defined]
    cond = getattr(obj, "_cond", None)  # Semaphore, BoundedSemaphore, Event
    if isinstance(cond, threading.Condition):
        return [cond._lock]  # type: ignore[attr-defined]
    if isinstance(obj, io.TextIOWrapper):
        obj = obj.buffer
    if isinstance(obj, io.BufferedRWPair):
        from forkguard import _cpython_io

        return list(_cpython_io._inner_buffers(obj))
    inner = getattr(obj, "queue", None)  # logging.handlers.QueueListener
    if isinstance(inner, queue.Queue) and hasattr(obj, "handlers"):
        return [inner.mutex]
    return [obj]


class _Candidate:
    """A lock to check: the object it belongs to, how to name it, the line that fixes it."""

    __slots__ = ("container", "fix", "lock", "repaired_by", "what")

    def __init__(
        self, lock: object, container: object, what: str, fix: str, repaired_by: str | None = None
    ) -> None:
        self.lock = lock
        self.container = container
        self.what = what
        self.fix = fix
        self.repaired_by = repaired_by  # repaired in the child without forkguard


def _candidates(notes: list[str], regs: list[Any]) -> list[_Candidate]:
    """Every lock to check, most descriptive container first (a Queue before the
    Conditions built on its mutex)."""
    queues: list[_Candidate] = []
    others: list[_Candidate] = []
    files_ok = _files_checkable(notes)
    files = _std_files() if files_ok else []
    classify = _classifier(files_ok)
    for obj in gc.get_objects():
        c = classify(obj)
        if c is not None:
            (queues if isinstance(c.container, queue.Queue) else others).append(c)
    protect = sys.modules.get("forkguard._protect")
    tracked = [
        _Candidate(lock, lock, repr(lock), "forkguard.register(lock)")
        for lock in (list(protect._active) if protect is not None else [])
    ]
    registered = [  # Python objects (C mutexes are read in C: _c_mutexes_held())
        _Candidate(lock, reg.target, f"registered {reg.name}", "already registered")
        for reg in regs
        if reg._pykind is not None
        for lock in _locks_of(reg.target)
        if lock is not None
    ]
    return [*queues, *files, *others, *tracked, *registered]


def _std_files() -> list[_Candidate]:
    """sys.stdin's, sys.stdout's and sys.stderr's buffers (the caller has checked that
    buffered files can be read)."""
    out = []
    for std in ("stdin", "stdout", "stderr"):
        f = getattr(sys, std)
        buffer = getattr(f, "buffer", f)
        if isinstance(buffer, _BUFFERED):
            fix = f"forkguard.register(sys.{std})"
            out.append(_Candidate(buffer, f, f"sys.{std}'s buffer", fix))
    return out


def _classifier(files_ok: bool) -> Any:
    """A function: object -> the _Candidate for the lock inside it, or None (for the
    queues, logging handlers, conditions, semaphores, events and buffered files)."""
    logging = sys.modules.get("logging")
    handler_type = getattr(logging, "Handler", ())  # (missing while logging is imported)
    reinit = getattr(logging, "_at_fork_reinit_lock_weakset", ())
    files = _BUFFERED if files_ok else ()
    waitable = (threading.Condition, threading.Semaphore, threading.Event)

    def classify(obj: object) -> _Candidate | None:
        # type(), not isinstance(): isinstance() reads __class__, which a lazy proxy
        # answers by evaluating its target.  Objects half made (an __init__ still
        # running, or skipped by a subclass) lack their lock: passed over.
        cls = type(obj)
        try:
            if issubclass(cls, queue.Queue):
                name = _short(obj)
                fix = f"forkguard.register({name})"
                return _Candidate(obj.mutex, obj, f"the mutex of {name}", fix)  # type: ignore[attr-defined]
            if issubclass(cls, handler_type):
                lock = obj.lock  # type: ignore[attr-defined]
                if lock is None:
                    return None
                name = _short(obj)
                fix = f"forkguard.register(handler.lock)  # handler = {name}"
                # logging (3.8+) re-creates the locks of the handlers made through
                # Handler.__init__ in a forked child.
                why = "CPython's logging re-creates it in a forked child" if obj in reinit else None
                return _Candidate(lock, obj, f"the lock of {name}", fix, why)
            if issubclass(cls, waitable):
                lock = obj._lock if issubclass(cls, threading.Condition) else obj._cond._lock  # type: ignore[attr-defined]
                name = _short(obj)
                return _Candidate(lock, obj, f"the lock of {name}", f"forkguard.register({name})")
            if issubclass(cls, files):
                name = _short(obj)
                fix = f"forkguard.register(f)  # f = {name}"
                return _Candidate(obj, obj, f"the buffer lock of {name}", fix)
        except AttributeError:
            pass
        return None

    return classify


_BUFFERED = (io.BufferedWriter, io.BufferedReader, io.BufferedRandom)


def _files_checkable(notes: list[str]) -> bool:
    from forkguard import _cpython_io
    from forkguard._cpython_locks import LayoutError

    try:
        _cpython_io.layout()
    except LayoutError as exc:
        notes.append(f"buffered files were not checked: {exc}")
        return False
    return True


def _short(obj: object) -> str:
    cls = type(obj)
    module = "io" if cls.__module__ == "_io" else cls.__module__
    name = f"{module}.{cls.__qualname__}" if module != "builtins" else cls.__qualname__
    return f"<{name} at {id(obj):#x}>"


def _held_by(lock: object) -> tuple[str, int | None] | None:
    """(its type, the holder's ident or None if not recorded) if `lock` is held now."""
    if isinstance(lock, _BUFFERED):
        from forkguard import _cpython_io

        file_owner = _cpython_io._owner(lock, _cpython_io.layout())
        return ("the file's C buffer lock", file_owner) if file_owner else None
    locked = getattr(lock, "locked", None)
    owner: int | None = getattr(lock, "_owner", None)  # tracked Lock; threading's pure-Python RLock
    if callable(locked) and not isinstance(lock, _RLOCK_TYPES):
        if not locked():
            return None
        return type(lock).__qualname__, owner or None
    text = repr(lock)  # CPython's C RLock: "<locked _thread.RLock object owner=... count=...>"
    if not text.startswith("<locked"):
        return None
    match = _RLOCK_OWNER.search(text)
    return "RLock", int(match.group(1)) if match else owner or None


_RLOCK_TYPES = (_thread.RLock,)  # CPython's C RLock (protect()'s tracked RLock included)


def _threads(python: dict[int | None, threading.Thread]) -> list[ThreadInfo]:
    me = threading.get_ident()
    out = [
        ThreadInfo(t.name, t.ident, t.native_id, True, t.daemon, t.ident == me)
        for t in python.values()
    ]
    known = {t.native_id for t in python.values()}
    try:
        tids = sorted(int(tid) for tid in os.listdir("/proc/self/task"))
    except OSError:  # not Linux: Python's own threads only
        return out
    for tid in tids:
        if tid in known:
            continue
        name = _comm(tid)
        if name is not None:  # (None: it ended meanwhile)
            out.append(ThreadInfo(name, None, tid, False, None, False))
    return out


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux: /proc/self/maps;
    macOS: dyld's list); empty where neither can be read."""
    try:
        with open("/proc/self/maps") as f:
            return _paths_in_maps(f.read())
    except OSError:
        pass
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None)
        libc._dyld_get_image_name.restype = ctypes.c_char_p
        return [
            libc._dyld_get_image_name(i).decode(errors="replace")
            for i in range(libc._dyld_image_count())
        ]
    return []


def _paths_in_maps(text: str) -> list[str]:
    """The distinct file paths in /proc/<pid>/maps text, in order of first mapping."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            seen.setdefault(fields[5].removesuffix(" (deleted)"), None)
    return list(seen)


def _libraries(notes: list[str], paths: list[str] | None = None) -> list[LibraryFinding]:
    if paths is None:
        paths = loaded_libraries()
        if not paths:
            notes.append("the loaded native libraries could not be listed on this platform")
    # (Loaded here, not with the module: watch() uses the rest, and every fork copies
    # page tables for what a process holds.)
    from forkguard import _fork_unsafe

    found: list[LibraryFinding] = []
    for library in _fork_unsafe.LIBRARIES:
        for path in paths:
            if library.files.search(os.path.basename(path)):
                found.append(LibraryFinding(library, path))
                break
    return found
