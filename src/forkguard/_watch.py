"""``forkguard.watch()``: a forked child that hangs on a lock says which lock, and who held it.

Switched on, each fork does this:

- **In the parent, just before the fork**: a look at the known locks (below), all
  but events': each file's owner field read by address, each other lock tried
  without waiting; every 32nd fork, a count of the threads ``threading`` does not
  know (Linux; native ones may hold C locks no Python object shows).  If nothing is
  taken and there are no such threads, that is all: the child does nothing either.
  Otherwise the parent records each taken lock with its holder (the owner the lock
  records: an ``RLock``, a buffered file; or the one parent thread whose innermost
  frames in ``threading``, ``queue`` or ``logging`` work on the lock's owner), each
  other thread's stack (code and line of its innermost frames), and keeps the GIL
  until the fork (a long switch interval).
- **In the child, with a record**: a watchdog thread (a bare ``_thread``, which
  ``threading`` does not list) samples where the forking thread is.  When it has not
  moved for ``timeout`` seconds, the watchdog looks for what it waits on, and
  reports only what it can name:

  1. a lock taken at the fork and still taken, which one of its innermost frames
     refers to (``Queue.put`` has the queue as ``self``); a known lock taken since
     the parent's look (a thread took it in the instant before the fork) counts too;
  2. a buffered file held at the fork and still held, when its current line calls
     ``print`` or a file method;
  3. on Linux, the futex the kernel says it waits on, read as a pthread mutex (where
     ``fg_mutex_fields`` vouches for the C library's layout) whose owner was a
     thread of the parent: an extension's lock nobody registered.

  The report goes to file descriptor 2 directly (``sys.stderr``'s own lock may be the
  one held).  ``action="exit"`` then ends the child with ``HANG_EXIT_STATUS``.
  (The doctor, ``every_child``, records at every fork and watches every child.)

Locks are tried, not asked: on 3.10-3.13 ``locked()`` lags behind a lock taken by a
thread still waiting for the GIL, and a fork can come in between (``held_now()``).

The known locks are those ``audit()`` looks at (queues, conditions, semaphores,
events, logging handlers' locks, buffered files, ``sys.std*``): found by one scan
of the live objects in ``watch()``, then as they are made (``__init__`` of those
classes, wrapped while watching) and, for files, at each garbage collection.  None
of that runs at a fork.

A child that does not hang is left alone: same output, same exit status.  The
watchdog stops before the child forks in turn (and starts again after), so it never
makes Python warn about forking a multi-threaded process.
"""

from __future__ import annotations

import _thread
import gc
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

from forkguard import HANG_EXIT_STATUS, _audit

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any


_c_ulong = __import__("ctypes").c_ulong
_any, _map, _value = any, map, __import__("operator").attrgetter("value")
_get_ident = _thread.get_ident
_active = threading._active  # type: ignore[attr-defined]
_limbo = threading._limbo  # type: ignore[attr-defined]

ACTIONS = ("report", "exit")
_STACK_FRAMES = 12  # recorded of a holder's stack at the fork, innermost first
_NEAR_FRAMES = 6  # innermost frames of a stuck thread searched for the lock
_MAX_SAMPLE = 0.5  # seconds between two looks at the child's thread, at most
_HOLD_GIL = 0.5  # the switch interval from a fork's record to the fork itself
# The futex system call's number, where the watchdog knows it.
_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}
# Names on a stuck line that say it is writing or reading a file.
_IO_NAMES = frozenset(
    [
        "print",
        "input",
        "write",
        "writelines",
        "flush",
        "read",
        "readline",
        "readlines",
        "readinto",
        "close",
        "seek",
        "truncate",
        "peek",
    ]
)


class Watch:
    """What ``forkguard.watch()`` returned: its settings, and ``stop()``."""

    __slots__ = ("_every_child", "_native", "_on_fork", "_on_hang", "_tick", "action", "timeout")

    def __init__(
        self,
        timeout: float,
        action: str,
        on_fork: Callable[[], None] | None = None,
        on_hang: Callable[[Finding], None] | None = None,
        every_child: bool = False,
    ) -> None:
        self.timeout = timeout
        self.action = action
        self._on_fork = on_fork  # python -m forkguard doctor: an audit at each fork
        self._on_hang = on_hang  # python -m forkguard doctor: keeps each finding
        self._every_child = every_child  # the doctor: a watchdog in every child
        self._tick = 0  # forks until threads are counted again (_before)
        self._native = False  # threads threading does not know were alive then

    @property
    def active(self) -> bool:
        return _current is self

    def stop(self) -> None:
        """Switch watching off: later forks record nothing and start no watchdog (a
        child's running watchdog keeps watching that child)."""
        global _current
        with _setup_lock():
            if _current is self:
                _current = None
                _set_gc_callback(False)
                _index()  # (the C hook: off)

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<forkguard.Watch timeout={self.timeout} action={self.action!r} {state}>"


_current: Watch | None = None
_hooked = False
_phases_to_install = [True]  # emptied when the parent and child phases are installed
_setup = (os.getpid(), _thread.allocate_lock())  # for watch() and stop(); not at a fork


