"""C locks held by a native thread at fork time: hung child without forkguard, usable with it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard import _REGISTRY

from conftest import LINUX
from forking import run_in_child, wait_status

HANG = 1.0  # seconds before a child that should hang is declared hung
OK = 20.0  # generous deadline for children that should finish

needs_linux = pytest.mark.skipif(not LINUX, reason="mutex types are read on Linux only")
needs_sem = pytest.mark.skipif(
    not _REGISTRY.backend.has_semaphores, reason="no unnamed POSIX semaphores here"
)


class Holders:
    """Native threads that hold C objects until the test ends."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext
        self.running: list[Any] = []

    def hold(self, *items: tuple[int, Any, int]) -> None:
        """Start one native thread taking each (kind, object, depth); return once held."""
        ffi, lib = self.ext.ffi, self.ext.lib
        kinds = ffi.new("int[]", [k for k, _, _ in items])
        objs = ffi.new("void *[]", [o for _, o, _ in items])
        depths = ffi.new("int[]", [d for _, _, d in items])
        self.running.append(lib.holder_start(len(items), kinds, objs, depths))

    def stop(self) -> None:
        while self.running:
            self.ext.lib.holder_stop(self.running.pop())


@pytest.fixture
def holders(ext: ModuleType) -> Iterator[Holders]:
    h = Holders(ext)
    yield h
    h.stop()


def c_fork_lock_all(ext: ModuleType, items: list[tuple[int, Any, int]], deadline: float) -> str:
    """fork() from C; the child takes every object.  Returns ok/hung/..."""
    ffi, lib = ext.ffi, ext.lib
    kinds = ffi.new("int[]", [k for k, _, _ in items])
    objs = ffi.new("void *[]", [o for _, o, _ in items])
    depths = ffi.new("int[]", [d for _, _, d in items])
    return wait_status(lib.c_fork_lock_all(len(items), kinds, objs, depths, max(1, int(deadline))))


def test_native_thread_holds_normal_and_recursive_mutex(ext: ModuleType, holders: Holders) -> None:
    lib = ext.lib
    normal = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    recursive = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    holders.hold((lib.K_MUTEX, normal, 1), (lib.K_MUTEX, recursive, 2))

    def child() -> None:
        assert lib.pthread_mutex_lock(normal) == 0
        assert lib.pthread_mutex_lock(recursive) == 0
        assert lib.pthread_mutex_lock(recursive) == 0  # still recursive after the reset
        assert lib.pthread_mutex_unlock(recursive) == 0
        assert lib.pthread_mutex_unlock(recursive) == 0
        assert lib.pthread_mutex_unlock(normal) == 0

    assert run_in_child(child, deadline=HANG).status == "hung"
    with (
        forkguard.register(normal, mutex_type="normal"),
        forkguard.register(recursive, mutex_type="recursive"),
    ):
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    assert run_in_child(child, deadline=HANG).status == "hung"  # unregistered again


def test_fork_called_from_c_restores_c_objects(ext: ModuleType, holders: Holders) -> None:
    """No Python at-fork hook runs for a fork() made in C; the C handler still does."""
    lib = ext.lib
    normal = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    recursive = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    holders.hold((lib.K_MUTEX, normal, 1), (lib.K_MUTEX, recursive, 3))
    items = [(lib.K_MUTEX, normal, 1), (lib.K_MUTEX, recursive, 2)]
    assert c_fork_lock_all(ext, items, HANG) == "hung"
    with (
        forkguard.register(normal, mutex_type="normal"),
        forkguard.register(recursive, mutex_type="recursive"),
    ):
        assert c_fork_lock_all(ext, items, OK) == "ok"


@pytest.mark.parametrize("held_as", ["writer", "reader"])
def test_rwlock_held_at_fork(ext: ModuleType, holders: Holders, held_as: str) -> None:
    lib = ext.lib
    rw = lib.rwlock_new(0)
    holders.hold((lib.K_WRLOCK if held_as == "writer" else lib.K_RDLOCK, rw, 1))

    def child() -> None:
        assert lib.pthread_rwlock_wrlock(rw) == 0
        assert lib.pthread_rwlock_unlock(rw) == 0
        assert lib.pthread_rwlock_tryrdlock(rw) == 0

    assert run_in_child(child, deadline=HANG).status == "hung"
    with forkguard.register(rw):
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
        assert c_fork_lock_all(ext, [(lib.K_WRLOCK, rw, 1)], OK) == "ok"


