"""Hypothesis: any sequence of register / unregister / fork leaves exactly the live
registrations restored in the child, and the registry's bookkeeping consistent."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forkguard
from forkguard import _REGISTRY

from forking import run_in_child

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
        lock.acquire()  # all held by the forking thread: reset shows as "free in the child"
    for m in c_locks:
        lib.pthread_mutex_lock(m)
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
        for m in c_locks:
            lib.pthread_mutex_unlock(m)
    assert _REGISTRY.backend.count() == c_count