def _setup_lock() -> Any:
    """The lock of watch() and stop(), made afresh in a forked child (where another
    thread may have held the parent's)."""
    global _setup
    if _setup[0] != os.getpid():
        _setup = (os.getpid(), _thread.allocate_lock())
    return _setup[1]


def watch(
    timeout: float = 5.0,
    action: str = "report",
    *,
    on_fork: Callable[[], None] | None = None,
    on_hang: Callable[[Finding], None] | None = None,
    every_child: bool = False,
) -> Watch:
    global _current, _hooked
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"watch(): timeout must be a number of seconds, not {type(timeout).__name__}"
        )
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"watch(): timeout must be a finite number > 0, not {timeout!r}")
    if action not in ACTIONS:
        raise ValueError(f"watch(): action must be 'report' or 'exit', not {action!r}")
    handle = Watch(float(timeout), action, on_fork, on_hang, every_child)
    if not hasattr(os, "register_at_fork"):  # Windows: nothing forks
        return handle
    with _setup_lock():
        if not _hooked:
            # The parent and child phases come with the first record (_look).
            os.register_at_fork(before=_hook())
            _hooked = True
        if _current is None:
            _wrap_inits()
            _learn_std_files()
            _learn(gc.get_objects())
            _set_gc_callback(True)
        _current = handle
        if _c_hook:
            handle._native = _native_threads() > len(_active) + len(_limbo)
        _index()
    return handle


def _hook() -> Callable[[], None]:
    """The before-hook: the C one (csrc/forkguard_watch.c), which calls the Python
    look only when a field it reads shows a file taken, a thread count is due, or
    _c_state says it must; or the Python one where there is no C core, or no GIL
    (the C hook reads the files' fields under the GIL, which keeps them alive)."""
    global _c_hook
    if not _audit.gil_on():
        return _before
    try:
        from forkguard._native import lib
    except ImportError:
        return _before
    owner_at = _file_owner_offset() if _files_ok() else -1
    box: list[Callable[[], None]] = []
    types = (_thread.LockType, _thread.RLock)
    if lib.fgpy_watch_install(id(box), id(_look), id(_c_state), id(types), owner_at, _NATIVE_EVERY):
        return _before
    _c_hook = True
    return box[0]


# ------------------------------------------------------------ the locks to check


class _Known:
    """A lock to check at each fork, held weakly, with what the report says of it."""

    __slots__ = ("container", "fix", "lock", "owner", "what")

    def __init__(self, c: Any) -> None:
        key = id(c.lock)

        def gone(_: object, forget: Callable[[int, _Known], None] = _forget) -> None:
            forget(key, self)  # (bound now: module globals are gone at shutdown)

        self.lock = weakref.ref(c.lock, gone)
        self.container = weakref.ref(c.container)
        self.what: str = c.what
        self.fix: str = c.fix
        # A buffered file: its owner field, read before each fork without touching
        # the file (its entry goes when it does).  Without the GIL the file could go
        # during the read: it is read through a reference instead.
        self.owner: Any = None
        if isinstance(c.lock, _audit._BUFFERED):
            at = _file_owner_offset()
            self.owner = _c_ulong.from_address(key + at) if _audit.gil_on() else _Owner(self.lock)


class _Owner:
    """A buffered file's owner field (or its lock taken), read while holding the file:
    what the look reads without the GIL, in place of a view of the field."""

    __slots__ = ("file",)

    def __init__(self, file: weakref.ref[Any]) -> None:
        self.file = file

    @property
    def value(self) -> bool:
        f = self.file()
        return f is not None and held_now(f) is not None


def _forget(key: int, known: _Known) -> None:
    for table in (_known, _at_fork):
        if table is not None and table.get(key) is known:  # (None: at shutdown)
            del table[key]
    if _at_fork is not None:
        _index()


def _index() -> None:
    """The look before a fork reads two lists, rebuilt (never changed in place)
    whenever the locks looked at change: owner fields of files, weak references to
    the other locks.  A loop over them allocates nothing per lock.  The C hook reads
    _c_state, rebuilt with them: the files and locks, whether a watch is on, and
    whether the Python look must run at every fork; so this runs too when a watch
    starts or stops, a watchdog comes or goes, or threads Python does not know come
    or go.

    Any thread may change them (a lock learned as it is made, a file gone at a
    garbage collection, whose callback may even run inside a rebuild): each call
    marks the lists stale, and whichever thread gets the lock rebuilds them until no
    call came meanwhile, so a change is never lost to a rebuild from an older look at
    the table.  No call waits."""
    global _stale
    _stale = True
    lock = _index_lock()
    while _stale and lock.acquire(False):
        try:
            while _stale:
                _stale = False
                _rebuild()
        finally:
            lock.release()


def _rebuild() -> None:
    global _file_words, _lock_refs
    known = list(_at_fork.values())
    _file_words = [k.owner for k in known if k.owner is not None]
    _lock_refs = [k.lock for k in known if k.owner is None]
    if not _c_hook:
        return
    w = _current
    files = tuple(k.lock for k in known if isinstance(k.owner, _c_ulong))
    python = _dog is not None or len(files) < len(_file_words)
    if w is not None:
        python = python or w._on_fork is not None or w._every_child or w._native
    _c_state[:] = [w is not None or _dog is not None, bool(python), files, tuple(_lock_refs), w]


