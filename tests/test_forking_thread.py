"""The forking-thread rule: in the child, what the forking thread held stays held for it
(it is the child's only thread, and it will release what it took); what threads that
vanished held is released.  Where an object records no owner, the rule cannot be
applied and the docs say exactly what happens instead; those cases are tested too.
"""

from __future__ import annotations

import ast
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard import _REGISTRY

from forking import run_in_child
from test_c_objects import Holders

OK = 20.0
EPERM = 1

owner_rule = pytest.mark.skipif(
    not getattr(_REGISTRY.backend, "owner_rule", False),
    reason="the C library's owner fields are read on glibc only",
)


def in_child(fn: Any) -> Any:
    """Run `fn` in a forked child, under a deadline, and return what it returned
    (ints, strings, booleans, lists and tuples of them, sent back through a pipe)."""
    read_end, write_end = os.pipe()

    def child() -> bool:
        os.write(write_end, repr(fn()).encode())
        return True

    try:
        result = run_in_child(child, deadline=OK)
        os.close(write_end)
        assert result.status == "ok", result.detail
        return ast.literal_eval(os.read(read_end, 65536).decode())
    finally:
        os.close(read_end)


@pytest.fixture
def holders(ext: ModuleType) -> Iterator[Holders]:
    h = Holders(ext)
    yield h
    h.stop()


TYPES = {"normal": 0, "recursive": 1, "errorcheck": 2, "adaptive": 3}


def _own_and_vanished(ext: ModuleType, holders: Holders, type_name: str) -> tuple[Any, Any, int]:
    """A mutex this (forking) thread holds, `depth` deep, and one a native thread holds."""
    lib = ext.lib
    mine = lib.mutex_new(TYPES[type_name], 0, 0)
    theirs = lib.mutex_new(TYPES[type_name], 0, 0)
    depth = 2 if type_name == "recursive" else 1
    for _ in range(depth):
        assert lib.pthread_mutex_lock(mine) == 0
    holders.hold((lib.K_MUTEX, theirs, depth))
    return mine, theirs, depth


def _child_view(lib: Any, mine: Any, theirs: Any, depth: int) -> Any:
    def child() -> tuple[list[int], int, int, int]:
        unlocks = [lib.pthread_mutex_unlock(mine) for _ in range(depth)]
        relock = lib.pthread_mutex_trylock(mine)
        lib.pthread_mutex_unlock(mine)
        destroy = lib.pthread_mutex_destroy(mine)  # EBUSY if its count went wrong
        return unlocks, relock, destroy, lib.pthread_mutex_trylock(theirs)

    return child


@owner_rule
@pytest.mark.parametrize("type_name", list(TYPES))
def test_mutexes_of_every_type(ext: ModuleType, holders: Holders, type_name: str) -> None:
    lib = ext.lib
    mine, theirs, depth = _own_and_vanished(ext, holders, type_name)
    try:
        # Without forkguard: the vanished thread's mutex stays locked in the child, and
        # (recursive, errorcheck) the forking thread cannot unlock its own.
        unlocks, _, _, trylock_theirs = in_child(_child_view(lib, mine, theirs, depth))
        assert trylock_theirs == ext.lib.EBUSY
        if type_name in ("recursive", "errorcheck"):
            assert unlocks[0] == EPERM

        with forkguard.register(mine), forkguard.register(theirs):
            seen = in_child(_child_view(lib, mine, theirs, depth))
        # every unlock of its own worked, the count is right (destroy succeeds), and
        # the vanished thread's mutex is free
        assert seen == ([0] * depth, 0, 0, 0)
    finally:
        for _ in range(depth):
            lib.pthread_mutex_unlock(mine)


