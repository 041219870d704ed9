"""Python objects held (or waited on) by another thread at fork time."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import forkguard

from forking import run_in_child

HANG = 1.0
OK = 20.0


@dataclass
class Case:
    make: Callable[[], Any]
    take: Callable[[Any], object]  # what the other thread does and keeps
    give: Callable[[Any], object]
    use: Callable[[Any], object]  # what the child does; hangs if not restored


def _lock_case(make: Callable[[], Any]) -> Case:
    return Case(make, lambda o: o.acquire(), lambda o: o.release(), lambda o: o.acquire())


def _queue_case(make: Callable[[], Any]) -> Case:
    def use(q: Any) -> None:
        q.put(3)
        assert q.get() is not None

    return Case(make, lambda q: q.mutex.acquire(), lambda q: q.mutex.release(), use)


def _event_use(e: threading.Event) -> None:
    e.set()
    assert e.wait()


CASES = {
    "Lock": _lock_case(threading.Lock),
    "RLock": _lock_case(threading.RLock),
    "Condition": Case(
        threading.Condition,
        lambda c: c.acquire(),
        lambda c: c.release(),
        lambda c: (c.acquire(), c.notify_all(), c.release()),
    ),
    "Condition(Lock)": Case(
        lambda: threading.Condition(threading.Lock()),
        lambda c: c.acquire(),
        lambda c: c.release(),
        lambda c: (c.acquire(), c.notify_all(), c.release()),
    ),
    "Semaphore": _lock_case(lambda: threading.Semaphore(1)),
    "BoundedSemaphore": _lock_case(lambda: threading.BoundedSemaphore(1)),
    # An Event's own lock is held only inside set()/clear()/wait(); hold it
    # the way a thread caught mid-set() would.
    "Event": Case(
        threading.Event, lambda e: e._cond.acquire(), lambda e: e._cond.release(), _event_use
    ),
    "Queue": _queue_case(queue.Queue),
    "LifoQueue": _queue_case(queue.LifoQueue),
    "PriorityQueue": _queue_case(queue.PriorityQueue),
}


class Holder:
    """A Python thread that takes something and keeps it until told to give it back."""

    def __init__(self, take: Callable[[], object], give: Callable[[], object]) -> None:
        self._held = threading.Event()
        self._release = threading.Event()

        def run() -> None:
            take()
            self._held.set()
            self._release.wait()
            give()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert self._held.wait(10)

    def stop(self) -> None:
        self._release.set()
        self._thread.join(10)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        h.stop()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("protect", [False, True], ids=["bare", "registered"])
def test_object_held_by_another_thread(name: str, protect: bool, holders: list[Holder]) -> None:
    case = CASES[name]
    obj = case.make()
    reg = forkguard.register(obj) if protect else None  # registered while still unused
    holders.append(Holder(lambda: case.take(obj), lambda: case.give(obj)))
    result = run_in_child(lambda: case.use(obj), deadline=OK if protect else HANG)
    if reg is None:
        assert result.status == "hung"
    else:
        assert reg.kind.endswith(name.split("(", maxsplit=1)[0])
        assert result.status == "ok", result.detail
        assert reg.unregister()


def test_condition_waiter_from_a_vanished_thread_does_not_eat_notify() -> None:
    """A notify() in the child must wake a live waiter, not the parent thread's ghost."""
    cond = threading.Condition()
    entered = threading.Event()

    def wait_forever() -> None:
        with cond:
            entered.set()
            cond.wait()

    threading.Thread(target=wait_forever, daemon=True).start()
    assert entered.wait(10)
    with cond:  # the waiter is inside wait() now
        pass

    def child() -> None:
        woke = threading.Event()

        def waiter() -> None:
            with cond:
                ready.set()
                cond.wait()
            woke.set()

        ready = threading.Event()
        t = threading.Thread(target=waiter)
        t.start()
        ready.wait()
        with cond:
            cond.notify()  # exactly one: must reach the live waiter
        t.join()  # hangs if the notify went to the vanished thread

    assert run_in_child(child, deadline=HANG).status == "hung"
    with forkguard.register(cond):
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    with cond:
        cond.notify_all()