def _index_lock() -> Any:
    """(Made afresh in a forked child: another thread may have held the parent's.)"""
    global _indexing
    if _indexing[0] != os.getpid():
        _indexing = (os.getpid(), _thread.allocate_lock())
    return _indexing[1]


_file_words: list[Any] = []
_lock_refs: list[Any] = []
# What the C hook (csrc/forkguard_watch.c) reads at each fork, once it is installed:
# [a watch is on (or a watchdog to pause), the Python look must run, the files whose
# owner fields it reads, the locks it tries (weak references), the watch it was made
# for].  Set by _rebuild(); while _current is another watch, the hook calls _look.
_c_hook = False
_c_state: list[Any] = [False, False, (), (), None]
_stale = False
_indexing = (os.getpid(), _thread.allocate_lock())


_known: dict[int, _Known] = {}  # id(lock) -> what is known of it
# The ones looked at before each fork: all but events' (every Thread has one, and
# an event's lock is held only for a few lines).  Each costs a fork a page or two
# written; the rest are read only by a watchdog, in a child already stuck.
_at_fork: dict[int, _Known] = {}
_kinds: dict[type, bool] = {}  # type -> may hold a lock to check
_kind_key: object = None  # what _kinds was made for (logging imported or not)


def _candidate_types() -> tuple[type, ...]:
    handler = getattr(sys.modules.get("logging"), "Handler", None)  # (None: mid-import)
    return (
        __import__("queue").Queue,
        threading.Condition,
        threading.Semaphore,
        threading.Event,
        *_audit._BUFFERED,
        *((handler,) if handler is not None else ()),
    )


def _learn(objects: list[Any]) -> None:
    """Add the locks inside `objects` (those audit() looks at) to the ones checked at
    each fork.  Types are sorted once each, so a look at young objects stays cheap."""
    global _kind_key
    types = _candidate_types()
    if types != _kind_key or len(_kinds) > 10_000:
        _kinds.clear()
        _kind_key = types
    classify = None
    for obj in objects:
        cls = type(obj)
        kind = _kinds.get(cls)
        if kind is None:
            kind = _kinds[cls] = issubclass(cls, types)
        if not kind:
            continue
        if classify is None:
            classify = _audit._classifier(_files_ok())
        c = classify(obj)
        if c is None or c.repaired_by is not None:
            continue
        _remember(c)


def _remember(c: Any) -> None:
    old = _known.get(id(c.lock))
    # A queue, a semaphore, an event name their lock better than the condition
    # built on it.
    bare = type(c.container) is threading.Condition
    if old is not None and old.lock() is c.lock and bare:
        return
    try:
        known = _known[id(c.lock)] = _Known(c)
    except TypeError:  # takes no weak reference: not checked
        return
    if isinstance(c.container, threading.Event):
        _at_fork.pop(id(c.lock), None)
    else:
        _at_fork[id(c.lock)] = known
    _index()


def _wrap_inits() -> None:
    """Learn each queue, condition, semaphore, event and logging handler as it is made
    (once; the wrappers do nothing while watching is off)."""
    logging = sys.modules.get("logging")
    classes = [__import__("queue").Queue, threading.Condition, threading.Semaphore]
    classes.append(threading.Event)
    if logging is not None and hasattr(logging, "Handler"):
        classes.append(logging.Handler)
    for cls in classes:
        if cls in _wrapped:
            continue
        _wrapped.add(cls)
        cls.__init__ = _learning_init(cls.__init__)


_wrapped: set[type] = set()


def _learning_init(init: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _current is not None:
            _learn([self])

    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    __init__.__doc__ = init.__doc__
    return __init__


def _learn_std_files() -> None:
    if _files_ok():
        for c in _audit._std_files():
            _remember(c)


_files_checked: bool | None = None


def _files_ok() -> bool:
    global _files_checked
    if _files_checked is None:
        _files_checked = _audit._files_checkable([])
    return _files_checked


def _on_gc(phase: str, info: dict[str, int]) -> None:
    # The young objects, before this collection moves them on: every object that
    # lives through a collection is looked at once.
    if phase == "start":
        _learn(gc.get_objects(0))
        _learn_std_files()
        if "logging" in sys.modules and len(_wrapped) < 5:  # logging came after watch()
            # (Only while no watch() runs: it wraps them itself.  A collection can run
            # in any thread, inside watch() too: never waited for.)
            lock = _setup_lock()
            if lock.acquire(False):
                try:
                    _wrap_inits()
                finally:
                    lock.release()


def _set_gc_callback(on: bool) -> None:
    if on and _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    elif not on and _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)


# ------------------------------------------------------------ at the fork

Frame = tuple[str, int, str]  # (file, line, module-qualified function)

# Modules whose methods take the locks of the objects they are called on: a frame
# of theirs tells, by its `self`, which object's lock its thread may hold.
_LOCK_TAKERS: frozenset[str] = frozenset(
    str(m.__file__) for m in (threading, __import__("queue")) if getattr(m, "__file__", None)
)