@needs_sem
def test_semaphore_held_at_fork_gets_its_value_back(ext: ModuleType, holders: Holders) -> None:
    lib, ffi = ext.lib, ext.ffi
    sem = lib.sem_new(1)
    holders.hold((lib.K_SEM, sem, 1))  # value now 0

    def child() -> None:
        assert lib.sem_wait(sem) == 0  # hangs unless the count came back
        value = ffi.new("int *")
        lib.sem_getvalue(sem, value)
        assert value[0] == 0

    assert run_in_child(child, deadline=HANG).status == "hung"
    reg = forkguard.register(sem, value=1)
    try:
        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    finally:
        reg.unregister()


@needs_sem
def test_semaphore_default_value_is_the_value_at_registration(ext: ModuleType) -> None:
    lib, ffi = ext.lib, ext.ffi
    sem = lib.sem_new(3)
    with forkguard.register(sem):
        assert lib.sem_wait(sem) == 0
        assert lib.sem_wait(sem) == 0

        def child() -> bool:
            value = ffi.new("int *")
            lib.sem_getvalue(sem, value)
            return bool(value[0] == 3)

        assert run_in_child(child, deadline=OK)


@needs_linux
def test_errorcheck_mutex_stays_errorcheck(ext: ModuleType, holders: Holders) -> None:
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_ERRORCHECK, 0, 0)
    holders.hold((lib.K_MUTEX, m, 1))
    with forkguard.register(m) as reg:
        assert reg.kind == "pthread_mutex_t (errorcheck)"

        def child() -> None:
            assert lib.pthread_mutex_lock(m) == 0
            assert lib.pthread_mutex_lock(m) == lib.EDEADLK  # an error, not a hang

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail


@needs_linux
@pytest.mark.parametrize(
    ("type_name", "expected"),
    [
        ("PTHREAD_MUTEX_NORMAL", "normal"),
        ("PTHREAD_MUTEX_RECURSIVE", "recursive"),
        ("PTHREAD_MUTEX_ERRORCHECK", "errorcheck"),
    ],
)
def test_mutex_type_is_read_from_the_mutex(ext: ModuleType, type_name: str, expected: str) -> None:
    m = ext.lib.mutex_new(getattr(ext.lib, type_name), 0, 0)
    with forkguard.register(m) as reg:
        assert reg.kind == f"pthread_mutex_t ({expected})"
    others = [t for t in ("normal", "recursive", "errorcheck") if t != expected]
    with pytest.raises(ValueError, match=f"is a {expected} mutex, not '{others[0]}'"):
        forkguard.register(m, mutex_type=others[0])  # type: ignore[arg-type]
    assert forkguard.registrations() == []


def test_integer_address_with_kind(ext: ModuleType, holders: Holders) -> None:
    lib, ffi = ext.lib, ext.ffi
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    address = int(ffi.cast("uintptr_t", m))
    holders.hold((lib.K_MUTEX, m, 1))
    with forkguard.register(address, kind="pthread_mutex", mutex_type="normal") as reg:
        assert reg.target == address
        assert run_in_child(lambda: lib.pthread_mutex_trylock(m) == 0, deadline=OK)


def test_void_pointer_with_kind(ext: ModuleType, holders: Holders) -> None:
    lib, ffi = ext.lib, ext.ffi
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    holders.hold((lib.K_MUTEX, m, 1))
    with forkguard.register(ffi.cast("void *", m), kind="pthread_mutex", mutex_type="normal"):
        assert run_in_child(lambda: lib.pthread_mutex_trylock(m) == 0, deadline=OK)


def test_unlocked_mutex_is_left_alone(ext: ModuleType) -> None:
    """A mutex that is free at fork time is only compared, not rewritten."""
    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_RECURSIVE, 0, 0)
    with forkguard.register(m, mutex_type="recursive"):

        def child() -> None:
            assert lib.pthread_mutex_lock(m) == 0
            assert lib.pthread_mutex_lock(m) == 0

        assert run_in_child(child, deadline=OK)


