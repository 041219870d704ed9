"""Registration objects, weak lifetimes, duplicates, and at_fork hooks."""

from __future__ import annotations

import gc
import queue
import sys
import threading
import weakref
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard import _REGISTRY

from forking import run_in_child

OK = 20.0


def test_registration_describes_itself() -> None:
    q: queue.Queue[int] = queue.Queue()
    reg = forkguard.register(q, policy="hold", timeout=2.5, name="log queue")
    assert (reg.name, reg.policy, reg.timeout, reg.kind) == (
        "log queue",
        "hold",
        2.5,
        "queue.Queue",
    )
    assert reg.active and reg.target is q and reg.hold_timeouts == 0
    assert repr(reg) == (
        f"<forkguard.Registration 'log queue': queue.Queue at {id(q):#x}, "
        f"policy='hold' (timeout 2.5 s), active>"
    )
    assert forkguard.registrations() == [reg]
    assert reg.unregister() is True
    assert reg.unregister() is False
    assert not reg.active
    assert repr(reg).endswith("ended: unregistered>")
    assert forkguard.registrations() == []


def test_defaults() -> None:
    lock = threading.Lock()
    with forkguard.register(lock) as reg:
        assert reg.policy == "reset"
        assert reg.timeout == forkguard.DEFAULT_TIMEOUT
        assert reg.name == f"threading.Lock at {id(lock):#x}"
    assert not reg.active


def test_context_manager_unregisters_on_error() -> None:
    lock = threading.Lock()
    with pytest.raises(KeyError), forkguard.register(lock) as reg:
        raise KeyError
    assert not reg.active


def test_registrations_is_a_snapshot_in_registration_order() -> None:
    objs = [threading.Lock() for _ in range(3)]
    regs = [forkguard.register(o) for o in objs]
    hooks = forkguard.at_fork(before=lambda: None)
    snapshot = forkguard.registrations()
    assert snapshot == [*regs, hooks]
    regs[1].unregister()
    assert snapshot == [*regs, hooks]  # a snapshot does not change
    assert forkguard.registrations() == [regs[0], regs[2], hooks]
    for r in (regs[0], regs[2], hooks):
        r.unregister()


def test_python_objects_are_held_weakly() -> None:
    lock = threading.Lock()
    ref = weakref.ref(lock)
    reg = forkguard.register(lock)
    del lock
    gc.collect()
    assert ref() is None  # registering did not keep it alive
    assert not reg.active  # ...and the registration ended with it
    assert reg.target is None
    assert repr(reg).endswith("threading.Lock (gone), policy='reset', ended: collected>")
    assert forkguard.registrations() == []
    assert reg.unregister() is False


def test_collected_object_is_not_touched_in_the_child() -> None:
    class Tracked:
        resets = 0

        def __forkguard_reset__(self) -> None:
            Tracked.resets += 1

    obj = Tracked()
    forkguard.register(obj)
    del obj
    gc.collect()
    assert run_in_child(lambda: Tracked.resets == 0, deadline=OK)


def test_same_object_twice(ext: ModuleType) -> None:
    lock = threading.Lock()
    reg = forkguard.register(lock, name="first")
    assert forkguard.register(lock) is reg  # same options: the same registration
    with pytest.raises(ValueError, match=r"already registered as .*'first'.*other options"):
        forkguard.register(lock, policy="hold")
    with pytest.raises(ValueError, match="already registered"):
        forkguard.register(lock, timeout=3)
    assert forkguard.registrations() == [reg]
    reg.unregister()
    again = forkguard.register(lock, policy="hold")  # ended registrations do not count
    assert again is not reg
    again.unregister()

    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    creg = forkguard.register(m, mutex_type="normal")
    address = int(ext.ffi.cast("uintptr_t", m))
    assert forkguard.register(address, kind="pthread_mutex") is creg  # by address
    with pytest.raises(ValueError, match="already registered"):
        forkguard.register(m, policy="hold")
    creg.unregister()


