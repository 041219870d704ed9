"""Fork storms: eight threads hammer every kind of object while the main thread forks.

The default run makes 500 forks; ``pytest tests/test_storm.py --fork-storm-forks 5000``
is the full storm.  Both go through forkguard.testing.fork_stress, the tool
extension authors get.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard.testing import StressReport

Stress = Callable[..., StressReport]

# Take-and-release rounds per C call (about a millisecond, the GIL released): long
# enough that workers are still inside, holding, while the main thread forks.
ROUNDS = 2000


class Objects:
    """One of each: C mutexes (normal, recursive), an rwlock, a semaphore, and the
    Python Lock, RLock, Condition and Queue."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext
        lib = ext.lib
        self.mutex = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
        self.recursive = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
        self.rwlock = lib.rwlock_new(0)
        self.sem = lib.sem_new(2)
        self.lock = threading.Lock()
        self.rlock = threading.RLock()
        self.cond = threading.Condition()
        self.queue: queue.Queue[int] = queue.Queue()
        self.c_objects = [self.mutex, self.recursive, self.rwlock, self.sem]
        self.py_objects = [self.lock, self.rlock, self.cond, self.queue]

    def register_all(self, stack: ExitStack) -> None:
        for obj in self.py_objects:
            stack.enter_context(forkguard.register(obj))
        stack.enter_context(forkguard.register(self.mutex, mutex_type="normal"))
        stack.enter_context(forkguard.register(self.recursive, mutex_type="recursive"))
        stack.enter_context(forkguard.register(self.rwlock))
        stack.enter_context(forkguard.register(self.sem, value=2))

    def step_for(self, index: int) -> Callable[[], None]:
        """Thread `index`'s workload: even threads work the C objects (in C, the GIL
        released), odd ones the Python objects; one operation on each, from its own start."""
        lib = self.ext.lib
        rw_kind = lib.K_WRLOCK if index % 4 else lib.K_RDLOCK
        c_ops: list[Callable[[], Any]] = [
            lambda: lib.churn(lib.K_MUTEX, self.mutex, 1, ROUNDS),
            lambda: lib.churn(lib.K_MUTEX, self.recursive, 2, ROUNDS),
            lambda: lib.churn(rw_kind, self.rwlock, 1, ROUNDS),
            lambda: lib.churn(lib.K_SEM, self.sem, 1, ROUNDS),
        ]
        py_ops: list[Callable[[], Any]] = [
            self._use_lock,
            self._use_rlock,
            self._use_condition,
            lambda: self._use_queue(index),
        ]
        ops = py_ops if index % 2 else c_ops
        start = (index // 2) % len(ops)
        ops = ops[start:] + ops[:start]

        def step() -> None:
            for op in ops:
                op()

        return step

    def _use_lock(self) -> None:
        with self.lock:
            sum(range(50))

    def _use_rlock(self) -> None:
        with self.rlock, self.rlock:
            sum(range(50))

    def _use_condition(self) -> None:
        with self.cond:
            self.cond.notify()
            self.cond.wait(0.0005)  # leaves waiters behind at some forks

    def _use_queue(self, index: int) -> None:
        self.queue.put(index)
        self.queue.get(timeout=5)  # each get follows its own put: never empty for long

    def take_everything(self) -> None:
        """In the child: every object, taken and given back."""
        lib = self.ext.lib
        assert lib.pthread_mutex_lock(self.mutex) == 0
        assert lib.pthread_mutex_lock(self.recursive) == 0
        assert lib.pthread_mutex_lock(self.recursive) == 0
        assert lib.pthread_rwlock_wrlock(self.rwlock) == 0
        assert lib.sem_wait(self.sem) == 0
        assert lib.sem_wait(self.sem) == 0  # its full registration value
        for _ in range(2):
            lib.sem_post(self.sem)
        lib.pthread_rwlock_unlock(self.rwlock)
        for m in (self.recursive, self.recursive, self.mutex):
            lib.pthread_mutex_unlock(m)
        with self.lock, self.rlock, self.rlock, self.cond:
            self.cond.notify_all()
        self.queue.put(-1)
        assert self.queue.get(timeout=1) is not None


@pytest.fixture
def objects(ext: ModuleType) -> Iterator[Objects]:
    objs = Objects(ext)
    yield objs
    if not any(t.name.startswith("fork_stress-") for t in threading.enumerate()):
        for p in objs.c_objects:  # every worker has stopped: nothing uses them
            ext.lib.lock_free(p)


def test_storm_with_everything_registered(objects: Objects, fork_stress: Stress) -> None:
    with ExitStack() as stack:
        objects.register_all(stack)
        report = fork_stress(objects.step_for, objects.take_everything, threads=8)
    print(report)
    assert report.clean, str(report)
    assert report.steps > 0


def test_storm_without_registration_hangs(objects: Objects, fork_stress: Stress) -> None:
    """The same storm, bare: a child inherits a held object and hangs (bounded: the
    storm stops at the first child that is not ok)."""
    report = fork_stress(
        objects.step_for,
        objects.take_everything,
        threads=8,
        forks=300,
        deadline=2,
        max_problems=1,
    )
    print(report)
    assert report.hung == 1, str(report)
    assert report.crashed == report.failed == 0, report
    assert not report.worker_errors and not report.stuck_threads, report


def test_storm_with_c_api_registrations_and_c_forks(
    objects: Objects, fork_stress: Stress, gilprobe: ModuleType
) -> None:
    """The storm above, plus a thread that registers and unregisters C mutexes, holds and
    hooks through the C API with the GIL held (as tp_new/tp_dealloc do), and a thread
    that forks from C with the GIL held, while the main thread calls os.fork()."""

    def c_api_user() -> None:
        gilprobe.free_mutex(*gilprobe.new_mutex())  # reset policy
        gilprobe.free_mutex(*gilprobe.new_mutex(1))  # hold policy
        gilprobe.unregister(gilprobe.new_hooks())
        time.sleep(0.0002)  # let the main thread have the GIL now and then

    def c_forker() -> None:
        assert gilprobe.c_fork_gil_held() == 0
        time.sleep(0.0002)

    def step_for(index: int) -> Callable[[], None]:
        return {8: c_api_user, 9: c_forker}.get(index) or objects.step_for(index)

    with ExitStack() as stack:
        objects.register_all(stack)
        report = fork_stress(step_for, objects.take_everything, threads=10)
    print(report)
    assert report.clean, str(report)
    assert report.steps > 0
