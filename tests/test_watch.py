"""forkguard.watch(): a child stuck on a lock held at its fork reports it; other
children are left exactly as they were.  Every child runs under a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import forkguard

from forking import STALLED_FILE

DEADLINE = 30
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

# A Queue whose _put() stops inside put() (its mutex held) until told to go on: the
# thread "holder" holds the queue's mutex in queue.Queue.put when the parent forks.
PROGRAM = """
import os, queue, sys, threading, warnings
warnings.simplefilter("ignore", DeprecationWarning)
import forkguard

class SlowQueue(queue.Queue):
    def _put(self, item):
        inside.set()
        go_on.wait(60)
        super()._put(item)

inside, go_on = threading.Event(), threading.Event()
q = SlowQueue()
{setup}
threading.Thread(target=q.put, args=(0,), name="holder", daemon=True).start()
inside.wait(10)
pid = os.fork()
if pid == 0:
    __import__("signal").alarm({child_deadline})
    go_on.set()  # (the holder's _put() would wait for it otherwise)
    q.put(1)
    os.write(1, b"child got through\\n")
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("status", os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
"""


def run_program(setup: str, child_deadline: int = 20) -> subprocess.CompletedProcess[str]:
    code = PROGRAM.format(setup=textwrap.dedent(setup), child_deadline=child_deadline)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_without_watch_the_child_hangs_silently() -> None:
    proc = run_program("", child_deadline=2)
    assert "status -14" in proc.stdout  # SIGALRM: the deadline ended it
    assert "forkguard" not in proc.stderr


def test_a_stuck_child_reports_the_lock_the_holder_and_the_fix_then_exits() -> None:
    proc = run_program("forkguard.watch(timeout=0.5, action='exit')")
    assert f"status {forkguard.HANG_EXIT_STATUS}" in proc.stdout, proc.stderr
    report = proc.stderr
    assert "has been stuck for" in report
    assert "waiting for: the mutex of <__main__.SlowQueue at" in report
    # the parent's thread that held it, and its stack at the fork
    assert "thread 'holder'" in report and "this was the one thread" in report
    assert "in queue.Queue.put" in report or "in queue.put" in report
    assert "fix: forkguard.register(<__main__.SlowQueue at" in report
    assert "child got through" not in proc.stdout


def test_action_report_leaves_the_child_running() -> None:
    proc = run_program("forkguard.watch(timeout=0.5)", child_deadline=3)
    assert "status -14" in proc.stdout  # still stuck after its report: the deadline
    assert proc.stderr.count("has been stuck for") == 1  # one report, not one per look


def test_a_registered_queue_does_not_hang_and_is_not_reported() -> None:
    proc = run_program("forkguard.register(q)\nforkguard.watch(timeout=0.5, action='exit')")
    assert "status 0" in proc.stdout and "child got through" in proc.stdout
    assert "forkguard.watch" not in proc.stderr


CLEAN = """
import os, sys, threading, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)
import forkguard
stop = threading.Event()
for i in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
{setup}
pid = os.fork()
if pid == 0:
    time.sleep(1.5)  # longer than the watch timeout: a long-lived child that is fine
    print("child", threading.active_count(), flush=True)
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(5)
    os._exit(3 + os.WEXITSTATUS(os.waitpid(grandchild, 0)[1]))