class Hooks:
    """Register the extension's C hooks through the core, as the C API does."""

    def __init__(self, ext: ModuleType) -> None:
        from forkguard._native import ffi, lib

        self.ext, self.ffi, self.lib = ext, ffi, lib

    def fn(self, name: str) -> Any:
        address = int(self.ext.ffi.cast("uintptr_t", self.ext.ffi.addressof(self.ext.lib, name)))
        return self.ffi.cast("forkguard_hook", address)

    def register(self, arg: int) -> int:
        out = self.ffi.new("uint64_t *")
        rc = self.lib.fg_register_hooks(
            self.fn("hook_prepare"),
            self.fn("hook_parent"),
            self.fn("hook_child"),
            self.ffi.cast("void *", arg),
            b"test hooks",
            out,
        )
        assert rc == 0
        return int(out[0])


def test_c_hooks_run_once_per_fork_in_posix_order(ext: ModuleType) -> None:
    hooks = Hooks(ext)
    lib = ext.lib
    lib.hook_reset()
    first, second = hooks.register(1), hooks.register(2)
    try:

        def child() -> None:
            # prepare: newest first; child: oldest first; parent never here.
            log = [lib.hook_log(i) for i in range(lib.hook_log_len())]
            assert log == [2, 1, 2001, 2002], log

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
        log = [lib.hook_log(i) for i in range(lib.hook_log_len())]
        assert log == [2, 1, 1001, 1002]  # prepare newest first, parent oldest first
        assert (lib.hook_calls(0), lib.hook_calls(1), lib.hook_calls(2)) == (2, 2, 0)
    finally:
        assert hooks.lib.fg_unregister(first) == 0
        assert hooks.lib.fg_unregister(second) == 0
    lib.hook_reset()
    pid = os.fork()
    if pid == 0:
        os._exit(lib.hook_log_len())
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0  # unregistered hooks never run again
    assert lib.hook_log_len() == 0


def test_handles_are_generational(ext: ModuleType) -> None:
    hooks = Hooks(ext)
    handle = hooks.register(5)
    assert hooks.lib.fg_is_active(handle) == 1
    assert hooks.lib.fg_unregister(handle) == 0
    assert hooks.lib.fg_unregister(handle) == hooks.lib.FORKGUARD_ESTALE
    reused = hooks.register(6)  # may reuse the slot, never the handle
    try:
        assert reused != handle
        assert hooks.lib.fg_is_active(handle) == 0
        assert hooks.lib.fg_unregister(handle) == hooks.lib.FORKGUARD_ESTALE
        assert hooks.lib.fg_unregister(0) == hooks.lib.FORKGUARD_ESTALE
        assert hooks.lib.fg_unregister(2**64 - 1) == hooks.lib.FORKGUARD_ESTALE
    finally:
        assert hooks.lib.fg_unregister(reused) == 0


@needs_linux
@pytest.mark.parametrize(
    "type_name",
    ["DEFAULT", "PTHREAD_MUTEX_NORMAL", "PTHREAD_MUTEX_RECURSIVE", "PTHREAD_MUTEX_ERRORCHECK"],
)
def test_child_gets_the_exact_bytes_of_a_fresh_mutex(
    ext: ModuleType, holders: Holders, type_name: str
) -> None:
    """A held mutex comes back byte for byte as it was when free, and a free one is
    left exactly as it is (glibc's explicit NORMAL differs from the default in its
    elision bit: a template built from the type alone would change it)."""
    lib, ffi = ext.lib, ext.ffi
    if type_name == "DEFAULT":
        held, free = ext.ffi.new("pthread_mutex_t *"), ext.ffi.new("pthread_mutex_t *")
        lib.pthread_mutex_init(held, ffi.NULL)
        lib.pthread_mutex_init(free, ffi.NULL)
    else:
        held = lib.mutex_new(getattr(lib, type_name), 0, 0)
        free = lib.mutex_new(getattr(lib, type_name), 0, 0)
    fresh = bytes(ffi.buffer(held))
    holders.hold((lib.K_MUTEX, held, 1))
    assert bytes(ffi.buffer(held)) != fresh  # locked: the bytes changed
    with forkguard.register(held), forkguard.register(free):

        def child() -> None:
            assert bytes(ffi.buffer(held)) == fresh
            assert bytes(ffi.buffer(free)) == fresh

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    holders.stop()  # before `held` is freed (it may be owned by this function)