class ThreadAtFork:
    """A thread of the parent as it was at the fork."""

    __slots__ = ("ident", "name", "native_id", "released", "selves", "stack")

    def __init__(
        self,
        ident: int | None,
        name: str | None,
        native_id: int | None,
        frame: Any,
        takers: frozenset[str] = _LOCK_TAKERS,
    ) -> None:
        self.ident = ident
        self.name = name
        self.native_id = native_id
        self.stack: list[tuple[Any, int]] = []  # (code, line), innermost first
        self.selves: set[int] = set()  # ids of the objects its lock-taking frames work on
        self.released = _audit._released(frame) if frame is not None else None
        depth, gil_on = 0, _audit.gil_on()
        while frame is not None and depth < _STACK_FRAMES:
            code = frame.f_code
            self.stack.append((code, frame.f_lineno))
            # A lock is taken and held in the innermost frames: only those are read
            # (a frame's locals cost a fork more than its code and line).
            near = gil_on and depth < _SELF_FRAMES and code.co_filename in takers
            if near and code.co_argcount and code.co_varnames[0] == "self":
                self.selves.add(id(frame.f_locals.get("self")))
            frame, depth = frame.f_back, depth + 1


def _takers() -> frozenset[str]:
    """The files of the modules whose methods take their own objects' locks."""
    files = [getattr(sys.modules.get(m), "__file__", None) for m in _LOGGING]
    return _LOCK_TAKERS.union(f for f in files if isinstance(f, str))


_LOGGING = ("logging", "logging.handlers")
_SELF_FRAMES = 4  # innermost frames of each thread whose `self` is recorded at a fork


class Record:
    """What the parent saw just before one fork where a child may hang: the known
    locks taken, each with the thread(s) that held it, and every other thread's
    stack."""

    __slots__ = ("forker", "held", "native", "parent", "taken_now", "threads")

    def __init__(self, taken: list[tuple[_Known, str, int | None]], native: bool) -> None:
        self.parent = os.getpid()
        self.forker = _thread.get_ident()
        frames = sys._current_frames()
        takers = _takers()
        self.threads = [
            ThreadAtFork(t.ident, t.name, t.native_id, frames.get(t.ident or 0), takers)
            for t in threading.enumerate()
            if t.ident != self.forker  # (the child's own thread)
        ]
        self.native = native  # threads threading does not know were alive
        self.held = [_held(self, known, lock_type, owner) for known, lock_type, owner in taken]
        self.taken_now: set[int] = set()  # id()s of the _Known taken at the fork (child)


class Held:
    """A lock held at the fork by a thread other than the forking one."""

    __slots__ = ("holders", "how", "known", "lock_type")

    def __init__(
        self, known: _Known, lock_type: str, holders: list[ThreadAtFork], how: str
    ) -> None:
        self.known = known
        self.lock_type = lock_type
        self.holders = holders
        # "recorded" by the lock; "inferred": the one thread working on its owner;
        # "one of": several were; "unknown": none was
        self.how = how


def _native_threads() -> int:
    """The kernel's count of this process's threads (Linux: /proc's task folder has
    one link per thread, plus two); 0 where it cannot tell."""
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:
        return 0


# Read before every _NATIVE_EVERY-th fork only: threads come and go far less often
# than a server forks, and a call costs a fork pages.
_NATIVE_EVERY = 32


# Records by forking thread: two threads may fork at once (a before-hook after this
# one can let another thread run).  The switch interval is saved by the first and
# restored by the last.
_records: dict[int, Record] = {}
_switch: list[float] = []  # [the interval before the first outstanding record]
_bookkeeping = (os.getpid(), _thread.allocate_lock())


def _records_lock() -> Any:
    """Held around the phases' installation and the switch interval's save and
    restore, in the parent only, and never while waiting for anything: those calls
    wait for nothing.  Made afresh in a forked child (another thread may have held
    the parent's)."""
    global _bookkeeping
    if _bookkeeping[0] != os.getpid():
        _bookkeeping = (os.getpid(), _thread.allocate_lock())
    return _bookkeeping[1]


def _before() -> None:
    """The before-hook where the C one cannot be used: counts forks itself (on the
    handle: it is touched anyway, and a page costs a fork a fault)."""
    w = _current
    count = False
    if w is not None:
        if w._tick:
            w._tick -= 1
        else:
            w._tick = _NATIVE_EVERY - 1
            count = True
    _look(count)