def test_queue_consumer_blocked_in_get_at_fork() -> None:
    """The parent's consumer waits in get(); in the child a new consumer must get the item."""
    q: queue.Queue[int] = queue.Queue()
    consumer = threading.Thread(target=q.get, daemon=True)
    consumer.start()
    while not q.not_empty._waiters:  # type: ignore[attr-defined]
        threading.Event().wait(0.001)

    def child() -> None:
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(q.get()))
        t.start()
        while not q.not_empty._waiters or len(q.not_empty._waiters) < (  # type: ignore[attr-defined]
            1 if registered else 2
        ):
            threading.Event().wait(0.001)
        q.put(7)  # one notify: must wake the live consumer
        t.join()
        assert got == [7]

    registered = False
    assert run_in_child(child, deadline=HANG).status == "hung"
    registered = True
    with forkguard.register(q):
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    q.put(0)
    consumer.join(10)


def test_queue_keeps_its_items(holders: list[Holder]) -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(5):
        q.put(i)
    holders.append(Holder(q.mutex.acquire, q.mutex.release))
    with forkguard.register(q):
        assert run_in_child(lambda: [q.get_nowait() for _ in range(5)] == [0, 1, 2, 3, 4])


def test_semaphore_gets_its_registration_value_back(holders: list[Holder]) -> None:
    sem = threading.Semaphore(2)
    holders.append(
        Holder(lambda: (sem.acquire(), sem.acquire()), lambda: (sem.release(), sem.release()))
    )

    def child() -> None:
        assert sem.acquire()
        assert sem.acquire()
        assert not sem.acquire(blocking=False)

    assert run_in_child(child, deadline=HANG).status == "hung"
    with forkguard.register(sem, value=2):  # its count now is 0
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail


def test_rlock_owned_by_the_forking_thread_stays_owned() -> None:
    rlock = threading.RLock()
    with forkguard.register(rlock), rlock:

        def child() -> None:
            assert rlock._is_owned()  # type: ignore[attr-defined]
            rlock.release()  # the thread's own `with` block would do this
            assert not rlock._is_owned()  # type: ignore[attr-defined]
            assert rlock.acquire(blocking=False)

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail


class SelfResetting:
    """An object that restores itself: the __forkguard_reset__ protocol."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resets = 0

    def __forkguard_reset__(self) -> None:
        self.resets += 1
        self.lock = threading.Lock()


def test_forkguard_reset_protocol(holders: list[Holder]) -> None:
    obj = SelfResetting()

    def take() -> bool:  # obj.lock is looked up at call time: the reset replaces it
        return obj.lock.acquire()

    def give() -> None:
        obj.lock.release()

    holders.append(Holder(take, give))
    assert run_in_child(take, deadline=HANG).status == "hung"
    with forkguard.register(obj) as reg:
        assert reg.kind.endswith("SelfResetting")

        def child() -> None:
            assert obj.resets == 1
            assert obj.lock.acquire()

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    assert obj.resets == 0  # never called in the parent


@pytest.mark.parametrize("call", ["acquire", "release"])
def test_a_semaphore_unregistered_during_a_call_in_another_thread(call: str) -> None:
    """A thread inside a registered semaphore's acquire() or release() when another
    thread unregisters it: the call completes as a plain semaphore's would.  Simulated
    in process: the tracking class's method, looked up before the unregister, runs
    after it."""
    sem = threading.BoundedSemaphore(1)
    reg = forkguard.register(sem, policy="hold")
    method = getattr(type(sem), call)
    if call == "release":
        sem.acquire()
    reg.unregister()
    assert type(sem) is threading.BoundedSemaphore
    assert method(sem) is (True if call == "acquire" else None)
    assert sem._value == (0 if call == "acquire" else 1)  # type: ignore[attr-defined]
