"""Every bad input gets a clear exception and leaves the registry unchanged."""

from __future__ import annotations

import bz2
import gc
import gzip
import hashlib
import io
import multiprocessing
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from logging.handlers import QueueListener
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard import _REGISTRY

from conftest import LINUX


@pytest.fixture
def unchanged() -> Iterator[None]:
    """The Python and C registries are exactly as they were."""
    bystander = threading.Lock()
    keep = forkguard.register(bystander, name="bystander")  # must survive
    before = (forkguard.registrations(), _REGISTRY.backend.count())
    yield
    assert (forkguard.registrations(), _REGISTRY.backend.count()) == before
    assert keep.active
    keep.unregister()


class Slotted:
    __slots__ = ("lock",)

    def __forkguard_reset__(self) -> None: ...


class NotALock:
    def acquire(self) -> None: ...

    def release(self) -> None: ...


def _closed_file() -> Any:
    f = open(os.devnull, "w")  # noqa: SIM115 - closed on purpose, right away
    f.close()
    return f


def _detached_buffer() -> Any:
    buffered = io.BufferedWriter(io.FileIO(os.devnull, "w"))
    buffered.detach().close()
    return buffered


def _mp_listener() -> Any:
    return QueueListener(multiprocessing.get_context("fork").SimpleQueue())


def _gzip_file() -> Any:
    # For reading: closing it writes nothing, so the order in which the collector
    # frees it and its BytesIO does not matter.
    return gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(b"")), mode="rb")


def _pyio_file() -> Any:
    import _pyio

    return _pyio.BufferedWriter(_pyio.FileIO(os.devnull, "w"))