_, status = os.waitpid(pid, 0)
print("status", os.WEXITSTATUS(status))
"""


def test_children_that_do_not_hang_are_left_as_they_were() -> None:
    outputs = []
    for setup in ("", "forkguard.watch(timeout=0.5, action='exit')"):
        proc = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-c", CLEAN.format(setup=setup)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        outputs.append((proc.returncode, proc.stdout, proc.stderr))
    assert outputs[0] == outputs[1] == (0, "child 1\nstatus 8\n", "")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="timeout must be a number"):
        forkguard.watch(timeout="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be a number"):
        forkguard.watch(timeout=True)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number > 0"):
            forkguard.watch(timeout=bad)
    with pytest.raises(ValueError, match="action must be 'report' or 'exit', not 'kill'"):
        forkguard.watch(action="kill")  # type: ignore[arg-type]


def test_stop_switches_it_off() -> None:
    from forkguard import _watch

    handle = forkguard.watch(timeout=1.0)
    try:
        assert handle.active and "active" in repr(handle)
    finally:
        handle.stop()
    assert not handle.active and _watch._current is None
    assert _watch._on_gc not in __import__("gc").callbacks


@pytest.mark.parametrize("gil", [True, False], ids=["gil", "no-gil"])
def test_the_look_before_a_fork_sees_a_file_held_by_another_thread(
    gil: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: the parent's look reads a buffered file's owner field, and records
    the thread inside its write() (no fork needed to see that).  Without the GIL the
    field is read while holding the file (another thread could free it meanwhile)."""
    import io
    import threading

    from forkguard import _watch

    if not gil:
        monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)

    inside, go_on = threading.Event(), threading.Event()

    class Stalled(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            inside.set()
            go_on.wait(10)
            return len(b)

    f = io.BufferedWriter(Stalled())
    handle = forkguard.watch(timeout=1.0)
    owner = _watch._known[id(f)].owner
    assert isinstance(owner, _watch._Owner) is not gil
    writer = threading.Thread(target=lambda: (f.write(b"x"), f.flush()), name="writer")
    try:
        writer.start()
        assert inside.wait(10)
        _watch._before()
        try:
            record = _watch._records.get(threading.get_ident())
            assert record is not None
            held = [h for h in record.held if h.known.lock() is f]
            assert [(h.how, [t.name for t in h.holders]) for h in held] == [
                ("recorded", ["writer"])
            ]
        finally:
            _watch._after_in_parent()
        assert not _watch._records
    finally:
        go_on.set()
        writer.join(10)
        handle.stop()


FILE_PROGRAM = (
    """
import io, os, signal, threading
import forkguard
"""
    + STALLED_FILE
    + """
{setup}
threading.Thread(target=lambda: (f.write(b"x"), f.flush()), name="writer", daemon=True).start()
inside.wait(10)
pid = os.fork()
if pid == 0:
    signal.alarm(5)
    f.write(b"y")
    f.flush()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("status", os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
"""
)


def test_without_the_gil_a_fork_s_record_reads_no_other_thread_s_locals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Free-threaded CPython without the GIL: another thread's locals may change while
    they are read (which can crash the interpreter); its code and line are recorded,
    not the objects its frames work on."""
    import queue
    import threading

    from forkguard import _watch

    q: queue.Queue[int] = queue.Queue(maxsize=1)
    q.put(0)
    putter = threading.Thread(target=q.put, args=(1,), name="putter", daemon=True)
    putter.start()
    try:
        for _ in range(1000):  # until it waits inside Queue.put
            frame = sys._current_frames().get(putter.ident or 0)
            if frame is not None and frame.f_code.co_name == "wait":
                break
            putter.join(0.01)

        def seen() -> _watch.ThreadAtFork:
            frame = sys._current_frames()[putter.ident or 0]
            return _watch.ThreadAtFork(putter.ident, putter.name, None, frame, _watch._takers())

        assert id(q) in seen().selves  # with the GIL: the queue it works on
        monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
        without = seen()
        assert without.selves == set() and without.released is None
        assert [code.co_name for code, _ in without.stack][:2] == ["wait", "put"]
    finally:
        q.get()
        putter.join(10)


@pytest.mark.parametrize("watching", [False, True])
def test_a_child_stuck_on_a_file_held_at_the_fork_names_it_and_its_writer(watching: bool) -> None:
    setup = "forkguard.watch(timeout=0.5, action='exit')" if watching else ""
    proc = subprocess.run(
        [sys.executable, "-c", FILE_PROGRAM.format(setup=setup)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    if not watching:  # the unprotected child hangs: its deadline ends it, silently
        assert "status -14" in proc.stdout and "forkguard" not in proc.stderr
        return
    assert f"status {forkguard.HANG_EXIT_STATUS}" in proc.stdout, proc.stderr
    assert "waiting for: the buffer lock of <io.BufferedWriter at" in proc.stderr
    assert "thread 'writer'" in proc.stderr and "(as the lock records)" in proc.stderr


def _fork_record_in_process(monkeypatch: pytest.MonkeyPatch, during: Any) -> None:
    """Run watch()'s before-fork hook as a fork that records (every_child), with
    os.register_at_fork and sys.getswitchinterval replaced: `during(name)` runs inside
    each, where another forking thread could come in."""
    from forkguard import _watch

    real_interval = sys.getswitchinterval
    monkeypatch.setattr(_watch, "_phases_to_install", [True])  # (as in a fresh process)
    monkeypatch.setattr(_watch, "_hooked", True)  # (its before-hook is called here)
    monkeypatch.setattr(os, "register_at_fork", lambda **hooks: during("phases"))

    def interval() -> float:
        during("interval")
        return real_interval()

    monkeypatch.setattr(sys, "getswitchinterval", interval)
    handle = _watch.watch(timeout=1.0, every_child=True)
    try:
        _watch._before()
        _watch._after_in_parent()
    finally:
        handle.stop()


def test_a_second_forking_thread_finds_the_phases_installed_or_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two threads forking at once: the second must not see the phases as installed
    while the first is still installing them (its child would have no watchdog, and
    its parent would keep the raised switch interval).  Simulated: what another thread
    would see, looked at from inside the installation."""
    from forkguard import _watch

    seen: list[tuple[str, bool]] = []

    def during(name: str) -> None:
        if name == "phases":
            seen.append((name, bool(_watch._phases_to_install)))

    _fork_record_in_process(monkeypatch, during)
    assert seen == [("phases", True)] and _watch._phases_to_install == []


def test_the_switch_interval_is_saved_once_and_restored_by_the_last_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread's fork that records while this one saves the interval
    (simulated: it runs from inside this fork's getswitchinterval, in a thread this
    one waits a moment for): the interval saved must be the program's own (not the
    other fork's raised one), restored once both forks are over."""
    import threading

    from forkguard import _watch

    before = sys.getswitchinterval()  # (before the replacement)
    others: list[threading.Thread] = []

    def during(name: str) -> None:
        if name == "interval" and not others:

            def other_fork() -> None:
                _watch._before()
                _watch._after_in_parent()

            others.append(threading.Thread(target=other_fork))
            others[0].start()
            others[0].join(0.5)  # it waits for this fork's bookkeeping (or, unguarded, runs)

    _fork_record_in_process(monkeypatch, during)
    others[0].join(10)
    left = (_watch._records.copy(), _watch._switch.copy(), sys.getswitchinterval())
    _watch._switch.clear()
    sys.setswitchinterval(before)  # (whatever happened: the next tests need it)
    assert left == ({}, [], before)


def test_a_lock_learned_during_a_rebuild_of_the_look_s_lists_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lock learned (or a file gone) while another call rebuilds the lists the look
    reads: a garbage collection's callback inside the rebuild, or another thread.  The
    rebuild from the older table must not be the last word (simulated: the table adds
    a lock and asks for a rebuild just as it is read)."""
    import threading
    import types
    import weakref

    from forkguard import _watch

    first, late = threading.Lock(), threading.Lock()
    entry = {id(first): types.SimpleNamespace(owner=None, lock=weakref.ref(first))}

    class Table(dict[int, Any]):
        def values(self) -> Any:  # type: ignore[override]
            older = list(super().values())
            if id(late) not in self:  # meanwhile: a lock learned, the lists asked for
                self[id(late)] = types.SimpleNamespace(owner=None, lock=weakref.ref(late))
                _watch._index()
            return older

    monkeypatch.setattr(_watch, "_at_fork", Table(entry))
    try:
        _watch._index()
        assert {ref() for ref in _watch._lock_refs} == {first, late}
    finally:
        monkeypatch.undo()
        _watch._index()  # (the real table's lists again)


def test_a_collection_wraps_logging_s_handlers_only_while_no_watch_call_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """logging imported after watch(): the next garbage collection wraps its Handler's
    __init__, but not while a watch() call (in any thread) is wrapping: a class
    wrapped twice would learn each handler twice."""
    from forkguard import _watch

    calls: list[str] = []
    monkeypatch.setattr(_watch, "_wrapped", set())  # (logging not wrapped yet)
    monkeypatch.setattr(_watch, "_wrap_inits", lambda: calls.append("wrap"))
    monkeypatch.setattr(_watch, "_learn", lambda objects: None)
    with _watch._setup_lock():  # a watch() call under way
        _watch._on_gc("start", {})
    assert calls == []
    _watch._on_gc("start", {})
    assert calls == ["wrap"]
