"""What Python runs at a fork, counted: the guard against forkguard's per-fork work growing.

Every Python function that runs costs a fork copy-on-write page faults, so
forkguard's fork path is checked by counting the Python calls made in forkguard's
code at each fork (a profile function set just before ``os.fork()``), not by timing.
Also: the C core installs its pthread_atfork handlers only at the first C registration.
Each case runs in a fresh interpreter (fork hooks cannot be removed) and forks one
child, which reports what ran on its side; the parent reports what ran on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from forking import STALLED_FILE

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, queue

    exec(sys.argv[1])

    calls = []

    def profile(frame, event, arg):
        if event == "call" and "forkguard" in frame.f_code.co_filename:
            calls.append(frame.f_code.co_name)

    read_end, write_end = os.pipe()
    sys.setprofile(profile)
    pid = os.fork()
    sys.setprofile(None)
    if pid == 0:
        os.write(write_end, json.dumps(calls).encode())
        os._exit(0)
    os.close(write_end)
    child = json.loads(os.read(read_end, 1 << 20))
    os.waitpid(pid, 0)
    print(json.dumps({"child": child, "parent": calls}))
    """
)


def calls_at_fork(setup: str) -> dict[str, list[str]]:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, textwrap.dedent(setup)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(run.stdout)
    return result


C_MUTEXES = """
# Memory shaped and aligned like pthread_mutex_t, zeroed (a default mutex on glibc).
buffers = [ctypes.create_string_buffer(64) for _ in range({n})]
regs = [forkguard.register(ctypes.addressof(b), kind="pthread_mutex", mutex_type="normal")
        for b in buffers]
"""


@pytest.mark.parametrize(
    ("setup", "child"),
    [
        pytest.param("import forkguard", [], id="imported"),
        pytest.param("import forkguard\n" + C_MUTEXES.format(n=100), [], id="100 C mutexes"),
        pytest.param(
            "import forkguard\nregs = [forkguard.register(threading.Lock()) for _ in range(3)]\n"
            "for r in regs: r.unregister()",
            ["after_fork_in_child"],  # installed once needed, then idle
            id="registered, then unregistered",
        ),
    ],
)
def test_no_python_runs_in_the_parent(setup: str, child: list[str]) -> None:
    assert calls_at_fork(setup) == {"child": child, "parent": []}


# 200 of each: over PLAIN_IN_C_FROM plain locks, so the child resets them in C.
@pytest.mark.parametrize("n", [1, 100, 200])
def test_plain_locks_queues_and_conditions_cost_one_python_call_in_all(n: int) -> None:
    calls = calls_at_fork(
        f"""
        import forkguard
        keep = [threading.Lock() for _ in range({n})]
        keep += [queue.Queue() for _ in range({n})]
        keep += [threading.Condition() for _ in range({n})]
        regs = [forkguard.register(obj) for obj in keep]
        in_c = forkguard._REGISTRY._reset_plain is not None
        assert in_c == ({n} * 3 >= forkguard._registry.PLAIN_IN_C_FROM), in_c
        """
    )
    assert calls == {"child": ["after_fork_in_child"], "parent": []}, calls


def test_the_count_sees_per_object_python_calls() -> None:
    # The guard can fail: objects reset by Python code run a frame each, and show.
    calls = calls_at_fork(
        """
        import forkguard

        class Resettable:
            def __forkguard_reset__(self):
                pass

        keep = [Resettable() for _ in range(5)]
        regs = [forkguard.register(obj) for obj in keep]
        """
    )
    assert calls["parent"] == []
    assert calls["child"].count("reset") == 5, calls


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("forkguard._C_API_ADDRESS", id="the C API"),
        pytest.param(
            "buffer = ctypes.create_string_buffer(64)\n"
            "reg = forkguard.register(ctypes.addressof(buffer), kind='pthread_mutex',"
            " mutex_type='normal', policy='hold')",
            id="a C hold",
        ),
    ],
)
def test_c_holds_cost_the_parent_no_python_call(setup: str) -> None:
    """An extension that uses the C API (which may register holds at any time), or a
    C hold registered from Python: the parent's hook is a C function object
    (csrc/forkguard_holds.c) that reads the C core's count of holds that timed out and
    runs no Python while there are none (Python's full parent phase was about 30 page
    faults per fork); the child runs none either.  (A timeout does call Python:
    tests/test_hold.py.)"""
    installed = (
        "\nfrom forkguard import _fork_phases\n"
        "assert forkguard._REGISTRY._phases.installed == _fork_phases.C_HOLDS\n"
    )
    calls = calls_at_fork("import forkguard\n" + setup + installed)
    assert calls == {"child": [], "parent": []}, calls


def test_holds_run_in_all_three_phases() -> None:
    calls = calls_at_fork(
        """
        import forkguard
        lock = threading.Lock()
        reg = forkguard.register(lock, policy="hold")
        """
    )
    assert "before_fork" in calls["parent"] and "after_fork_in_parent" in calls["parent"]
    assert "before_fork" in calls["child"] and "after_fork_in_child" in calls["child"]


