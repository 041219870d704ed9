"""forkguard.protect(): locks made the usual way come back free in children, unless the
forking thread holds them; the switch undoes cleanly; tracked locks behave as locks."""

from __future__ import annotations

import _thread
import contextlib
import io
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import forkguard
from forkguard import _protect

from forking import run_in_child

DEADLINE = 3.0
RAW_LOCK = type(threading.Lock())
RAW_RLOCK = type(threading.RLock())


@pytest.fixture
def protection() -> Iterator[forkguard.Protection]:
    handle = forkguard.protect()
    yield handle
    handle.undo()


def held_elsewhere(
    acquire: Callable[[], object], release: Callable[[], object]
) -> Callable[[], None]:
    """Start a thread that takes a lock and keeps it; returns the function that lets go."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        acquire()
        taken.set()
        done.wait()
        release()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(5)

    def let_go() -> None:
        done.set()
        thread.join(5)

    return let_go


def test_a_plain_lock_held_elsewhere_hangs_the_child_without_protect() -> None:
    lock = threading.Lock()
    let_go = held_elsewhere(lock.acquire, lock.release)
    try:
        assert run_in_child(lock.acquire, deadline=DEADLINE).status == "hung"
    finally:
        let_go()


@pytest.mark.parametrize("make", ["Lock", "RLock"])
def test_a_lock_held_elsewhere_is_free_in_the_child(protection: Any, make: str) -> None:
    lock = getattr(threading, make)()
    assert not isinstance(lock, (RAW_LOCK,)) and type(lock).__module__ == "forkguard._protect"
    let_go = held_elsewhere(lock.acquire, lock.release)
    try:

        def check() -> bool:
            assert lock.acquire(timeout=1)
            lock.release()
            return True

        assert run_in_child(check, deadline=DEADLINE)
    finally:
        let_go()
    assert not _protect._active


@pytest.mark.parametrize("protected", [False, True], ids=["bare", "protect"])
def test_strptime_s_module_lock_held_elsewhere(protected: bool) -> None:
    import _strptime  # made with _thread at import: protect() frees it by name

    let_go = held_elsewhere(_strptime._cache_lock.acquire, _strptime._cache_lock.release)
    try:
        with forkguard.protect() if protected else contextlib.nullcontext():
            result = run_in_child(
                lambda: time.strptime("2026", "%Y").tm_year == 2026, deadline=DEADLINE
            )
    finally:
        let_go()
    assert result.status == ("ok" if protected else "hung"), result


def test_a_plain_lock_the_forking_thread_holds_stays_held(protection: Any) -> None:
    lock = threading.Lock()
    with lock:

        def check() -> bool:
            assert lock.locked() and lock._is_owned()  # type: ignore[attr-defined]
            lock.release()  # the child's `with` block ends as the parent's does
            assert not lock.locked()
            return True

        assert run_in_child(check, deadline=DEADLINE)
    assert not lock.locked()


def test_an_rlock_the_forking_thread_holds_keeps_its_depth(protection: Any) -> None:
    rlock = threading.RLock()
    other = threading.RLock()
    let_go = held_elsewhere(other.acquire, other.release)
    try:
        with rlock, rlock:

            def check() -> bool:
                rlock.release()
                rlock.release()
                with pytest.raises(RuntimeError):
                    rlock.release()
                assert other.acquire(timeout=1)
                return True

            assert run_in_child(check, deadline=DEADLINE)
    finally:
        let_go()


def test_a_queue_made_under_protect_works_in_the_child(protection: Any) -> None:
    q: queue.Queue[int] = queue.Queue()
    assert isinstance(q.not_empty, _protect.Condition)
    waiter = threading.Thread(target=q.get, daemon=True)  # waits on not_empty
    waiter.start()
    let_go = held_elsewhere(q.mutex.acquire, q.mutex.release)
    try:

        def check() -> bool:
            assert not q.not_empty._waiters  # type: ignore[attr-defined]
            got: list[int] = []
            consumer = threading.Thread(target=lambda: got.append(q.get(timeout=1)))
            consumer.start()
            q.put(7)
            consumer.join(2)
            assert got == [7]
            return True

        assert run_in_child(check, deadline=DEADLINE)
    finally:
        let_go()
        q.put(0)
        waiter.join(5)


@pytest.mark.parametrize(
    "make",
    [
        "Semaphore",
        "BoundedSemaphore",
        "Event",
        "Barrier",
        "Condition",
    ],
)
def test_threading_objects_are_built_on_tracked_locks(protection: Any, make: str) -> None:
    # Looked up now: a reference taken before protect() would make untracked objects.
    obj = getattr(threading, make)(*([2] if make == "Barrier" else []))
    cond = obj if make == "Condition" else obj._cond
    assert isinstance(cond, _protect.Condition)
    assert type(cond._lock).__module__ == "forkguard._protect"


def test_undo_restores_threading_and_unregisters(protection: Any) -> None:
    before_call = queue.Queue()  # noqa: F841 - enrolled only if found by a later call
    protection.undo()
    assert isinstance(threading.Lock(), RAW_LOCK)
    assert isinstance(threading.RLock(), RAW_RLOCK)
    assert threading.Condition is _protect.Condition.__mro__[1]
    assert open is io.open and not getattr(open, "__module__", "").startswith("forkguard")
    assert forkguard.registrations() == []
    again = forkguard.protect()
    try:
        assert again is not protection and again.active
        assert forkguard.protect() is again
        enrolled = {r.kind for r in forkguard.registrations()}
        assert "queue.Queue" in enrolled
    finally:
        again.undo()


def test_files_opened_under_protect_are_registered(protection: Any, tmp_path: Path) -> None:
    with open(tmp_path / "log.txt", "w") as f:
        kinds = [r for r in forkguard.registrations() if r.kind == "io.TextIOWrapper"]
        assert any(f"{id(f):#x}" in repr(r) for r in kinds), kinds


@given(st.lists(st.sampled_from(["acquire", "try", "release", "locked"]), max_size=30))
def test_a_tracked_lock_answers_as_a_plain_lock(ops: list[str]) -> None:
    plain, tracked = _thread.allocate_lock(), _protect.Lock()
    for op in ops:
        answers = []
        for lock in (plain, tracked):
            try:
                if op == "acquire":
                    answers.append(lock.acquire(timeout=0))
                elif op == "try":
                    answers.append(lock.acquire(False))
                elif op == "release":
                    lock.release()
                    answers.append(None)
                else:
                    answers.append(lock.locked())
            except RuntimeError as exc:
                answers.append(type(exc))
        assert answers[0] == answers[1], (op, answers)
    if tracked.locked():
        tracked.release()
    assert tracked not in _protect._active


SCRIPT = """
import os, sys, threading, forkguard
print("main", __name__, sys.argv[1:], type(threading.Lock()).__module__)
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_forkguard_run_protects_a_program_from_its_first_line(tmp_path: Path, how: str) -> None:
    (tmp_path / "prog.py").write_text(SCRIPT)
    target = [str(tmp_path / "prog.py")] if how == "script" else ["-m", "prog"]
    out = subprocess.run(
        [sys.executable, "-m", "forkguard", "run", "--protect", *target, "a", "b"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    ).stdout
    assert out == "main __main__ ['a', 'b'] forkguard._protect\n"


def test_forkguard_run_passes_the_exit_code(tmp_path: Path) -> None:
    (tmp_path / "fail.py").write_text("import sys; sys.exit(3)")
    proc = subprocess.run(
        [sys.executable, "-m", "forkguard", "run", str(tmp_path / "fail.py")],
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3


def test_forkguard_run_needs_a_program() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forkguard", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "give a script to run" in proc.stderr


def test_the_child_s_repair_keeps_entries_added_meanwhile() -> None:
    """A thread started by an earlier child hook may take a tracked lock while the
    repair runs: its entry must survive the repair (its release() removes it; were it
    dropped, that release() would raise).  Simulated in process: the one listed object
    adds such an entry when the repair looks at it."""
    late = _protect.Lock()

    class Vanished:  # a lock some thread of the parent was inside at the fork
        def _forkguard_child(self, me: int) -> bool:
            _protect._enter(late)  # the new thread, meanwhile
            return False  # freed: not the forking thread's

    saved = _protect._active[:]
    _protect._active[:] = [Vanished()]
    try:
        _protect._child_repairs()
        assert _protect._active == [late]
        _protect._leave(late)  # what late.release() does: it finds its entry
    finally:
        _protect._active[:] = saved


def test_two_threads_calling_protect_at_once_get_one_protection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second call arrives while the first is setting up (simulated: it is made
    from inside the first's set-up, in a thread the first waits a moment for).  It gets
    the first's protection; had it patched threading too, undo() would leave a tracked
    Lock in place of the original."""
    original = threading.Lock
    probe = _protect._cpython_io._layout
    second: list[forkguard.Protection] = []

    def layout_then_a_second_call() -> object:
        monkeypatch.setattr(_protect._cpython_io, "_layout", probe)  # (once)
        other = threading.Thread(target=lambda: second.append(forkguard.protect()))
        other.start()
        other.join(0.5)  # it waits for the first call's set-up (or, unguarded, runs it)
        layout_then_a_second_call.thread = other  # type: ignore[attr-defined]
        return probe()

    monkeypatch.setattr(_protect._cpython_io, "_layout", layout_then_a_second_call)
    first = forkguard.protect()
    try:
        layout_then_a_second_call.thread.join(5)  # type: ignore[attr-defined]
        assert second == [first]
    finally:
        first.undo()
    assert threading.Lock is original and isinstance(threading.Lock(), RAW_LOCK)


def test_an_object_enrolled_while_another_thread_undoes_is_let_go(
    protection: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """open() in one thread registers the file just as another thread undoes the
    protection (simulated: the undo runs inside that registration).  The file's
    registration ends; kept, it would outlive the protection."""
    from forkguard import _registry

    made: list[Any] = []
    register = _registry.Registry.register

    def register_then_undo(self: Any, obj: object, *args: Any, **kwargs: Any) -> Any:
        reg = register(self, obj, *args, **kwargs)
        made.append(reg)
        protection.undo()
        return reg

    monkeypatch.setattr(_registry.Registry, "register", register_then_undo)
    with open(tmp_path / "f.txt", "w") as f:
        assert len(made) == 1 and not made[0].active
        assert f not in [r.target for r in forkguard.registrations()]
