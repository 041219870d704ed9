"""Many plain locks are reset in C (csrc/forkguard_plain.c): the same result as the
Python loops, the Python loops again when C reports a failure, and a child that writes
no page of weak references (counted: its page faults against a hand-written loop's).

Each case runs in a fresh interpreter: the switch to C is per process and for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from forkguard import _registry

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")

N = _registry.PLAIN_IN_C_FROM + 100  # enough to switch to C


def run(script: str, *args: str) -> tuple[dict[str, object], str]:
    """Run `script` in a fresh interpreter: (the JSON it printed last, its stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result, done.stderr


# Fork, run check() in the child under a 20 s alarm, return what it returned (JSON
# through a pipe), or None if it died.  (The whole script runs under run()'s timeout.)
FORK = """
    import json, os, signal

    def in_child(check):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            os.write(write_end, json.dumps(check()).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reply:
            data = reply.read()
        os.waitpid(pid, 0)
        return json.loads(data) if data else None
"""

CHILD_STATE = (
    FORK
    + f"""
    import sys, threading
    import forkguard

    protect = sys.argv[1] == "1"
    locks = [threading.Lock() for _ in range({N})]
    mine, theirs = threading.RLock(), threading.RLock()
    cond = threading.Condition()
    regs = [forkguard.register(o) for o in [*locks, mine, theirs, cond]] if protect else []
    in_c = forkguard._REGISTRY._reset_plain is not None
    c_results = []
    if in_c:  # what the C loop returns in the child: 0, or the Python loops ran again
        c_loop = forkguard._REGISTRY._reset_plain

        def counted(plain):
            c_results.append(c_loop(plain))
            return c_results[-1]

        forkguard._REGISTRY._reset_plain = counted
    for lock in locks[::2]:
        lock.acquire()  # held by the forking thread: reset all the same
    mine.acquire()  # the forking thread's RLock: still its own in the child
    held, release = threading.Event(), threading.Event()

    def other():
        with theirs, cond, locks[1]:
            held.set()
            release.wait()

    worker = threading.Thread(target=other)
    worker.start()
    held.wait()
    cond._waiters.append(threading.Lock())  # a waiter of a thread the child lacks

    def check():
        return {{
            "held_locks": sum(lock.locked() for lock in locks),
            "mine_owned": mine._is_owned(),
            "theirs_free": theirs.acquire(timeout=0.5),
            "cond_free": cond.acquire(timeout=0.5),
            "waiters": len(cond._waiters),
            "c_results": c_results,
        }}

    state = in_child(check)
    release.set()
    worker.join()
    print(json.dumps({{"in_c": in_c, "state": state}}))
"""
)


def test_many_plain_locks_are_reset_in_c_as_in_python() -> None:
    bare, _ = run(CHILD_STATE, "0")
    protected, _ = run(CHILD_STATE, "1")
    # Unprotected, the child inherits every lock held: the check can tell.
    assert bare["state"] == {
        "held_locks": N // 2 + N % 2 + 1,
        "mine_owned": True,
        "theirs_free": False,
        "cond_free": False,
        "waiters": 1,
        "c_results": [],
    }, bare
    assert protected["in_c"] is True, protected
    assert protected["state"] == {
        "held_locks": 0,
        "mine_owned": True,
        "theirs_free": True,
        "cond_free": True,
        "waiters": 0,
        "c_results": [0],  # the C loop did it all: the Python loops did not run
    }, protected


FALLBACK = (
    FORK
    + f"""
    import threading, weakref
    import forkguard

    class NotALock:
        pass

    locks = [threading.Lock() for _ in range({N})]
    regs = [forkguard.register(lock) for lock in locks]
    registry = forkguard._REGISTRY
    assert registry._reset_plain is not None
    # An entry the C loop cannot reset (it is no lock): C reports a failure, and the
    # Python loops run again, reset the rest and report what failed.
    impostor = NotALock()
    registry._plain_locks[-1] = weakref.ref(impostor)
    for lock in locks:
        lock.acquire()
    print(json.dumps({{"held": in_child(lambda: sum(lock.locked() for lock in locks))}}))
"""
)


def test_a_failure_in_c_falls_back_to_the_python_loops_which_report_it() -> None:
    result, stderr = run(FALLBACK)
    assert result == {"held": 0}, (result, stderr[-2000:])
    # The Python loops' report, from the child's after-fork hook.
    assert "NotALock" in stderr, stderr[-2000:]


class _NoCLoop:
    """A backend whose C loop cannot be had, as from a stale build of the core.  It
    says it cannot fork, so this throwaway registry installs no os.register_at_fork
    hook in the test process (those cannot be removed); the test calls the child's
    reset itself."""

    can_fork = False

    def __init__(self, backend: object) -> None:
        self._backend = backend
        self.asked = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)

    def reset_plain_function(self) -> None:
        self.asked += 1
        raise AttributeError("fgpy_reset_plain")


