"""Hypothesis: any sequence of register / unregister / fork leaves exactly the live
registrations restored in the child, and the registry's bookkeeping consistent."""

from __future__ import annotations

import gc
import queue
import threading
from types import ModuleType
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import forkguard
from forkguard import _REGISTRY

from forking import run_in_child
from test_c_objects import Holders

N = 4  # Python locks 0..N-1 and C mutexes N..2N-1

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("register"), st.integers(0, 2 * N - 1), st.sampled_from(["reset", "hold"])
        ),
        st.tuples(st.just("unregister"), st.integers(0, 2 * N - 1), st.just("")),
        st.tuples(st.just("fork"), st.just(0), st.just("")),
    ),
    max_size=14,
)


# The forking thread holds every lock, so a hold (timeout 0) falls back to reset.
@pytest.mark.filterwarnings("ignore::forkguard.HoldTimeoutWarning")
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops)
def test_register_unregister_fork_sequences(
    ext: ModuleType, sequence: list[tuple[str, int, str]]
) -> None:
    lib = ext.lib
    py_locks = [threading.Lock() for _ in range(N)]
    c_locks = [lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0) for _ in range(N)]
    objects: list[Any] = [*py_locks, *c_locks]
    regs: dict[int, forkguard.Registration] = {}
    c_count = _REGISTRY.backend.count()
    for lock in py_locks:
        lock.acquire()  # a Lock has no owner: reset shows as "free in the child"
    # C mutexes held by another thread (the forking thread would keep its own)
    holder = Holders(ext)
    holder.hold(*[(lib.K_MUTEX, m, 1) for m in c_locks])
    try:
        for op, i, policy in sequence:
            if op == "register":
                if i in regs:
                    if regs[i].policy == policy:
                        assert forkguard.register(objects[i], policy=policy, timeout=0) is regs[i]
                    continue
                kwargs: dict[str, Any] = {"mutex_type": "normal"} if i >= N else {}
                regs[i] = forkguard.register(objects[i], policy=policy, timeout=0, **kwargs)
            elif op == "unregister":
                reg = regs.pop(i, None)
                if reg is not None:
                    assert reg.unregister() is True
                    assert reg.unregister() is False
            else:
                live = set(regs)

                def child(live: set[int] = live) -> None:
                    for j, obj in enumerate(objects):
                        free = (
                            obj.acquire(blocking=False)
                            if j < N
                            else lib.pthread_mutex_trylock(obj) == 0
                        )
                        assert free == (j in live), (j, live)
                    assert {r.target is not None for r in forkguard.registrations()} <= {True}
                    assert len(forkguard.registrations()) == len(live)

                result = run_in_child(child, deadline=20)
                assert result.status == "ok", result.detail
            assert forkguard.registrations() == sorted(regs.values(), key=lambda r: r._token)
            assert _REGISTRY.backend.count() == c_count + sum(1 for j in regs if j >= N)
    finally:
        for reg in regs.values():
            reg.unregister()
        for lock in py_locks:
            lock.release()
        holder.stop()
    assert _REGISTRY.backend.count() == c_count


class RegistryModel(RuleBasedStateMachine):
    """The registry against a model: objects come and go, registrations are made,
    repeated and ended, and objects are dropped; after every step the registry lists
    exactly the model's live registrations, and a fork restores exactly those.

    Every object is held (Python objects by this forking thread, which a reset
    ignores since they record no owner; C objects by a native thread of their own), so
    "restored" shows in the child as "free"; objects no longer registered stay held.
    """

    ext: ModuleType  # set by the test below
    PYTHON_KINDS = ("lock", "semaphore", "queue")
    OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {
        "mutex": {"mutex_type": "normal"},
        "semaphore": {"value": 1},  # its count when free: it is registered held
    }

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[int, tuple[str, Any]] = {}  # number -> (kind, object)
        self.live: dict[int, forkguard.Registration] = {}  # number -> registration
        self.ended: list[forkguard.Registration] = []
        self.made = 0
        self.c_count = _REGISTRY.backend.count()
        self.holders = Holders(self.ext)

    objs = Bundle("objects")

    @rule(target=objs, kind=st.sampled_from(["lock", "semaphore", "queue", "mutex", "rwlock"]))
    def new_object(self, kind: str) -> int:
        lib = self.ext.lib
        obj: Any
        if kind == "lock":
            obj = threading.Lock()
            obj.acquire()
        elif kind == "semaphore":
            obj = threading.Semaphore(1)
            obj.acquire()
        elif kind == "queue":
            obj = queue.Queue()
            obj.mutex.acquire()
        elif kind == "mutex":
            obj = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
            self.holders.hold((lib.K_MUTEX, obj, 1))
        else:
            obj = lib.rwlock_new(0)
            self.holders.hold((lib.K_WRLOCK, obj, 1))
        self.made += 1
        self.objects[self.made] = (kind, obj)
        return self.made

    @rule(number=objs)
    def register(self, number: int) -> None:
        if number not in self.objects:
            return  # dropped
        kind, obj = self.objects[number]
        reg = forkguard.register(obj, **self.OPTIONS.get(kind, {}))
        if number in self.live:
            assert reg is self.live[number]  # registering again: the same registration
        self.live[number] = reg

    @rule(number=objs)
    def unregister(self, number: int) -> None:
        reg = self.live.pop(number, None)
        if reg is not None:
            assert reg.unregister() is True
            assert reg.unregister() is False
            self.ended.append(reg)

    @rule(number=objs)
    def drop_python_object(self, number: int) -> None:
        """Drop the last reference to a Python object: its registration ends."""
        if self.objects.get(number, ("",))[0] not in self.PYTHON_KINDS:
            return
        del self.objects[number]
        reg = self.live.pop(number, None)
        gc.collect()
        if reg is not None:
            assert not reg.active
            assert reg.target is None
            self.ended.append(reg)

    @rule()
    def fork(self) -> None:
        lib = self.ext.lib
        objects = dict(self.objects)
        live = set(self.live)

        def child() -> None:
            for number, (kind, obj) in objects.items():
                if kind in ("lock", "semaphore"):
                    free = obj.acquire(blocking=False)
                elif kind == "queue":
                    free = obj.mutex.acquire(blocking=False)
                elif kind == "mutex":
                    free = lib.pthread_mutex_trylock(obj) == 0
                else:
                    free = lib.pthread_rwlock_trywrlock(obj) == 0
                assert free == (number in live), (number, kind, live)

        result = run_in_child(child, deadline=20)
        assert result.status == "ok", result.detail

    @invariant()
    def registry_matches_model(self) -> None:
        expected = sorted(self.live.values(), key=lambda r: r._token)
        assert forkguard.registrations() == expected
        assert all(reg.active for reg in expected)
        assert not any(reg.active for reg in self.ended)
        c_live = sum(1 for n in self.live if self.objects[n][0] in ("mutex", "rwlock"))
        assert _REGISTRY.backend.count() == self.c_count + c_live

    def teardown(self) -> None:
        for reg in forkguard.registrations():  # also one a failed step left unrecorded
            reg.unregister()
        lib = self.ext.lib
        self.holders.stop()
        for kind, obj in self.objects.values():
            if kind in ("mutex", "rwlock"):
                lib.lock_free(obj)


def test_registry_model(ext: ModuleType) -> None:
    RegistryModel.ext = ext
    run_state_machine_as_test(
        RegistryModel, settings=settings(max_examples=30, stateful_step_count=20, deadline=None)
    )
