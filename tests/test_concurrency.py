"""Registry changes at awkward moments: inside fork hooks, in the child, mid-fork
collection, and forks of forks.  (8 threads registering while forking: test_threads.py;
a hold whose owner never lets go: test_hold.py.)"""

from __future__ import annotations

import gc
import sys
import threading
from types import ModuleType
from typing import Any

import forkguard

from forking import run_in_child
from test_c_objects import Holders

OK = 20.0


def held_by_a_thread(lock: Any) -> threading.Event:
    """Lock `lock` from a thread that keeps it until the returned event is set."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait()

    threading.Thread(target=hold, daemon=True).start()
    taken.wait()
    return done


def test_registering_inside_before_hooks_python_and_c(ext: ModuleType) -> None:
    """Registrations made by a before-hook count for the fork in progress."""
    lib = ext.lib
    lock = threading.Lock()
    mutex = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    made: list[forkguard.Registration] = []

    def before() -> None:
        if not made:
            made.append(forkguard.register(lock))
            made.append(forkguard.register(mutex, mutex_type="normal"))

    lock.acquire()  # a Lock records no owner: the child gets it reset
    holder = Holders(ext)
    holder.hold((lib.K_MUTEX, mutex, 1))  # another thread's: the child gets it reset
    try:
        with forkguard.at_fork(before=before):
            result = run_in_child(
                lambda: lock.acquire(blocking=False) and lib.pthread_mutex_trylock(mutex) == 0,
                deadline=OK,
            )
        assert result.status == "ok", result.detail
        assert [r.active for r in made] == [True, True]
    finally:
        for reg in made:
            reg.unregister()
        lock.release()
        holder.stop()


def test_registering_in_the_child_from_an_after_in_child_hook(ext: ModuleType) -> None:
    """In the child the registries are the child's own: registering works at once."""
    lib = ext.lib
    mutex = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)

    def after_in_child() -> None:
        forkguard.register(mutex, mutex_type="normal", name="child's")

    def child() -> bool:
        names = [r.name for r in forkguard.registrations()]
        # and the child's own registration protects the child's own forks
        Holders(ext).hold((lib.K_MUTEX, mutex, 1))  # a thread of the child holds it
        grandchild = run_in_child(lambda: lib.pthread_mutex_trylock(mutex) == 0, deadline=OK)
        return "child's" in names and grandchild.status == "ok"

    with forkguard.at_fork(after_in_child=after_in_child):
        result = run_in_child(child, deadline=OK)
    assert result.status == "ok", result.detail
    assert forkguard.registrations() == []  # the parent never saw it


def test_unregistering_from_a_child_hook_ends_it_in_the_child_only(ext: ModuleType) -> None:
    lib = ext.lib
    lock = threading.Lock()
    mutex = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    regs = [forkguard.register(lock), forkguard.register(mutex, mutex_type="normal")]
    ended: list[bool] = []

    def after_in_child() -> None:
        ended.extend(reg.unregister() for reg in regs)

    def child() -> bool:
        # Restored for this fork (the hook runs after restoring), gone for the next.
        lock.acquire()
        Holders(ext).hold((lib.K_MUTEX, mutex, 1))  # a thread of the child holds it
        grandchild = run_in_child(
            lambda: lib.pthread_mutex_trylock(mutex) != 0 and not lock.acquire(blocking=False),
            deadline=OK,
        )
        return ended == [True, True] and forkguard.registrations() == [hooks] and bool(grandchild)

    with forkguard.at_fork(after_in_child=after_in_child) as hooks:
        result = run_in_child(child, deadline=OK)
    assert result.status == "ok", result.detail
    assert all(reg.active for reg in regs)
    for reg in regs:
        reg.unregister()


def test_forks_of_forks_keep_restoring(ext: ModuleType) -> None:
    """Each generation's child restores what was registered, for four generations,
    with a thread in each generation holding the objects at its fork."""
    lib = ext.lib
    lock = threading.Lock()
    mutex = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)

    class MutexHolder:
        def __enter__(self) -> None:
            lib.pthread_mutex_lock(mutex)

        def __exit__(self, *exc: object) -> None:
            lib.pthread_mutex_unlock(mutex)

    def generation(depth: int) -> bool:
        assert lock.acquire(timeout=5) and lib.pthread_mutex_lock(mutex) == 0
        lock.release()
        lib.pthread_mutex_unlock(mutex)
        if depth == 0:
            return True
        done = [held_by_a_thread(lock), held_by_a_thread(MutexHolder())]
        try:
            return run_in_child(lambda: generation(depth - 1), deadline=OK).status == "ok"
        finally:
            for event in done:
                event.set()

    with forkguard.register(lock), forkguard.register(mutex, mutex_type="recursive"):
        done = [held_by_a_thread(lock), held_by_a_thread(MutexHolder())]
        try:
            result = run_in_child(lambda: generation(3), deadline=OK * 2)
        finally:
            for event in done:
                event.set()
    assert result.status == "ok", result.detail