PY_CASES: dict[str, tuple[Callable[[], Any], dict[str, Any], type[Exception], str]] = {
    "None": (lambda: None, {}, TypeError, "cannot register None; supported: threading.Lock"),
    "float": (lambda: 1.5, {}, TypeError, "cannot register float; supported"),
    "str": (lambda: "lock", {}, TypeError, "cannot register str"),
    "object": (object, {}, TypeError, "cannot register object; supported"),
    "lock-like": (NotALock, {}, TypeError, "cannot register .*NotALock"),
    "SimpleQueue": (queue.SimpleQueue, {}, TypeError, "cannot register _queue.SimpleQueue"),
    "int without kind": (lambda: 4096, {}, TypeError, "integer address needs kind="),
    "bool": (lambda: True, {}, TypeError, "cannot register bool"),
    "no weakref": (Slotted, {}, TypeError, "weak references.*__weakref__"),
    "Condition on foreign lock": (
        lambda: threading.Condition(NotALock()),  # type: ignore[arg-type]
        {},
        TypeError,
        "Condition built on NotALock",
    ),
    "policy": (
        threading.Lock,
        {"policy": "keep"},
        ValueError,
        "policy must be 'reset' or 'hold', not 'keep'",
    ),
    "policy None": (threading.Lock, {"policy": None}, ValueError, "policy must be"),
    "timeout negative": (
        threading.Lock,
        {"timeout": -1},
        ValueError,
        "number of seconds from 0 to 1e\\+09, not -1",
    ),
    "timeout too long": (
        threading.Lock,
        {"timeout": 1e10},
        ValueError,
        "number of seconds from 0 to 1e\\+09, not 10000000000.0",
    ),
    "timeout nan": (threading.Lock, {"timeout": float("nan")}, ValueError, "not nan"),
    "timeout inf": (threading.Lock, {"timeout": float("inf")}, ValueError, "not inf"),
    "timeout str": (threading.Lock, {"timeout": "1"}, TypeError, "number of seconds or None"),
    "timeout bool": (threading.Lock, {"timeout": True}, TypeError, "not bool"),
    "name": (threading.Lock, {"name": 3}, TypeError, "name must be a str or None, not int"),
    "kind for Python object": (
        threading.Lock,
        {"kind": "pthread_mutex"},
        ValueError,
        "is a Python object, so leave kind=None",
    ),
    "unknown kind": (
        lambda: 4096,
        {"kind": "spinlock"},
        ValueError,
        "kind must be None, 'pthread_mutex', 'pthread_rwlock' or 'sem'",
    ),
    "value for Lock": (
        threading.Lock,
        {"value": 1},
        ValueError,
        "value= applies only to semaphores, not threading.Lock",
    ),
    "value negative": (threading.Semaphore, {"value": -1}, ValueError, "must be >= 0"),
    "value bool": (threading.Semaphore, {"value": True}, TypeError, "must be an int"),
    "value over bound": (
        lambda: threading.BoundedSemaphore(2),
        {"value": 3},
        ValueError,
        "must not exceed the BoundedSemaphore's bound \\(2\\)",
    ),
    "mutex_type for Lock": (
        threading.Lock,
        {"mutex_type": "normal"},
        ValueError,
        "mutex_type= applies only to pthread_mutex_t",
    ),
    "unknown mutex_type": (
        lambda: 4096,
        {"kind": "pthread_mutex", "mutex_type": "fast"},
        ValueError,
        "mutex_type must be None or one of",
    ),
    "hold an Event": (
        threading.Event,
        {"policy": "hold"},
        ValueError,
        "threading.Event cannot be .it has no lock of its own",
    ),
    "hold without acquire": (
        type("R", (), {"__forkguard_reset__": lambda self: None}),
        {"policy": "hold"},
        ValueError,
        "__forkguard_acquire__",
    ),
    "NULL address": (
        lambda: 0,
        {"kind": "pthread_mutex"},
        ValueError,
        "NULL pthread_mutex_t pointer",
    ),
    "negative address": (lambda: -8, {"kind": "sem"}, ValueError, "not a valid address"),
    "huge address": (lambda: 2**64, {"kind": "pthread_rwlock"}, ValueError, "not a valid address"),
    "value for rwlock": (
        lambda: 4096,
        {"kind": "pthread_rwlock", "value": 1},
        ValueError,
        "value= applies only to semaphores, not pthread_rwlock_t",
    ),
    "closed file": (_closed_file, {}, ValueError, "cannot register a closed io.TextIOWrapper"),
    "detached buffer": (_detached_buffer, {}, ValueError, "raw stream has been detached"),
    "raw file": (
        lambda: open(os.devnull, "wb", buffering=0),  # noqa: SIM115
        {},
        TypeError,
        "an unbuffered raw file has no lock and no buffer",
    ),
    "BytesIO": (io.BytesIO, {}, TypeError, "cannot register _io.BytesIO; supported"),
    "_pyio file": (_pyio_file, {}, TypeError, "not the pure-Python _pyio ones"),
    "hold a file": (
        lambda: open(os.devnull, "w"),  # noqa: SIM115
        {"policy": "hold"},
        ValueError,
        "io.TextIOWrapper cannot be .holding it would mean flushing it",
    ),
    "zlib compressor": (zlib.compressobj, {}, TypeError, "zlib.Compress: .* cut mid-call"),
    "bz2 decompressor": (bz2.BZ2Decompressor, {}, TypeError, "cut mid-call"),
    "gzip file": (_gzip_file, {}, TypeError, r"gzip\.GzipFile: .* open the file again"),
    "text over gzip": (
        lambda: io.TextIOWrapper(_gzip_file(), encoding="utf-8"),
        {},
        TypeError,
        r"io\.TextIOWrapper over gzip\.GzipFile",
    ),
    "listener over a multiprocessing queue": (
        _mp_listener,
        {},
        TypeError,
        "a multiprocessing queue already carries children's items",
    ),
    "hold a listener": (
        lambda: QueueListener(queue.Queue()),
        {"policy": "hold"},
        ValueError,
        "its queue is forwarded instead",
    ),
    "hold a hash": (
        hashlib.sha256,
        {"policy": "hold"},
        ValueError,
        "taken only inside CPython's C code",
    ),
    "mutex_type for rwlock": (
        lambda: 4096,
        {"kind": "pthread_rwlock", "mutex_type": "normal"},
        ValueError,
        "mutex_type= applies only to pthread_mutex_t",
    ),
}


