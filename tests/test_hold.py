"""Policy "hold": the data a lock protects is consistent in every child."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import forkguard
from test_c_api import TABLE_CDEF

from forking import run_in_child, wait_status

OK = 20.0
FORKS = 25


class PyPair:
    """Two fields a thread keeps equal under one lock, with a pause mid-update."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.a = self.b = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            with self.lock:
                self.a += 1
                time.sleep(0.0005)
                self.b += 1
            time.sleep(0.0001)

    def equal_in_child(self) -> bool:
        with self.lock:
            return self.a == self.b

    def stop(self) -> None:
        self._stop = True
        self._thread.join(10)


@pytest.fixture
def py_pair() -> Iterator[PyPair]:
    pair = PyPair()
    yield pair
    pair.stop()


@pytest.fixture
def c_pair(ext: ModuleType) -> Iterator[Any]:
    pair = ext.lib.pair_start(1)
    yield pair
    ext.lib.pair_stop(pair)


def _forks_until_torn(check: Any) -> int:
    """How many of FORKS children saw the two fields differ."""
    torn = 0
    for _ in range(FORKS):
        result = run_in_child(check, deadline=OK)
        assert result.status in ("ok", "failed"), result.detail
        torn += result.status == "failed"
    return torn


def test_python_hold_keeps_fields_consistent(py_pair: PyPair) -> None:
    with forkguard.register(py_pair.lock):  # reset: the child can lock, data may be torn
        assert _forks_until_torn(py_pair.equal_in_child) > 0
    with forkguard.register(py_pair.lock, policy="hold") as reg:
        assert _forks_until_torn(py_pair.equal_in_child) == 0
        assert reg.hold_timeouts == 0


def test_c_hold_keeps_fields_consistent(ext: ModuleType, c_pair: Any) -> None:
    lib, ffi = ext.lib, ext.ffi

    def equal_in_child() -> bool:
        assert lib.pthread_mutex_lock(lib.pair_mutex(c_pair)) == 0
        a, b = ffi.new("long *"), ffi.new("long *")
        lib.pair_read(c_pair, a, b)
        return bool(a[0] == b[0])

    mutex = lib.pair_mutex(c_pair)
    with forkguard.register(mutex, mutex_type="normal"):
        assert _forks_until_torn(equal_in_child) > 0
    with forkguard.register(mutex, policy="hold", mutex_type="normal") as reg:
        assert _forks_until_torn(equal_in_child) == 0
        assert reg.hold_timeouts == 0


def test_c_hold_for_a_fork_called_from_c(ext: ModuleType, c_pair: Any) -> None:
    """No Python hook runs: the C prepare handler takes the hold itself."""
    lib = ext.lib
    mutex = lib.pair_mutex(c_pair)

    def torn() -> int:
        statuses = [wait_status(lib.c_fork_pair_equal(c_pair, 20)) for _ in range(FORKS)]
        assert set(statuses) <= {"ok", "failed"}
        return statuses.count("failed")

    with forkguard.register(mutex, mutex_type="normal"):
        assert torn() > 0
    with forkguard.register(mutex, policy="hold", mutex_type="normal"):
        assert torn() == 0


def test_hold_timeout_falls_back_to_reset_and_warns() -> None:
    lock = threading.Lock()
    stuck = threading.Event()
    threading.Thread(target=lambda: (lock.acquire(), stuck.wait()), daemon=True).start()
    while not lock.locked():
        time.sleep(0.001)
    with forkguard.register(lock, policy="hold", timeout=0.2, name="stuck lock") as reg:
        with pytest.warns(forkguard.HoldTimeoutWarning, match="stuck lock.*within 0.2 s"):
            result = run_in_child(lambda: lock.acquire(timeout=5), deadline=OK)
        assert result.status == "ok", result.detail  # reset instead of held
        assert reg.hold_timeouts == 1
        assert lock.locked()  # the parent's lock is untouched: still the other thread's
    stuck.set()


def test_c_hold_timeout_falls_back_to_reset_and_warns(ext: ModuleType) -> None:
    from test_c_objects import Holders

    lib = ext.lib
    m = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    holders = Holders(ext)
    holders.hold((lib.K_MUTEX, m, 1))
    try:
        with forkguard.register(m, policy="hold", timeout=0.2, mutex_type="normal") as reg:
            with pytest.warns(forkguard.HoldTimeoutWarning, match="pthread_mutex_t"):
                result = run_in_child(lambda: lib.pthread_mutex_trylock(m) == 0, deadline=OK)
            assert result.status == "ok", result.detail
            assert reg.hold_timeouts == 1
    finally:
        holders.stop()