def test_the_c_handlers_wait_for_the_first_c_registration() -> None:
    script = textwrap.dedent(
        """
        import ctypes, os, threading
        import forkguard
        from forkguard._native import lib

        seen = [lib.fg_handlers_installed()]
        lock = threading.Lock()
        reg = forkguard.register(lock)  # Python only: no C handler needed
        seen.append(lib.fg_handlers_installed())
        buffer = ctypes.create_string_buffer(64)
        c = forkguard.register(ctypes.addressof(buffer), kind="pthread_mutex")
        seen.append(lib.fg_handlers_installed())
        c.unregister()
        seen.append(lib.fg_handlers_installed())  # installed for good
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write_end, bytes([lib.fg_handlers_installed()]))
            os._exit(0)
        os.waitpid(pid, 0)
        seen.append(os.read(read_end, 1)[0])
        print(seen)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["[0,", "0,", "1,", "1,", "1]"]


# What a process holds, every fork copies page tables for (about 50 ns per KB here,
# benchmarks/results/results.md), so the features a long-running process switches on
# load no module their work does not need: `typing` alone is about 440 KB of heap.
@pytest.mark.parametrize(
    "start",
    ["pass", "forkguard.watch()", "forkguard.protect()", "forkguard.forward(queue.Queue())"],
)
def test_starting_a_feature_imports_no_typing(start: str) -> None:
    script = textwrap.dedent(
        f"""
        import logging, queue, sys, threading
        before = set(sys.modules)
        import forkguard
        {start}
        print(sorted(set(sys.modules) - before))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = run.stdout
    assert "'typing'" not in loaded and "forkguard" in loaded, loaded


# watch() on, after one fork (the first counts the process's threads).
WATCHING = """
import forkguard
w = forkguard.watch()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""

# A buffered file a thread will be stopped inside a write to, holding its lock.
FILE_HELD = "import atexit\n" + STALLED_FILE

HOLD_IT = """
writer = threading.Thread(target=lambda: (f.write(b"x"), f.flush()), daemon=True)
writer.start()
assert inside.wait(10)
atexit.register(lambda: (go_on.set(), writer.join(10)))
"""


# A file the C hook's list still has, gone (between its end and the list's rebuild).
FILE_GONE = """
import io, weakref
from forkguard import _watch
g = io.BufferedWriter(io.BytesIO())
gone = weakref.ref(g)
del g
assert gone() is None
_watch._c_state[2] += (gone,)
"""


# Locks the C hook tries: a queue's mutex (a Lock) and a Condition's RLock, free.
LOCKS = "q, cond = queue.Queue(), threading.Condition()\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [("", ""), ("", FILE_GONE), (LOCKS, "")],
    ids=["files", "a file gone", "locks"],
)
def test_watch_costs_the_parent_no_python_call_while_nothing_is_taken(
    before: str, after: str
) -> None:
    """watch()'s look is a C hook (csrc/forkguard_watch.c): it reads the known files'
    owner fields and tries the known locks, and calls the Python look only when one
    is taken or a thread count is due (every 32nd fork)."""
    assert calls_at_fork(before + WATCHING + after) == {"child": [], "parent": []}


def test_watch_calls_the_python_look_when_a_file_is_taken() -> None:
    calls = calls_at_fork(FILE_HELD + WATCHING + HOLD_IT)
    assert calls["parent"][:1] == ["_look"], calls
    assert "_after_in_child" in calls["child"], calls


# The same locks, each held by another thread at the fork; and a lock the C hook
# cannot try (a Condition's lock of a Python class), free.
HELD = """
held, done = threading.Event(), threading.Event()

def hold(lock):
    with lock:
        held.set()
        done.wait(30)

threading.Thread(target=hold, args=({lock},), daemon=True).start()
assert held.wait(10)
atexit.register(done.set)
"""
PY_LOCK = """
class PyLock:
    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True, timeout=-1):
        return self._lock.acquire(blocking, timeout)

    def release(self):
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()

cond = threading.Condition(PyLock())
"""


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (LOCKS, "import atexit\n" + HELD.format(lock="q.mutex")),
        (LOCKS, "import atexit\n" + HELD.format(lock="cond")),
        (PY_LOCK, ""),
    ],
    ids=["a Lock held", "an RLock held", "a lock of Python's"],
)
def test_watch_calls_the_python_look_for_a_lock_taken_or_not_tried_in_c(
    before: str, after: str
) -> None:
    calls = calls_at_fork(before + WATCHING + after)
    assert calls["parent"][:1] == ["_look"], calls


def test_watch_s_c_hook_looks_in_python_while_its_state_is_of_another_watch() -> None:
    """The C hook's state is rebuilt by whichever thread gets _watch's index lock: a
    watch() that finds it taken (another thread is rebuilding) is not in it yet, and
    the hook must not go by it (a watch off, no on_fork): it calls the Python look,
    which rebuilds it once it can."""
    calls = calls_at_fork(
        """
        import forkguard
        from forkguard import _watch
        forkguard.watch().stop()  # the C hook installed, and off
        assert _watch._index_lock().acquire(False)  # another thread's rebuild, under way
        w = _watch.watch(on_fork=lambda: None)
        """
    )
    assert calls["parent"][:2] == ["_look", "_index"], calls


def test_watch_counts_threads_in_python_every_32nd_fork() -> None:
    more = "for _ in range(31):\n    os.waitpid(os.fork() or os._exit(0), 0)\n"
    calls = calls_at_fork(WATCHING + more)
    assert calls["parent"][:2] == ["_look", "_native_threads"], calls


def test_without_the_gil_watch_s_look_stays_in_python() -> None:
    # The count can fail: the Python hook runs at every fork.
    no_gil = "sys._is_gil_enabled = lambda: False\n"
    calls = calls_at_fork(no_gil + WATCHING)
    assert calls["parent"][:2] == ["_before", "_look"], calls