@pytest.mark.parametrize("case", list(PY_CASES))
def test_bad_input(case: str, unchanged: None) -> None:
    make, kwargs, exc, message = PY_CASES[case]
    obj = make()
    with pytest.raises(exc, match=message):
        forkguard.register(obj, **kwargs)


MP_MAKERS = {
    "Lock": lambda ctx: ctx.Lock(),
    "RLock": lambda ctx: ctx.RLock(),
    "Semaphore": lambda ctx: ctx.Semaphore(),
    "BoundedSemaphore": lambda ctx: ctx.BoundedSemaphore(),
    "Condition": lambda ctx: ctx.Condition(),
    "Event": lambda ctx: ctx.Event(),
    "Barrier": lambda ctx: ctx.Barrier(2),
    "Queue": lambda ctx: ctx.Queue(),
    "SimpleQueue": lambda ctx: ctx.SimpleQueue(),
}


@pytest.mark.parametrize("name", list(MP_MAKERS))
def test_multiprocessing_objects_are_refused(name: str, unchanged: None) -> None:
    obj = MP_MAKERS[name](multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match=r"process-shared semaphore.*break them all"):
        forkguard.register(obj)


def test_manager_proxy_is_refused(unchanged: None) -> None:
    with multiprocessing.get_context("fork").Manager() as manager:
        lock = manager.Lock()
        with pytest.raises(TypeError, match="proxy for an object that lives in a manager"):
            forkguard.register(lock)


# ------------------------------------------------------------------ C objects


def test_null_cffi_pointer(ext: ModuleType, unchanged: None) -> None:
    with pytest.raises(ValueError, match="NULL pthread_mutex_t pointer"):
        forkguard.register(ext.ffi.cast("pthread_mutex_t *", 0))


def test_misaligned_address(ext: ModuleType, unchanged: None) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    address = int(ext.ffi.cast("uintptr_t", m)) + 1
    with pytest.raises(ValueError, match=r"misaligned.*multiple of 8"):
        forkguard.register(address, kind="pthread_mutex", mutex_type="normal")


def test_cffi_non_pointer(ext: ModuleType, unchanged: None) -> None:
    with pytest.raises(TypeError, match="must be a pointer to the lock, not a primitive"):
        forkguard.register(ext.ffi.cast("int", 5))


def test_cffi_pointer_to_something_else(ext: ModuleType, unchanged: None) -> None:
    with pytest.raises(TypeError, match="'int \\*' is not a lock forkguard knows"):
        forkguard.register(ext.ffi.new("int *"))


def test_untyped_cffi_pointer_needs_kind(ext: ModuleType, unchanged: None) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with pytest.raises(TypeError, match="cannot tell what the cffi pointer"):
        forkguard.register(ext.ffi.cast("void *", m))


def test_kind_contradicting_the_pointer(ext: ModuleType, unchanged: None) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with pytest.raises(ValueError, match="kind='sem' contradicts"):
        forkguard.register(m, kind="sem")


@pytest.mark.skipif(not LINUX, reason="mutex flags are read on Linux")
def test_process_shared_mutex(ext: ModuleType, unchanged: None) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 1, 0)
    with pytest.raises(TypeError, match=r"process-shared.*break the other processes"):
        forkguard.register(m)


@pytest.mark.skipif(not LINUX, reason="mutex flags are read on Linux")
def test_robust_mutex(ext: ModuleType, unchanged: None) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 1)
    with pytest.raises(TypeError, match="robust or priority-protect"):
        forkguard.register(m)


@pytest.mark.skipif(not LINUX, reason="rwlock flags are read on Linux")
def test_process_shared_rwlock(ext: ModuleType, unchanged: None) -> None:
    with pytest.raises(TypeError, match=r"pthread_rwlock_t at .* is process-shared"):
        forkguard.register(ext.lib.rwlock_new(1))


@pytest.mark.skipif(not _REGISTRY.backend.has_semaphores, reason="no unnamed semaphores")
def test_semaphore_value_over_sem_value_max(ext: ModuleType, unchanged: None) -> None:
    with pytest.raises(ValueError, match="at most SEM_VALUE_MAX"):
        forkguard.register(ext.lib.sem_new(0), value=2**40)