def _look(count: bool) -> None:
    """What is taken before a fork, and by whom; `count`: count the process's
    threads too.  Called by the C hook only when something may be taken, a thread
    count is due, it must run at every fork (_rebuild), or its state was built for
    another watch than the one on now."""
    if _c_hook and _c_state[4] is not _current:
        _index()  # (a watch() or stop() whose rebuild another thread had under way)
    if _dog is not None:
        _dog.pause()
    w = _current
    if w is None:
        return
    if w._on_fork is not None:
        w._on_fork()
    # Threads threading does not know (native ones, _thread's) may hold C locks no
    # Python object shows.  (stat() lets other threads run: it comes first.)
    if count:
        native = _native_threads() > len(_active) + len(_limbo)
        if native != w._native:
            w._native = native
            _index()  # (the C hook calls here at every fork while there are some)
    # Each object touched here costs the fork a page written (a first write after
    # the last fork), and each allocation one more: the common case (nothing taken)
    # reads the files' owner fields and tries the locks, and allocates one map.
    busy = _any(_map(_value, _file_words))
    if _lock_refs and not busy:
        for ref in _lock_refs:
            lock = ref()
            if lock is not None:
                if not lock.acquire(False):
                    busy = True
                    break
                lock.release()
    native = w._native
    if not (busy or native or w._every_child):
        return  # nothing a child could be found stuck on: the child does nothing
    me = _get_ident()
    taken = None
    for known in list(_at_fork.values()):
        lock = known.lock()
        state = held_now(lock) if lock is not None else None  # (None: going)
        if state is not None and state[1] != me:
            taken = taken or []
            taken.append((known, *state))
    if not (taken or native or w._every_child):
        return  # nothing a child could be found stuck on: the child does nothing
    _records[me] = Record(taken or [], native)
    # (Under the lock: another thread may be forking too, and must neither fork
    # before the phases exist nor save the raised interval as the one to restore.)
    with _records_lock():
        if _phases_to_install:
            # The other two phases, installed by the first fork that needs them
            # (CPython copies a phase's list when it runs it: this fork's child runs
            # its hook).  The flag goes only once they are in.
            os.register_at_fork(after_in_child=_after_in_child, after_in_parent=_after_in_parent)
            _phases_to_install.clear()
        # A thread that runs between this look and the fork can move on and take a
        # lock.  A long switch interval keeps the GIL with this thread until the fork
        # (a thread already waiting for the GIL may still ask for it once).
        if not _switch:
            _switch.append(sys.getswitchinterval())
        sys.setswitchinterval(_HOLD_GIL)


def _held(rec: Record, known: _Known, lock_type: str, owner: int | None) -> Held:
    """A taken lock with its holder: the one it records, else the parent's threads
    working on its owner then (and not waiting on it in Condition.wait)."""
    if owner is not None:
        for t in rec.threads:
            if t.ident == owner:
                return Held(known, lock_type, [t], "recorded")
        # (a thread threading does not list: started with _thread, say)
        return Held(known, lock_type, [ThreadAtFork(owner, None, None, None)], "recorded")
    lock, related = known.lock(), _related_ids(known)
    matches = [t for t in rec.threads if t.released != id(lock) and t.selves & related]
    how = "unknown" if not matches else "inferred" if len(matches) == 1 else "one of"
    return Held(known, lock_type, matches, how)


def held_now(lock: Any) -> tuple[str, int | None] | None:
    """(its type, its holder's ident or None) if `lock` is taken, told by trying it:
    ``locked()`` and a recorded owner lag behind a lock taken by a thread that waited
    for it without the GIL and had not got the GIL back by the fork.  A taken lock is
    given back at once."""
    if isinstance(lock, _audit._BUFFERED):
        from forkguard import _cpython_io

        owner = _cpython_io._owner(lock, _cpython_io.layout())
        if owner:
            return _FILE_LOCK, owner
        return (_FILE_LOCK, None) if _cpython_io.lock_taken(lock) else None
    acquire = getattr(lock, "acquire", None)
    if acquire is None:
        return _audit._held_by(lock)
    if acquire(False):  # free (or the forking thread's own RLock): nothing to tell
        lock.release()
        return None
    return _audit._held_by(lock) or (type(lock).__qualname__, None)


_FILE_LOCK = "the file's C buffer lock"


def _file_owner_offset() -> int:
    from forkguard import _cpython_io

    return _cpython_io.layout().owner


def _frames_of(frame: Any) -> list[Frame]:
    """A thread's stack now, outermost first, its innermost _STACK_FRAMES frames."""
    stack: list[tuple[Any, int]] = []
    while frame is not None and len(stack) < _STACK_FRAMES:
        stack.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return _named(stack)


def _program_frames(stack: list[Frame]) -> list[Frame]:
    """`stack` without the frames of ``python -m forkguard doctor/run`` and runpy
    around the program."""
    for i in range(len(stack) - 1, -1, -1):
        function = stack[i][2]
        if function.startswith(("runpy.", "?._run_code", "forkguard._run.")):
            return stack[i + 1 :]
    return stack


def _named(stack: list[tuple[Any, int]]) -> list[Frame]:
    """(code, line) entries, innermost first, as (file, line, module.function),
    outermost first."""
    modules: dict[str, str] = {}
    for name, loaded in list(sys.modules.items()):
        path = getattr(loaded, "__file__", None)
        if isinstance(path, str):
            modules.setdefault(path, name)
    out = []
    for code, line in reversed(stack):
        module = modules.get(code.co_filename, "?")
        out.append((code.co_filename, line, f"{module}.{_qualname(code)}"))
    return out


def _qualname(code: Any) -> str:
    return str(getattr(code, "co_qualname", code.co_name))  # co_qualname: 3.11+


def _after_in_parent() -> None:
    if _records.pop(_get_ident(), None) is not None:
        with _records_lock():  # the last outstanding record restores the interval
            if not _records and _switch:
                sys.setswitchinterval(_switch.pop())
    if _dog is not None:
        _dog.start()