@owner_rule
def test_normal_mutex_of_the_forking_thread_is_still_held_in_the_child(ext: ModuleType) -> None:
    """The child's trylock from the forking thread fails as it would in the parent."""
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    lib.pthread_mutex_lock(m)
    try:
        with forkguard.register(m):
            assert in_child(lambda: lib.pthread_mutex_trylock(m)) == lib.EBUSY
    finally:
        lib.pthread_mutex_unlock(m)


@owner_rule
def test_rwlock_written_by_the_forking_thread(ext: ModuleType, holders: Holders) -> None:
    lib = ext.lib
    mine, theirs = lib.rwlock_new(0), lib.rwlock_new(0)
    assert lib.pthread_rwlock_wrlock(mine) == 0
    holders.hold((lib.K_WRLOCK, theirs, 1))

    def child() -> tuple[int, int, int, int]:
        busy = lib.pthread_rwlock_tryrdlock(mine)  # still written by this thread
        return (
            busy,
            lib.pthread_rwlock_unlock(mine),
            lib.pthread_rwlock_trywrlock(mine),
            (lib.pthread_rwlock_trywrlock(theirs)),
        )

    try:
        assert in_child(child)[3] == lib.EBUSY  # without forkguard
        with forkguard.register(mine), forkguard.register(theirs):
            assert in_child(child) == (lib.EBUSY, 0, 0, 0)
    finally:
        lib.pthread_rwlock_unlock(mine)


def test_rwlock_read_by_the_forking_thread_comes_back_free(ext: ModuleType) -> None:
    """Documented limit: an rwlock records no readers, so forkguard cannot tell the
    forking thread's read lock from a vanished thread's.  The child gets the rwlock
    free; the forking thread must not unlock its read lock there (docs/design.md)."""
    lib = ext.lib
    rw = lib.rwlock_new(0)
    assert lib.pthread_rwlock_rdlock(rw) == 0
    try:
        with forkguard.register(rw):
            # free: no reader left, the forking thread's included
            assert in_child(lambda: lib.pthread_rwlock_trywrlock(rw)) == 0
    finally:
        lib.pthread_rwlock_unlock(rw)


@pytest.mark.skipif(not _REGISTRY.backend.has_semaphores, reason="no unnamed semaphores")
def test_sem_t_comes_back_with_its_registered_count(ext: ModuleType) -> None:
    """Documented limit: a semaphore records no holders, so the child gets the count
    registered (by default the count at registration), whoever held units at the fork."""
    lib, ffi = ext.lib, ext.ffi
    sem = lib.sem_new(2)
    with forkguard.register(sem):  # count 2
        assert lib.sem_wait(sem) == 0  # this thread takes one unit

        def child() -> int:
            value = ffi.new("int *")
            lib.sem_getvalue(sem, value)
            return int(value[0])

        assert in_child(child) == 2
        lib.sem_post(sem)


@owner_rule
def test_mutex_reinitialised_as_another_type_comes_back_as_that_type(
    ext: ModuleType, holders: Holders
) -> None:
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with forkguard.register(m) as reg:
        assert reg.kind == "pthread_mutex_t (normal)"
        assert lib.mutex_reinit(m, lib.PTHREAD_MUTEX_RECURSIVE) == 0
        assert reg.kind == "pthread_mutex_t (recursive; registered as normal)"
        holders.hold((lib.K_MUTEX, m, 1))  # a vanished thread's, at the fork

        def child() -> tuple[int, int]:
            return lib.pthread_mutex_lock(m), lib.pthread_mutex_lock(m)  # recursive

        assert in_child(child) == (0, 0)
        holders.stop()


@owner_rule
def test_hold_of_a_mutex_the_forking_thread_owns_does_not_wait(ext: ModuleType) -> None:
    """No timeout against itself (a HoldTimeoutWarning is an error in this suite); the
    child keeps the forking thread's ownership and the parent too."""
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_ERRORCHECK, 0, 0)
    lib.pthread_mutex_lock(m)
    try:
        with forkguard.register(m, policy="hold", timeout=5) as reg:
            # the child's unlock of its own mutex works
            assert in_child(lambda: lib.pthread_mutex_unlock(m)) == 0
            assert reg.hold_timeouts == 0
        assert lib.pthread_mutex_trylock(m) == lib.EBUSY  # still ours in the parent
    finally:
        assert lib.pthread_mutex_unlock(m) == 0