class _FullCore:
    """The C core as seen when its registry is full (the real limit, 16.7 million
    registrations, is reached in test_portable_core.py with a small-limit build)."""

    def __init__(self, lib: Any) -> None:
        self._real = lib

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def fgpy_register(self, *args: Any) -> int:
        return int(self._real.FORKGUARD_ENOMEM)


def test_full_registry_is_a_memory_error(
    ext: ModuleType, unchanged: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _REGISTRY.backend
    monkeypatch.setattr(backend, "_lib", _FullCore(backend._lib))  # type: ignore[union-attr]
    mutex = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with pytest.raises(MemoryError, match=r"registry is full \(at most 16,777,216"):
        forkguard.register(mutex, mutex_type="normal")


def test_many_registrations_use_bounded_memory(ext: ModuleType) -> None:
    """20,000 Python locks and 20,000 C mutexes registered and unregistered three
    times: what stays is the registry's tables (sized for the peak), the same every
    round, and the C slots are reused."""
    import tracemalloc

    lib = ext.lib
    count = 20_000
    locks = [threading.Lock() for _ in range(count)]
    mutexes = [lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0) for _ in range(count)]
    slots: list[set[int]] = []
    tracemalloc.start()
    try:
        # Each measure after a full collection, which also empties the interpreter's
        # free lists: freed tuples kept there for reuse count as traced memory, and how
        # full they were after a round was up to what ran before this test.
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        peaks, after = [], []
        for _ in range(3):
            regs = [forkguard.register(lock) for lock in locks]
            regs += [forkguard.register(m, mutex_type="normal") for m in mutexes]
            assert len(forkguard.registrations()) == 2 * count
            peaks.append(tracemalloc.get_traced_memory()[0] - start)
            used = {reg._handle & 0xFFFFFFFF for reg in regs[count:]}  # type: ignore[operator]
            if slots:
                assert used == slots[0]  # the same C slots, reused
            else:
                slots.append(used)
            del used
            for reg in regs:
                assert reg.unregister()
            del regs
            gc.collect()
            after.append(tracemalloc.get_traced_memory()[0] - start)
    finally:
        tracemalloc.stop()
        for m in mutexes:
            lib.lock_free(m)
    assert after[2] - after[0] < 64 * 1024, after  # nothing kept per round
    assert after[0] < peaks[0] / 2, (after, peaks)  # registrations are freed, not kept


def test_an_ended_registration_is_freed_at_once() -> None:
    """No reference cycle keeps an unregistered Registration (or its weak reference
    on a still-living object) waiting for the cyclic GC."""
    import gc
    import weakref

    lock = threading.Lock()
    gc.disable()
    try:
        reg = forkguard.register(lock)
        assert reg.unregister()
        gone = weakref.ref(reg)
        del reg
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("hooks", "match"),
    [
        ({}, "at_fork\\(\\) needs at least one of before, after_in_parent, after_in_child"),
        ({"before": 3}, "before must be callable or None, not int"),
        ({"after_in_child": "f"}, "after_in_child must be callable or None, not str"),
    ],
)
def test_at_fork_needs_callables(hooks: dict[str, Any], match: str, unchanged: None) -> None:
    with pytest.raises(TypeError, match=match):
        forkguard.at_fork(**hooks)


def test_docs_table_and_tests_agree() -> None:
    """docs/bad-input.md lists every case above, and every test it names exists."""
    import re
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    text = (tests.parent / "docs" / "bad-input.md").read_text()
    first_table = text.split("## `forkguard.register()`")[1].split("\n\n")[1]
    listed = set(re.findall(r"^\| (.*?) \|", first_table, re.M)) - {"case", "---"}
    cases = {c.strip("`") for row in listed for c in row.split(", ")}
    assert cases == set(PY_CASES)
    sources = {p.name: p.read_text() for p in tests.glob("test_*.py")}
    for name in re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", text):
        module, function = name
        where = [sources[module]] if module else list(sources.values())
        assert any(f"def {function}(" in src for src in where), name