def _after_in_child() -> None:
    # As little as possible is written here: each page written costs the child a
    # copy (docs/design.md, "What runs at a fork").
    global _dog
    if _dog is not None:
        _dog = None  # a watchdog of the parent's did not come along
        if _c_hook:
            _index()
    if not _records:
        return
    rec = _records.get(_get_ident())
    _records.clear()  # (other threads' records: those threads are gone)
    if _switch:
        sys.setswitchinterval(_switch.pop())
    if rec is None:
        return
    rec.taken_now = _taken_now(rec)
    if _current is not None:
        _dog = _Watchdog(_current, rec)
        if _c_hook:
            _index()  # the C hook calls the Python look, which pauses it at a fork
        _dog.start()


# ------------------------------------------------------------ in the child


class _Watchdog:
    """The child's thread that notices its forking thread has stopped moving."""

    __slots__ = (
        *("done", "forks", "main", "native", "next_look", "position", "record"),
        *("reported", "since", "stop_", "watch"),
    )

    def __init__(self, watch: Watch, record: Record) -> None:
        self.watch = watch
        self.record = record
        self.main = _thread.get_ident()  # called in the child's only thread
        self.native = threading.get_native_id()
        # Where the thread was: ids only (a reference would keep a frame's locals
        # alive after it returned).
        self.position: tuple[int, int, int] | None = None
        self.since = self.next_look = 0.0
        self.reported: set[tuple[str, str]] = set()
        self.forks = 1  # forks under way in this process: the thread runs at 0

    def start(self) -> None:
        """After a fork in this process (and at first): run again once no fork is
        under way.  (The count under the parent-side lock: two threads may fork at
        once, and a lost update would leave the thread stopped, or running at a fork.)"""
        with _records_lock():
            self.forks -= 1
            if self.forks:
                return
            self.stop_ = _thread.allocate_lock()
            self.stop_.acquire()
            self.done = _thread.allocate_lock()
            self.done.acquire()
            self.position = None
            _thread.start_new_thread(self._run, ())  # (it takes no lock of ours)

    def pause(self) -> None:
        """Before a fork in this process: stop the thread and wait for it to end, so
        the new child is forked from a process without it."""
        with _records_lock():
            self.forks += 1
            first = self.forks == 1
            if first:
                self.stop_.release()
        if first:  # (not under the lock: this waits)
            self.done.acquire(timeout=5.0)

    def _run(self) -> None:
        try:
            # Signals are for the program's threads: one sent to the process must not
            # land here (a thread that blocks no signal is a valid target).
            signal = sys.modules.get("signal") or __import__("signal")
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            interval = min(self.watch.timeout / 5, _MAX_SAMPLE)
            while not self.stop_.acquire(timeout=interval):
                self._sample()
        except Exception as exc:  # never let the watchdog disturb the child
            _write(f"forkguard.watch: the watchdog stopped: {exc!r}\n")
        finally:
            self.done.release()

    def _sample(self) -> None:
        frame = sys._current_frames().get(self.main)
        if frame is None:
            return
        now = time.monotonic()
        position = (id(frame), id(frame.f_code), frame.f_lasti)
        if position != self.position:
            self.position, self.since = position, now
            return
        blocked = now - self.since
        if blocked < self.watch.timeout or now < self.next_look:
            return
        finding = diagnose(self.record, frame, self.native, blocked)
        self.next_look = now + self.watch.timeout  # nothing named: look again later
        if finding is None or finding.key in self.reported:
            return
        self.reported.add(finding.key)
        _write(str(finding) + "\n")
        if self.watch._on_hang is not None:
            self.watch._on_hang(finding)
        if self.watch.action == "exit":
            os._exit(HANG_EXIT_STATUS)


_dog: _Watchdog | None = None  # this child's watchdog


def _write(text: str) -> None:
    """To file descriptor 2, whole, without sys.stderr (its lock may be the one held)."""
    data = text.encode("utf-8", "replace")
    while data:
        try:
            data = data[os.write(2, data) :]
        except InterruptedError:
            continue
        except OSError:
            return