def test_a_c_loop_that_cannot_be_had_leaves_the_registrations_and_is_asked_for_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    monkeypatch.setattr(_registry, "PLAIN_IN_C_FROM", 2)
    backend = _NoCLoop(_registry._backend.load())
    registry = _registry.Registry(backend)  # type: ignore[arg-type]
    locks = [threading.Lock() for _ in range(4)]
    regs = [registry.register(lock) for lock in locks]
    assert all(reg.active for reg in regs)
    assert len(registry._plain_locks) == 4
    assert (registry._reset_plain, backend.asked) == (None, 1)
    for lock in locks:
        lock.acquire()
    registry.after_fork_in_child()  # the Python loops
    assert not any(lock.locked() for lock in locks)
    for reg in regs:
        reg.unregister()


def test_the_c_loop_refuses_what_is_not_its_tuple() -> None:
    lib = pytest.importorskip("forkguard._native").lib
    registry = _registry.Registry(_registry._backend.load())
    assert lib.fgpy_reset_plain(registry._plain_id) == 0  # nothing registered: done
    wrong = ("not", "the", "registry's", "tuple")
    assert lib.fgpy_reset_plain(id(wrong)) == -1
    no_dicts = ("not", "the", "registry's", "dicts", "at", "all")
    assert lib.fgpy_reset_plain(id(no_dicts)) == -1
    bad_waiters = ({}, {}, {1: "not a tuple"}, *registry._plain[3:])
    assert lib.fgpy_reset_plain(id(bad_waiters)) == -1


FAULTS = """
    import json, os, statistics, sys, threading
    import forkguard

    how, n = sys.argv[1], int(sys.argv[2])
    locks = [threading.Lock() for _ in range(n)]
    if how == "hand":
        def reinit():
            for lock in locks:
                lock._at_fork_reinit()
        os.register_at_fork(after_in_child=reinit)
    else:
        regs = [forkguard.register(lock) for lock in locks]
        if how == "python":
            forkguard._REGISTRY._reset_plain = None  # the Python loops, as before C
    faults = []
    for _ in range(9):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        faults.append(os.wait4(pid, 0)[2].ru_minflt)
    print(json.dumps({"faults": statistics.median(faults)}))
"""


@pytest.mark.skipif(
    sys.platform != "linux", reason="the fault counts below are Linux's, with 4 KiB pages"
)
def test_a_child_writes_no_page_of_weak_references() -> None:
    """Page faults, not time: each page a child writes is one.  20,000 weak references
    fill about 400 pages; the hand-written loop over the same locks is the floor."""
    n = "20000"
    hand = run(FAULTS, "hand", n)[0]["faults"]
    in_c = run(FAULTS, "c", n)[0]["faults"]
    python = run(FAULTS, "python", n)[0]["faults"]
    assert isinstance(hand, float | int) and isinstance(in_c, float | int)
    assert isinstance(python, float | int)
    # The count sees the weak references (the Python loops write them) ...
    assert python - hand > 200, (hand, in_c, python)
    # ... and with the C loop they are gone: only the locks' own pages remain.
    assert in_c - hand < 60, (hand, in_c, python)