def test_object_collected_while_a_fork_is_in_progress() -> None:
    """A before-hook drops the last reference to registered objects (one reset, one
    hold): their registrations end mid-fork, the others are still restored."""
    keep = threading.Lock()
    doomed: list[Any] = [threading.Lock(), threading.RLock()]
    regs = [
        forkguard.register(doomed[0]),
        forkguard.register(doomed[1], policy="hold"),
        forkguard.register(keep),
    ]
    gone: list[bool] = []

    def before() -> None:
        if doomed:
            doomed.clear()
            gc.collect()
            gone.append(not regs[0].active and not regs[1].active)

    keep.acquire()
    with forkguard.at_fork(before=before):
        result = run_in_child(
            lambda: keep.acquire(blocking=False) and len(forkguard.registrations()) == 2,
            deadline=OK,
        )
    keep.release()
    assert result.status == "ok", result.detail
    assert gone == [True]
    assert [r.active for r in regs] == [False, False, True]
    regs[2].unregister()


def test_objects_dropped_by_other_threads_while_forking() -> None:
    """Threads register objects and drop them without unregistering, so weakref
    callbacks end registrations concurrently with forks."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                lock = threading.Lock()
                lock.acquire()
                reg = forkguard.register(lock)
                del lock  # the registration ends here, by refcount
                assert not reg.active
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    keep = threading.Lock()
    keep.acquire()
    try:
        with forkguard.register(keep):
            for _ in range(40):
                result = run_in_child(lambda: keep.acquire(blocking=False), deadline=OK)
                assert result.status == "ok", result.detail
    finally:
        stop.set()
        for t in threads:
            t.join(OK)
        keep.release()
    assert not errors, errors


def test_failing_reset_leaves_no_object_half_restored(monkeypatch: Any) -> None:
    """One object's reset raises: it is reported, and every other object is restored."""
    reported: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    class Broken:
        def __forkguard_reset__(self) -> None:
            raise OSError("cannot reset")

    before, after, broken = threading.Lock(), threading.Lock(), Broken()
    before.acquire()
    after.acquire()
    with forkguard.register(before), forkguard.register(broken), forkguard.register(after):
        result = run_in_child(
            lambda: (
                before.acquire(blocking=False)
                and after.acquire(blocking=False)
                and [type(e) for e in reported] == [OSError]
            ),
            deadline=OK,
        )
    assert result.status == "ok", result.detail
    assert reported == []  # only the child's reset failed
    before.release()
    after.release()


def test_threads_racing_on_one_c_mutex_agree_on_who_ended_each_registration(
    ext: ModuleType,
) -> None:
    """unregister() of a C object takes no registry lock (the C core decides which of two
    racing calls ended a registration).  Threads register one mutex and unregister what
    they got, over and over, so they keep sharing registrations and ending them under
    each other: every registration is ended by exactly one call, none fails, and nothing
    is left registered afterwards, in Python or in C."""
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    count = forkguard._REGISTRY.backend.count()

    def race() -> tuple[dict[forkguard.Registration, int], int]:
        outcomes: list[list[tuple[forkguard.Registration, bool]]] = [[] for _ in range(6)]
        errors: list[BaseException] = []
        start = threading.Barrier(len(outcomes))

        def work(mine: list[tuple[forkguard.Registration, bool]]) -> None:
            try:
                start.wait(OK)
                for _ in range(1500):
                    reg = forkguard.register(m, mutex_type="normal")
                    mine.append((reg, reg.unregister()))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(mine,)) for mine in outcomes]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads often, between any two steps
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            sys.setswitchinterval(interval)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        ended_by: dict[forkguard.Registration, int] = {}
        for mine in outcomes:
            for reg, ended_here in mine:
                ended_by[reg] = ended_by.get(reg, 0) + ended_here
        assert set(ended_by.values()) == {1}, "a registration ended by none or by two calls"
        assert not any(reg.active for reg in ended_by)
        return ended_by, sum(map(len, outcomes))

    # On a loaded machine the threads may take turns without ever overlapping a
    # register() and an unregister(); race again until they did share registrations.
    for _ in range(20):
        ended_by, calls = race()
        if len(ended_by) < calls:
            break
    assert len(ended_by) < calls, "in 20 races the threads never shared a registration"
    assert forkguard._REGISTRY.backend.count() == count
    assert all(r.target is not m for r in forkguard.registrations())
    with forkguard.register(m, mutex_type="normal") as again:  # and it can be registered anew
        assert again.active