class Finding:
    """A hung child: where it is stuck, on which lock, who held that lock at the fork."""

    __slots__ = (
        *("blocked", "created", "fix", "holders", "how", "lock_type", "parent", "pid"),
        *("stuck", "what"),
    )

    def __init__(
        self,
        what: str,
        lock_type: str,
        holders: list[dict[str, Any]],
        how: str,
        fix: str,
        stuck: list[Frame],
        parent: int,
        blocked: float,
        created: list[Frame] | None = None,
    ) -> None:
        self.pid = os.getpid()
        self.parent = parent
        self.what = what
        self.lock_type = lock_type
        self.holders = holders  # each: name, ident, native_id, python, stack_at_fork
        self.how = how  # see Held.how
        self.fix = fix
        self.stuck = stuck
        self.blocked = blocked
        self.created = created  # where the lock's owner was made (tracemalloc)

    @property
    def key(self) -> tuple[str, str]:
        """The cause: the same lock held by the same thread(s) is one cause."""
        return (self.what, ", ".join(str(h["name"]) for h in self.holders))

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "parent_pid": self.parent,
            "blocked_seconds": round(self.blocked, 3),
            "stuck_at": _lines(self.stuck),
            "lock": {"what": self.what, "type": self.lock_type, "created_at": _lines(self.created)},
            "holders": [{**h, "stack_at_fork": _lines(h["stack_at_fork"])} for h in self.holders],
            "holder_known": self.how,
            "fix": self.fix,
        }

    def __str__(self) -> str:
        out = [
            f"forkguard.watch: child process {self.pid} (forked from {self.parent}) has been "
            f"stuck for {self.blocked:.1f} s on a lock that was held when it was forked",
            "  stuck at (innermost last):",
            *_indent(_lines(self.stuck), 4),
            f"  waiting for: {self.what} ({self.lock_type})",
        ]
        if self.created:
            out += ["    created at:", *_indent(_lines(self.created), 6)]
        out.append(f"  held at the fork by {_how_text(self.how, self.parent)}")
        for h in self.holders:
            kind = "thread" if h["python"] else "native thread"
            ident = f"ident {h['ident']}, " if h["ident"] is not None else ""
            out.append(f"    {kind} {h['name']!r} ({ident}native id {h['native_id']})")
            if h["stack_at_fork"]:
                out.append("      which was at (innermost last):")
                out += _indent(_lines(h["stack_at_fork"]), 8)
        out.append(f"  fix: {self.fix}")
        return "\n".join(out)


def _how_text(how: str, parent: int) -> str:
    return {
        "recorded": f"(as the lock records) this thread of process {parent}:",
        "inferred": (
            f"this thread of process {parent} (a plain Lock keeps no owner: this was the one "
            "thread working on the lock's owner then):"
        ),
        "one of": (
            f"one of these threads of process {parent} (a plain Lock keeps no owner: each was "
            "working on the lock's owner then):"
        ),
    }.get(how, f"a thread of process {parent} that the lock does not record")


def _holder(t: ThreadAtFork, python: bool = True) -> dict[str, Any]:
    return {
        "name": t.name,
        "ident": t.ident,
        "native_id": t.native_id,
        "python": python,
        "stack_at_fork": _named(t.stack),
    }


def _lines(frames: list[Frame] | None) -> list[str]:
    import linecache

    out = []
    for filename, line, function in frames or ():
        out.append(f'File "{filename}", line {line}, in {function}')
        source = linecache.getline(filename, line).strip() if line is not None else ""
        if source:
            out.append(f"  {source}")
    return out


def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + line for line in lines]


def diagnose(record: Record, frame: Any, native_id: int, blocked: float) -> Finding | None:
    """What the thread stopped at `frame` waits on, if it is a lock held at the fork
    (see the module's docstring for the three ways it is told); None otherwise."""
    if _waits_in(native_id) is False:  # the kernel says: not waiting for a lock
        return None
    stuck = _program_frames(_frames_of(frame))
    still = []
    for held in record.held:
        lock = held.known.lock()
        state = held_now(lock) if lock is not None else None
        if state is not None and not _childs(state[1]):  # (a child thread's: its own)
            still.append(held)
    near = _near_ids(frame)
    for held in still:
        if _related_ids(held.known) & near:
            return _finding(record, held, stuck, blocked)
    late = _taken_late(record, near)
    if late is not None:
        return _finding(record, late, stuck, blocked)
    if _calls_io(frame):
        files = [h for h in still if isinstance(h.known.lock(), _audit._BUFFERED)]
        if files:
            return _finding(record, files[0], stuck, blocked)
    return _futex_finding(record, native_id, stuck, blocked)


def _taken_late(record: Record, near: set[int]) -> Held | None:
    """A known lock the stuck frames refer to, taken at the fork (as the child found
    right after it) but not at the parent's look (a thread took it in the instant
    between), and still taken, with its holder told as at the fork."""
    seen = {id(h.known) for h in record.held}
    for known in list(_known.values()):
        if id(known) not in record.taken_now or id(known) in seen:
            continue
        lock = known.lock()
        if lock is None or not _related_ids(known) & near:
            continue
        state = held_now(lock)
        if state is not None and not _childs(state[1]):
            return _held(record, known, *state)
    return None


def _taken_now(record: Record) -> set[int]:
    """In the child, right after the fork (nothing has run yet): the known locks
    taken, by another thread than the forking one."""
    out = set()
    for known in list(_known.values()):
        lock = known.lock()
        state = held_now(lock) if lock is not None else None
        if state is not None and state[1] != record.forker:
            out.add(id(known))
    return out


def _childs(ident: int | None) -> bool:
    """True if `ident` is a thread threading knows in this (child) process: its lock is
    its own.  (Not the watchdog's own ident: a new thread can get the stack, and so
    the ident, of a parent's thread that did not come along.)"""
    return ident is not None and ident in _active


def _near_ids(frame: Any) -> set[int]:
    """ids of the local variables of the innermost frames (module frames passed
    over: their locals are the module's globals)."""
    ids: set[int] = set()
    if not _audit.gil_on():
        return ids
    for _ in range(_NEAR_FRAMES):
        if frame is None:
            break
        scope = frame.f_locals
        if scope is not frame.f_globals:
            ids.update(id(v) for v in scope.values())
        frame = frame.f_back
    return ids


