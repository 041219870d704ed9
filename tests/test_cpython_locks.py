"""hashlib's objects: a child forked while a thread is inside one's update().

Two ways to have the object's C lock held at the fork: a thread that takes that
very lock and waits (exact, one fork), and a thread that really hashes without
pause (as programs do; the fork lands inside its update() nearly every time).
Without forkguard the child hangs on its first use; registered, it is usable.
The (de)compressors, whose lock forkguard will not free, are refused (test_bad_input.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import forkguard
from forkguard import _cpython_locks

from forking import run_in_child

DEADLINE = 2.0
TEXT = b"fork guard keeps the child's locks free " * 64


def _hmac() -> Any:
    wrapper = hmac.new(b"key", digestmod="sha256")
    return wrapper._hmac  # type: ignore[attr-defined]  # OpenSSL's, inside the wrapper


# name: (make, use in the child -> what it returns, what the parent expects of it)
HASHES: dict[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "blake2b": hashlib.blake2b,
    "sha3_256": hashlib.sha3_256,
    "hmac": _hmac,
}
if sys.version_info >= (3, 12):
    HASHES["builtin md5"] = lambda: __import__("_md5").md5()


@pytest.fixture
def enroll() -> Iterator[Callable[[object], None]]:
    """enroll(obj): registered until the test ends (these objects have no weak
    references, so a registration keeps them until it is ended)."""
    regs: list[forkguard.Registration] = []
    yield lambda obj: regs.append(forkguard.register(obj))
    for reg in regs:
        reg.unregister()


# --------------------------------------------------------------------------
# Holding the very lock from another thread.

_api = ctypes.pythonapi


@pytest.fixture
def held() -> Iterator[Callable[[object], None]]:
    """held(obj): a thread takes obj's own C lock and keeps it until the test ends."""
    releases: list[Callable[[], None]] = []

    def hold(obj: object) -> None:
        field = _cpython_locks.field_of(obj)
        address = id(obj) + field.offset
        if field.inline:  # a PyMutex (3.13+): its public lock and unlock calls
            lock, unlock = _api.PyMutex_Lock, _api.PyMutex_Unlock
            handle = ctypes.c_void_p(address)
        else:
            lock = lambda h: _api.PyThread_acquire_lock(h, 1)  # noqa: E731
            unlock = _api.PyThread_release_lock
            handle = ctypes.c_void_p(ctypes.c_void_p.from_address(address).value)
        taken, done = threading.Event(), threading.Event()

        def keep() -> None:
            lock(handle)
            taken.set()
            done.wait()
            unlock(handle)

        thread = threading.Thread(target=keep, daemon=True)
        thread.start()
        assert taken.wait(5)
        # `obj` stays alive until its lock is given back (its lock dies with it).
        releases.append(lambda: (done.set(), thread.join(5), obj))  # type: ignore[func-returns-value]

    yield hold
    for release in releases:
        release()


@pytest.mark.parametrize("name", sorted(HASHES))
@pytest.mark.parametrize("registered", [False, True], ids=["bare", "registered"])
def test_a_hash_held_by_another_thread(held: Any, enroll: Any, name: str, registered: bool) -> None:
    h = HASHES[name]()
    h.update(TEXT * 64)  # big enough to make the lock where it is made on demand
    expected = h.copy()
    expected.update(b"child")
    if registered:
        enroll(h)
    held(h)

    def child() -> bool:
        h.update(b"child")
        assert h.hexdigest() == expected.hexdigest()
        return True

    result = run_in_child(child, deadline=DEADLINE)
    assert result.status == ("ok" if registered else "hung"), result


# --------------------------------------------------------------------------
# A thread that really works on the object.


@pytest.fixture
def working() -> Iterator[Callable[[Callable[[], object]], None]]:
    """working(call): a thread makes `call` without pause until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(call: Callable[[], object]) -> None:
        def loop() -> None:
            while not stop.is_set():
                call()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)

    yield start  # type: ignore[misc]
    stop.set()
    for thread in threads:
        thread.join(10)


BIG = TEXT * 1024  # 2.6 MB: each call keeps the lock a while, the GIL let go


def _workloads() -> dict[str, tuple[Any, Callable[[Any], object], Callable[[Any], object]]]:
    """name: (object, the thread's call, the child's use).  A child finds the state
    the thread left mid-update: its use must not hang; the digest is not checked."""
    return {
        "sha256": (hashlib.sha256(), lambda h: h.update(BIG), lambda h: h.copy().hexdigest()),
        "blake2b": (hashlib.blake2b(), lambda h: h.update(BIG), lambda h: h.hexdigest()),
        "hmac": (_hmac(), lambda h: h.update(BIG), lambda h: h.digest()),
    }


def _until_one_hangs(child: Callable[[], object], forks: int) -> list[str]:
    seen = []
    for _ in range(forks):
        seen.append(run_in_child(child, deadline=1.0).status)
        if seen[-1] == "hung":
            break
    return seen


@pytest.mark.parametrize("name", sorted(_workloads()))
def test_a_busy_object_hangs_the_child_without_forkguard(working: Any, name: str) -> None:
    obj, call, use = _workloads()[name]
    working(lambda: call(obj))
    # Up to 100 forks: it stops at the first hang, and on a loaded machine the working
    # thread may hold the lock at only a few forks in 20.
    seen = _until_one_hangs(lambda: use(obj) is not None, forks=100)
    assert "hung" in seen, seen


@pytest.mark.parametrize("name", sorted(_workloads()))
def test_a_registered_busy_object_never_hangs_the_child(
    working: Any, enroll: Any, name: str
) -> None:
    obj, call, use = _workloads()[name]
    enroll(obj)
    working(lambda: call(obj))
    seen = [run_in_child(lambda: use(obj) is not None, deadline=DEADLINE).status for _ in range(20)]
    assert seen == ["ok"] * 20, seen


# --------------------------------------------------------------------------
# Registration.


def test_a_registration_keeps_an_object_without_weak_references_alive_until_it_ends() -> None:
    h = hashlib.sha256()
    before = sys.getrefcount(h)
    reg = forkguard.register(h)
    assert reg.target is h
    assert sys.getrefcount(h) == before + 1
    assert reg.unregister()
    assert sys.getrefcount(h) == before
    assert "(released)" in repr(reg)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="built-in md5 has a lock from 3.12")
def test_a_hash_without_a_lock_is_refused_with_the_reason() -> None:
    md5 = __import__("_md5").md5()
    with pytest.raises(TypeError, match="may have none here"):
        forkguard.register(md5)
    assert forkguard.registrations() == []