def test_holds_follow_registration_order() -> None:
    """Holds are taken oldest first: an app that nests A then B never makes a fork wait out
    its timeout (a HoldTimeoutWarning is an error in this suite)."""
    a, b = threading.Lock(), threading.Lock()
    stop = threading.Event()

    def nest() -> None:
        while not stop.is_set():
            with a, b:
                time.sleep(0.0002)

    t = threading.Thread(target=nest, daemon=True)
    t.start()
    try:
        with (
            forkguard.register(a, policy="hold", timeout=5),
            forkguard.register(b, policy="hold", timeout=5),
        ):
            for _ in range(FORKS):
                result = run_in_child(
                    lambda: a.acquire(blocking=False) and b.acquire(blocking=False), deadline=OK
                )
                assert result.status == "ok", result.detail
    finally:
        stop.set()
        t.join(10)


def test_objects_sharing_a_lock_are_held_once() -> None:
    """A Condition and its own Lock both on hold: the lock is taken once, not twice
    (which would wait out the timeout against ourselves)."""
    lock = threading.Lock()
    cond = threading.Condition(lock)
    with (
        forkguard.register(lock, policy="hold", timeout=0.5),
        forkguard.register(cond, policy="hold", timeout=0.5),
    ):

        def child() -> None:
            with cond:
                cond.notify_all()
            assert lock.acquire(blocking=False)

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
    assert not lock.locked()


@pytest.mark.parametrize("maker", [threading.RLock, threading.Semaphore, threading.Condition])
def test_hold_releases_in_parent_and_child(maker: Any) -> None:
    obj = maker()
    with forkguard.register(obj, policy="hold"):
        assert run_in_child(lambda: obj.acquire(timeout=5), deadline=OK)
    assert obj.acquire(blocking=False)  # released in the parent too
    obj.release()


def test_hold_of_rlock_owned_by_the_forking_thread() -> None:
    rlock = threading.RLock()
    with forkguard.register(rlock, policy="hold"), rlock:

        def child() -> None:
            assert rlock._is_owned()  # type: ignore[attr-defined]
            rlock.release()  # the outer `with`, which the child continues
            assert not rlock._is_owned()  # type: ignore[attr-defined]

        result = run_in_child(child, deadline=OK)
        assert result.status == "ok", result.detail
        assert rlock._is_owned()  # type: ignore[attr-defined]


# A fresh interpreter, so the order of the fork phases is the one set up here: the C
# API's parent hook installed first, then (optionally) a Python hold's phases.  A
# ctypes thread holds a C mutex registered through the C API with policy "hold" and a
# short timeout, so every fork times out on it; the script records each warning and
# whether the Python hold's lock was still held when it was shown.
C_API_TIMEOUT = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, warnings
    from cffi import FFI
    import forkguard

    ffi = FFI()
    ffi.cdef(sys.argv[1])
    api = ffi.cast("forkguard_api *", forkguard._C_API_ADDRESS)  # its parent hook: first
    lock = threading.Lock()
    if sys.argv[2] == "python-hold":
        reg = forkguard.register(lock, policy="hold", timeout=5)

    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # a default (normal) mutex on glibc: zeroes
    taken, done = threading.Event(), threading.Event()

    def hold():
        libc.pthread_mutex_lock(mutex)
        taken.set()
        done.wait()
        libc.pthread_mutex_unlock(mutex)

    threading.Thread(target=hold, daemon=True).start()
    taken.wait()
    handle = ffi.new("forkguard_handle *")
    target = ffi.cast("pthread_mutex_t *", ctypes.addressof(mutex))
    assert api.register_mutex(target, 0, 1, 0.1, b"held elsewhere", handle) == 0

    shown = []

    def record(message, category, filename, lineno, file=None, line=None):
        shown.append([str(message), category.__name__, lineno, lock.locked()])

    warnings.showwarning = record
    warnings.simplefilter("always")
    # (3.12+: CPython's own, for forking with threads; not what this test counts)
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
    for _ in range(2):
        pid = os.fork()  # the line warnings point at
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    done.set()
    assert api.unregister(handle[0]) == 0
    with open(__file__) as source:
        fork_line = next(n for n, text in enumerate(source, 1) if "the line warnings" in text)
    print(json.dumps({"shown": shown, "fork_line": fork_line}))
    """
)


@pytest.mark.parametrize("setup", ["c-api-only", "python-hold"])
def test_c_api_hold_timeouts_are_reported_once_per_fork_after_python_holds(
    tmp_path: Any, setup: str
) -> None:
    """The C API's parent hook (a C function object) warns of a C hold that timed out,
    once per fork, pointing at the os.fork() call; where a Python hold of the same fork
    is installed after it, it leaves the warning to the parent phase, which first
    releases that hold (a warning handler could wait on it)."""
    script = tmp_path / "script.py"
    script.write_text(C_API_TIMEOUT)
    run = subprocess.run(
        [sys.executable, str(script), TABLE_CDEF, setup],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    expected = [
        "forkguard could not hold 1 C object(s) registered through the C API before fork; "
        "the child got it reset instead, so the data it protects may be inconsistent there",
        "HoldTimeoutWarning",
        out["fork_line"],
        False,  # the Python hold was released before
    ]
    assert out["shown"] == [expected, expected]