def _related_ids(known: _Known) -> set[int]:
    """The lock and the objects built on it that a frame taking it would hold."""
    lock, container = known.lock(), known.container()
    objects = [lock, container]
    for name in ("not_empty", "not_full", "all_tasks_done", "_cond", "buffer"):
        objects.append(getattr(container, name, None))
    return {id(o) for o in objects if o is not None}  # (None: gone, or no such part)


def _calls_io(frame: Any) -> bool:
    """True if the line `frame` stopped at calls print() or a file method by name."""
    import dis

    line = frame.f_lineno
    current = None
    try:
        instructions = list(dis.get_instructions(frame.f_code))
    except Exception:  # a code object dis cannot read: not told
        return False
    for ins in instructions:
        if hasattr(ins, "line_number"):  # 3.13+: starts_line is a bool
            current = getattr(ins, "line_number")  # noqa: B009 (not in 3.10-3.12's stubs)
        elif ins.starts_line is not None:
            current = ins.starts_line
        if current == line and ins.opname in _LOADS and ins.argval in _IO_NAMES:
            return True
    return False


_LOADS = frozenset(("LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD"))


def _finding(record: Record, held: Held, stuck: list[Frame], blocked: float) -> Finding:
    fix = f"{held.known.fix}, or forkguard.protect() (python -m forkguard run) for every lock"
    holders = [_holder(t) for t in held.holders]
    return Finding(
        held.known.what,
        held.lock_type,
        holders,
        held.how,
        fix,
        stuck,
        record.parent,
        blocked,
        _created(held.known.container()),
    )


def _created(obj: object) -> list[Frame] | None:
    """Where `obj` was made, if tracemalloc traced it."""
    tracemalloc = sys.modules.get("tracemalloc")
    if tracemalloc is None or not tracemalloc.is_tracing() or obj is None:
        return None
    trace = tracemalloc.get_object_traceback(obj)
    if trace is None:
        return None
    return [(f.filename, f.lineno, "") for f in trace]


def _futex_finding(
    record: Record, native_id: int, stuck: list[Frame], blocked: float
) -> Finding | None:
    """Linux: the futex the thread waits on, if it is a pthread mutex whose owner was a
    thread of the parent."""
    found = futex_mutex(native_id)
    if found is None:
        return None
    address, owner = found
    python = {t.native_id: t for t in record.threads}
    if owner in python:
        holder = _holder(python[owner])
    else:
        comm = _audit._comm(owner, record.parent)
        if comm is None:
            return None  # no thread of the parent: not a mutex held at the fork
        holder = {"name": comm, "ident": None, "native_id": owner, "python": False}
        holder["stack_at_fork"] = []
    what = f"a pthread mutex at {address:#x} that forkguard does not know"
    fix = (
        "register that mutex: forkguard.register(<its cffi or ctypes pointer>) from "
        "Python, or forkguard_register_mutex() from C (docs/c-api.md)"
    )
    return Finding(
        what, "pthread_mutex_t", [holder], "recorded", fix, stuck, record.parent, blocked
    )


def _syscall(native_id: int) -> list[str] | None:
    """/proc's line for the system call thread `native_id` is in (Linux), split."""
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            return f.read().split()
    except OSError:
        return None


def _waits_in(native_id: int) -> bool | None:
    """Whether thread `native_id` waits in the futex call, where every lock wait
    ends (a thread reading a pipe or sleeping does not); None where unknown."""
    number = _FUTEX.get(os.uname().machine)
    fields = _syscall(native_id)
    if number is None or not fields or fields[0] == "running":
        return None
    return fields[0] == str(number)


def futex_mutex(native_id: int) -> tuple[int, int] | None:
    """(the mutex's address, its owner's thread id) if thread `native_id` of this
    process waits in the kernel on a pthread mutex that records an owner other than
    this process's threads; None otherwise, or where this cannot be read (not Linux,
    an unknown CPU, a C library whose layout is not checked)."""
    number = _FUTEX.get(os.uname().machine)
    fields = _syscall(native_id)
    if number is None or fields is None or len(fields) < 2 or fields[0] != str(number):
        return None
    from forkguard import _REGISTRY

    layout = _REGISTRY.backend.mutex_fields()
    if layout is None:
        return None
    lock_at, owner_at = layout
    word_address = int(fields[1], 16)
    mutex = word_address - lock_at
    try:  # /proc/self/mem: an unmapped address is an error here, not a crash
        fd = os.open("/proc/self/mem", os.O_RDONLY)
        try:
            word = int.from_bytes(os.pread(fd, 4, word_address), sys.byteorder, signed=True)
            owner = int.from_bytes(os.pread(fd, 4, mutex + owner_at), sys.byteorder, signed=True)
        finally:
            os.close(fd)
    except OSError:
        return None
    # A waited-on mutex has a non-zero lock word (a semaphore or a condition
    # variable waits on a zero); its owner is no thread of this process.
    if word == 0 or owner <= 0 or os.path.exists(f"/proc/self/task/{owner}"):
        return None
    return mutex, owner