def test_a_c_registration_its_register_call_never_listed_is_found(
    ext: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register() of a C object takes no registry lock: the C core makes the
    registration, then the call lists it.  Another register() of the same object in
    between waits for that listing; if it never comes (an exception stopped the first
    call there), it lists the C core's registration itself, once, and it can be ended."""
    from forkguard import _backend, _registry

    monkeypatch.setattr(_registry, "_LISTING_WAIT", 0.05)
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    address = int(ext.ffi.cast("uintptr_t", m))
    count = _REGISTRY.backend.count()
    # What register() does up to its listing: the C core's registration alone.
    handle = _REGISTRY.backend.register(
        _backend.MUTEX, address, _backend.POLICY_HOLD, 0.5, "half-made", None, 0
    )
    assert handle > 0
    # Not listed as C code's: a registration under way shows once its call returns.
    assert all(r.target not in (m, address) for r in forkguard.registrations())
    reg = forkguard.register(m, policy="hold", timeout=0.5)
    assert forkguard.register(m, policy="hold", timeout=0.5) is reg
    assert [r for r in forkguard.registrations() if r.target in (m, address)] == [reg]
    assert (reg.name, reg.kind, reg.policy, reg.timeout) == (
        "half-made",
        "pthread_mutex_t (recursive)",
        "hold",
        0.5,
    )
    with pytest.raises(ValueError, match="other options"):
        forkguard.register(m)
    assert reg.unregister() is True
    assert _REGISTRY.backend.count() == count
    assert not _REGISTRY.backend.is_active(handle)


def test_c_pointer_is_kept_alive_while_registered(ext: ModuleType) -> None:
    m = ext.ffi.new("pthread_mutex_t *")  # owning: freed when the cdata dies
    ext.lib.pthread_mutex_init(m, ext.ffi.NULL)
    ref = weakref.ref(m)
    reg = forkguard.register(m, mutex_type="normal")
    address = int(ext.ffi.cast("uintptr_t", m))
    del m
    gc.collect()
    assert ref() is not None and reg.target is ref()  # the C registry still points at it
    reg.unregister()
    gc.collect()
    assert ref() is None  # let go once unregistered
    assert reg.target == address


def test_c_registration_survives_unregister_of_a_python_one(ext: ModuleType) -> None:
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    count = _REGISTRY.backend.count()
    with forkguard.register(m, mutex_type="normal"):
        assert _REGISTRY.backend.count() == count + 1
        with forkguard.register(threading.Lock()):
            pass
        assert _REGISTRY.backend.count() == count + 1
    assert _REGISTRY.backend.count() == count


# ------------------------------------------------------------------ at_fork


def test_at_fork_hook_order_and_unregister() -> None:
    calls: list[str] = []

    def hooks(tag: str) -> forkguard.Registration:
        return forkguard.at_fork(
            before=lambda: calls.append(f"before {tag}"),
            after_in_parent=lambda: calls.append(f"parent {tag}"),
            after_in_child=lambda: calls.append(f"child {tag}"),
            name=tag,
        )

    first, second = hooks("1"), hooks("2")
    assert first.kind == "at_fork hooks" and first.policy is None and first.timeout is None

    def child() -> bool:
        return calls == ["before 2", "before 1", "child 1", "child 2"]

    assert run_in_child(child, deadline=OK)
    assert calls == ["before 2", "before 1", "parent 1", "parent 2"]
    first.unregister()
    calls.clear()
    assert run_in_child(lambda: calls == ["before 2", "child 2"], deadline=OK)
    assert calls == ["before 2", "parent 2"]
    second.unregister()
    calls.clear()
    assert run_in_child(lambda: calls == [], deadline=OK)
    assert calls == []


def test_after_in_child_hooks_see_objects_already_restored() -> None:
    lock = threading.Lock()
    took = threading.Event()
    release = threading.Event()
    threading.Thread(
        target=lambda: (lock.acquire(), took.set(), release.wait()), daemon=True
    ).start()
    took.wait()
    seen: list[bool] = []
    with (
        forkguard.register(lock),
        forkguard.at_fork(after_in_child=lambda: seen.append(lock.acquire(blocking=False))),
    ):
        assert run_in_child(lambda: seen == [True], deadline=OK)
    release.set()


def test_before_hooks_run_before_holds_are_taken() -> None:
    """A before-hook may itself use a lock that is on hold."""
    lock = threading.Lock()
    used: list[bool] = []

    def before() -> None:
        with lock:
            used.append(True)

    with forkguard.register(lock, policy="hold", timeout=0.5), forkguard.at_fork(before=before):
        assert run_in_child(lambda: used == [True], deadline=OK)
    assert used == [True]


def test_a_failing_hook_is_reported_and_the_others_still_run(monkeypatch: Any) -> None:
    reported: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))
    calls: list[str] = []

    def boom() -> None:
        raise ZeroDivisionError("hook failed")

    lock = threading.Lock()
    lock.acquire()
    with (
        forkguard.at_fork(
            before=lambda: calls.append("b1"), after_in_parent=boom, after_in_child=boom
        ),
        forkguard.register(lock),
        forkguard.at_fork(
            before=boom,
            after_in_parent=lambda: calls.append("p2"),
            after_in_child=lambda: calls.append("c2"),
        ),
    ):

        def child() -> bool:
            # the child's hooks ran: the lock was reset, c2 ran, boom was reported
            return (
                lock.acquire(blocking=False)
                and "c2" in calls
                and any(isinstance(e, ZeroDivisionError) for e in reported)
            )

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    assert calls == ["b1", "p2"]
    # Both failures of the parent side (one before, one after the fork) are reported
    # together: an exception group on 3.11+, one RuntimeError naming both on 3.10.
    assert len(reported) == 1
    if sys.version_info >= (3, 11):
        assert isinstance(reported[0], BaseExceptionGroup)  # noqa: F821 (3.11+)
        assert [type(e) for e in reported[0].exceptions] == [ZeroDivisionError] * 2
    else:
        assert isinstance(reported[0], RuntimeError)
        assert str(reported[0]).count("ZeroDivisionError") == 2
    lock.release()