@owner_rule
def test_hold_of_a_recursive_mutex_keeps_the_forking_threads_depth(ext: ModuleType) -> None:
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    lib.pthread_mutex_lock(m)
    try:
        with forkguard.register(m, policy="hold"):
            seen = in_child(lambda: (lib.pthread_mutex_unlock(m), lib.pthread_mutex_unlock(m)))
        assert seen == (0, EPERM)  # one level was ours, the hold's is gone
    finally:
        assert lib.pthread_mutex_unlock(m) == 0


def test_python_rlock_of_the_forking_thread_stays_held() -> None:
    rlock = threading.RLock()
    with forkguard.register(rlock), rlock:
        assert in_child(rlock._is_owned) is True  # type: ignore[attr-defined]


def test_python_lock_of_the_forking_thread_comes_back_free() -> None:
    """Documented limit: a threading.Lock records no owner, so the child gets it
    unlocked, whoever held it; a release there raises RuntimeError (no corruption)."""
    lock = threading.Lock()
    with forkguard.register(lock), lock:

        def child() -> str:
            assert not lock.locked()
            try:
                lock.release()
            except RuntimeError as exc:
                return str(exc)
            return "released"

        assert in_child(child) == "release unlocked lock"


class OtherHolder:
    """A thread inside `with sem:` until stopped."""

    def __init__(self, sem: Any) -> None:
        self._has_it, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sem,), daemon=True)
        self._thread.start()
        self._has_it.wait()

    def _run(self, sem: Any) -> None:
        with sem:
            self._has_it.set()
            self._done.wait()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)


@pytest.mark.parametrize("maker", [threading.Semaphore, threading.BoundedSemaphore])
@pytest.mark.parametrize("policy", ["reset", "hold"])
def test_python_semaphore_units_of_the_forking_thread(maker: Any, policy: str) -> None:
    """`with sem: os.fork()` with another thread inside too: in the child the forking
    thread releases its own unit itself, and the vanished thread's unit must come back.
    Without forkguard it is lost; a count restored blindly to 3 would let the child's
    own release over-count (a BoundedSemaphore raises)."""
    sem = maker(3)

    def child() -> tuple[int, int, list[bool]]:
        before = sem._value  # type: ignore[attr-defined]
        sem.release()  # the `with` block around the fork ends in the child too
        after = sem._value  # type: ignore[attr-defined]
        return before, after, [sem.acquire(blocking=False) for _ in range(3)]

    other = OtherHolder(sem)
    with sem:
        assert in_child(child) == (1, 2, [True, True, False])  # without forkguard
    other.stop()

    with forkguard.register(sem, policy=policy, timeout=5) as reg:  # count 3
        assert type(sem) is not maker and type(sem).__name__ == maker.__name__
        other = OtherHolder(sem)
        with sem:
            assert in_child(child) == (2, 3, [True, True, True])
        other.stop()
        assert reg.hold_timeouts == 0
    assert type(sem) is maker  # unregistered: its own class again
    assert sem._value == 3  # type: ignore[attr-defined]


def test_hold_of_a_semaphore_whose_units_the_forking_thread_holds_does_not_wait() -> None:
    """No timeout against itself (a HoldTimeoutWarning is an error in this suite)."""
    sem = threading.BoundedSemaphore(1)
    with forkguard.register(sem, policy="hold", timeout=5) as reg, sem:
        assert in_child(lambda: (sem.release(), sem._value)[1]) == 1  # type: ignore[attr-defined]
        assert reg.hold_timeouts == 0
    assert sem._value == 1  # type: ignore[attr-defined]