def test_registering_inside_a_before_hook() -> None:
    made: list[forkguard.Registration] = []
    lock = threading.Lock()
    lock.acquire()
    with forkguard.at_fork(before=lambda: made.append(forkguard.register(lock))):
        assert run_in_child(lambda: lock.acquire(blocking=False), deadline=OK)
    assert made and made[0].active
    made[0].unregister()
    lock.release()


def test_fork_that_never_happens_still_releases_holds(ext: ModuleType) -> None:
    """os.fork() runs the after-in-parent hooks even when fork() fails; forkguard's
    then releases what the before-hook took.  C holds are not the before-hook's: they
    are taken by the pthread_atfork prepare handler, which a failed fork() follows
    with the parent handler."""
    lock = threading.Lock()
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with (
        forkguard.register(lock, policy="hold"),
        forkguard.register(m, policy="hold", mutex_type="normal"),
    ):
        _REGISTRY.before_fork()
        assert lock.locked()
        assert ext.lib.pthread_mutex_trylock(m) == 0  # untouched by the Python hook
        ext.lib.pthread_mutex_unlock(m)
        with forkguard.register(threading.Lock()):  # the registry is usable mid-fork
            pass
        _REGISTRY.after_fork_in_parent()  # no fork() in between
        assert not lock.locked()


def test_the_child_s_resets_go_on_when_a_registration_comes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread started by an earlier child hook registers a lock while the child's
    resets run (simulated: the first reset registers one).  The loop goes on over what
    it started with; over the live dict it would stop half-way (the dict changed)."""
    from forkguard import _backend, _registry

    reg = _registry.Registry(_backend.NoForkBackend())
    locks = [threading.Lock() for _ in range(3)]
    late = threading.Lock()
    regs = [reg.register(lock) for lock in locks]
    reset: list[object] = []
    real = _registry._LOCK_REINIT

    def reinit(lock: Any) -> None:
        if not reset:
            regs.append(reg.register(late))
        reset.append(lock)
        real(lock)

    monkeypatch.setattr(_registry, "_LOCK_REINIT", reinit)
    reg.after_fork_in_child()
    assert reset == locks
