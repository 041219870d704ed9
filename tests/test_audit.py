"""forkguard.audit(): each kind of finding, checked against what a forked child really does."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

import forkguard
from forkguard import _audit

from forking import run_in_child
from test_c_objects import Holders

HANG = 2.0  # a child that should hang is given this long
OK = 20.0


@contextmanager
def held_in_thread(lock: Any, name: str) -> Iterator[threading.Thread]:
    """`lock` held by a thread called `name`, inside a function called hold_it_for_the_test."""
    taken, done = threading.Event(), threading.Event()

    def hold_it_for_the_test() -> None:
        with lock:
            taken.set()
            done.wait(60)

    t = threading.Thread(target=hold_it_for_the_test, name=name, daemon=True)
    t.start()
    assert taken.wait(OK)
    try:
        yield t
    finally:
        done.set()
        t.join(OK)


def finding(report: forkguard.AuditReport, needle: str) -> _audit.HeldLock:
    found = [h for h in report.held if needle in h.what]
    assert len(found) == 1, str(report)
    return found[0]


def test_a_clean_process_gets_one_line() -> None:
    code = "import forkguard; print(forkguard.audit())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.splitlines() == [
        "forkguard.audit(): nothing found that would hang a child forked now "
        "(1 thread, no lock held, no fork-unsafe native library loaded)"
    ]


def test_a_queue_held_by_another_thread_names_the_thread_its_stack_and_the_fix() -> None:
    q: queue.Queue[int] = queue.Queue()
    with held_in_thread(q.mutex, "log_forever") as t:
        report = forkguard.audit()
        held = finding(report, f"the mutex of <queue.Queue at {id(q):#x}>")
        assert held.would_hang and held in report.would_hang
        assert held.holder is not None and held.holder.name == "log_forever"
        assert held.holder.ident == t.ident and held.holder.native_id == t.native_id
        assert any("hold_it_for_the_test" in line for line in held.holder.stack)
        assert held.fix == f"forkguard.register(<queue.Queue at {id(q):#x}>)"
        text = str(report)
        assert "[WOULD HANG]" in text and "'log_forever'" in text and held.fix in text
        # What the report says is what a child does: it hangs on the queue ...
        assert run_in_child(lambda: q.put(1), deadline=HANG).status == "hung"
        with forkguard.register(q):
            # ... until registered, which the report then says.
            again = finding(forkguard.audit(), f"the mutex of <queue.Queue at {id(q):#x}>")
            assert not again.would_hang and again.protection is not None
            assert "registered" in again.protection
            assert run_in_child(lambda: q.put(1), deadline=OK).status == "ok"


def test_a_logging_handler_lock_is_named_and_known_to_be_repaired_by_logging() -> None:
    handler = logging.StreamHandler(io.StringIO())
    with held_in_thread(handler.lock, "emitter"):
        held = finding(
            forkguard.audit(), f"the lock of <logging.StreamHandler at {id(handler):#x}>"
        )
        assert held.lock_type == "RLock"
        assert held.holder is not None and held.holder.name == "emitter"
        assert not held.holder.inferred  # an RLock records its owner
        assert held.protection is not None and "logging" in held.protection
        # CPython's logging re-creates its handlers' locks in a forked child: no hang.
        record = logging.makeLogRecord({"msg": "from the child"})
        assert run_in_child(lambda: handler.handle(record), deadline=OK).status == "ok"


def test_a_plain_lock_s_holder_is_told_by_the_one_stack_that_refers_to_it() -> None:
    lock = threading.Lock()
    with forkguard.register(lock, name="the test's lock"), held_in_thread(lock, "holder"):
        held = finding(forkguard.audit(), "the test's lock")
        assert not held.would_hang and held.protection is not None
        # A plain Lock keeps no owner; the one thread whose frames refer to it is named.
        assert held.holder is not None and held.holder.name == "holder"
        assert held.holder.inferred
        assert "records no owner" in str(forkguard.audit())
        # A second thread waiting for the same lock: two candidates, so no name.
        waiting = threading.Thread(target=lambda: lock.acquire(timeout=60), daemon=True)
        waiting.start()
        wait_for(lambda: len(_stacks_referring_to(lock)) == 2)
        held = finding(forkguard.audit(), "the test's lock")
        assert held.holder is None
        assert "no single other thread's stack refers to it" in str(forkguard.audit())
    waiting.join(OK)
    lock.release()  # the waiter got it


def test_without_the_gil_other_threads_locals_are_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Free-threaded CPython without the GIL: a running thread's locals change under a
    # reader (which can crash the interpreter), so a plain Lock's holder goes unnamed.
    lock = threading.Lock()
    with forkguard.register(lock, name="the test's lock"), held_in_thread(lock, "holder"):
        assert finding(forkguard.audit(), "the test's lock").holder is not None  # GIL on
        monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
        held = finding(forkguard.audit(), "the test's lock")
        assert held.would_hang is False and held.holder is None


def _stacks_referring_to(obj: object) -> list[int]:
    found = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        at: Any = frame
        while at is not None:
            if any(v is obj for v in at.f_locals.values()):
                found.append(ident)
                break
            at = at.f_back
    return found


def test_a_tracked_lock_under_protect_names_its_holder() -> None:
    with forkguard.protect():
        lock = threading.Lock()  # tracked: it records its owner
        with held_in_thread(lock, "tracked-holder"):
            held = [h for h in forkguard.audit().held if h.what == repr(lock)]
            assert len(held) == 1
            assert held[0].holder is not None and held[0].holder.name == "tracked-holder"
            assert held[0].protection is not None and "protect()" in held[0].protection


def test_a_buffered_file_busy_in_another_thread() -> None:
    read_end, write_end = os.pipe()
    f = open(write_end, "wb", buffering=1 << 16)  # noqa: SIM115 - closed below
    writing = threading.Thread(target=lambda: f.write(b"x" * (1 << 20)), name="writer", daemon=True)
    writing.start()  # blocks in write(2) once the pipe is full, holding the buffer lock
    try:
        wait_for(lambda: any("buffer lock" in h.what for h in forkguard.audit().held))
        held = finding(forkguard.audit(), f"the buffer lock of <io.BufferedWriter at {id(f):#x}>")
        assert held.holder is not None and held.holder.name == "writer"
        assert held.would_hang
    finally:
        drain = threading.Thread(target=lambda: _drain(read_end), daemon=True)
        drain.start()
        writing.join(OK)
        f.close()
        drain.join(OK)


def _drain(fd: int) -> None:
    with open(fd, "rb") as r:
        while r.read(1 << 16):
            pass


def wait_for(condition: Callable[[], bool]) -> None:
    import time

    give_up = time.monotonic() + OK
    while not condition():
        assert time.monotonic() < give_up, "the condition did not come true"
        time.sleep(0.01)


@contextmanager
def native_thread_holding(ext: ModuleType, m: Any, name: str) -> Iterator[int]:
    """A native thread (not started by Python) holding C mutex `m`, given the kernel
    name `name`: yields its thread id."""
    before = set(os.listdir("/proc/self/task"))
    holders = Holders(ext)
    holders.hold((ext.lib.K_MUTEX, m, 1))
    try:
        (tid,) = set(os.listdir("/proc/self/task")) - before
        with open(f"/proc/self/task/{tid}/comm", "w") as comm:
            comm.write(name)
        yield int(tid)
    finally:
        holders.stop()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_native_threads_are_listed_by_their_kernel_names(ext: ModuleType) -> None:
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with native_thread_holding(ext, m, "fg-native-test") as tid:
        native = [t for t in forkguard.audit().threads if t.native_id == tid]
        assert [(t.name, t.python) for t in native] == [("fg-native-test", False)]
        assert "native thread 'fg-native-test'" in str(forkguard.audit())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_a_registered_c_mutex_held_by_a_native_thread_names_that_thread(ext: ModuleType) -> None:
    if not getattr(forkguard._REGISTRY.backend, "owner_rule", False):
        pytest.skip("this C library's mutex layout is not known to forkguard")
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    free = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    with (
        native_thread_holding(ext, m, "fg-c-holder") as tid,
        forkguard.register(m, name="ext's mutex"),
        forkguard.register(free, name="idle"),
    ):
        report = forkguard.audit()
        held = finding(report, "ext's mutex")
        assert held.lock_type == "pthread_mutex_t (normal)" and not held.would_hang
        assert held.holder is not None and held.holder.ident is None
        assert (held.holder.name, held.holder.native_id) == ("fg-c-holder", tid)
        assert "native thread 'fg-c-holder'" in str(report)
        assert not [h for h in report.held if "idle" in h.what]  # a free one is not held
    with forkguard.register(m, name="released"):
        assert not [h for h in forkguard.audit().held if "released" in h.what]


def test_python_threads_are_listed_with_this_one_marked() -> None:
    with held_in_thread(threading.Lock(), "a-python-thread") as t:
        threads = forkguard.audit().threads
        mine = [x for x in threads if x.current]
        assert len(mine) == 1 and mine[0].ident == threading.get_ident()
        other = [x for x in threads if x.ident == t.ident]
        assert other and other[0].name == "a-python-thread" and other[0].python


def test_known_libraries_are_matched_by_file_name_hashed_copies_included() -> None:
    maps = "\n".join(
        [
            "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6",
            "7f01-7f02 r-xp 00000000 08:01 2 /venv/torch/lib/libgomp-a34b3233.so.1",
            "7f02-7f03 r--p 00001000 08:01 2 /venv/torch/lib/libgomp-a34b3233.so.1",
            "7f03-7f04 r-xp 00000000 08:01 3 /venv/numpy.libs/libscipy_openblas64_-56d6093b.so",
            "7f04-7f05 r-xp 00000000 08:01 4 /venv/grpc/_cython/cygrpc.cpython-311-x86.so",
            "7f05-7f06 rw-p 00000000 00:00 0 [heap]",
            "7f06-7f07 r-xp 00000000 08:01 5 /usr/lib/libcuda.so.1 (deleted)",
        ]
    )
    paths = _audit._paths_in_maps(maps)
    assert paths[0] == "/usr/lib/x86_64-linux-gnu/libc.so.6" and len(paths) == 5
    names = {f.name: f.path for f in _audit._libraries([], paths)}
    assert names == {
        "GNU OpenMP (libgomp)": "/venv/torch/lib/libgomp-a34b3233.so.1",
        "OpenBLAS": "/venv/numpy.libs/libscipy_openblas64_-56d6093b.so",
        "gRPC core": "/venv/grpc/_cython/cygrpc.cpython-311-x86.so",
        "CUDA driver and runtime": "/usr/lib/libcuda.so.1",
    }
    report = forkguard.AuditReport([], [], _audit._libraries([], paths), [])
    text = str(report)
    assert "what to do:" in text and "source: https://" in text


def test_every_known_library_has_a_source_and_advice() -> None:
    from forkguard._fork_unsafe import LIBRARIES

    assert len({lib.name for lib in LIBRARIES}) == len(LIBRARIES)
    for lib in LIBRARIES:
        assert lib.source.startswith("https://") and lib.problem and lib.remedy


def test_the_report_is_json_and_changes_nothing() -> None:
    before = forkguard.registrations()
    q: queue.Queue[int] = queue.Queue()
    with held_in_thread(q.mutex, "json-holder"):
        report = forkguard.audit()
        data = json.loads(json.dumps(report.as_dict()))
    assert forkguard.registrations() == before
    assert any(h["holder"] and h["holder"]["name"] == "json-holder" for h in data["held"])
    assert set(data) == {"held", "threads", "libraries", "notes"}
    assert "would hang" in repr(report)


def test_the_c_owner_reader_refuses_bad_handles_and_null(ext: ModuleType) -> None:
    from forkguard._native import ffi, lib

    if not getattr(forkguard._REGISTRY.backend, "owner_rule", False):
        pytest.skip("this C library's mutex layout is not known to forkguard")
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    rw = ext.lib.rwlock_new(0)
    out = ffi.new("long *", 7)
    with forkguard.register(m, mutex_type="normal") as reg, forkguard.register(rw) as other:
        assert lib.fg_mutex_owner(reg._handle, ffi.NULL) == lib.FORKGUARD_ENULL
        assert lib.fg_mutex_owner(other._handle, out) == lib.FORKGUARD_EINVAL  # not a mutex
        assert out[0] == 7  # nothing written on error
        assert lib.fg_mutex_owner(reg._handle, out) == lib.FORKGUARD_OK and out[0] == 0
    assert lib.fg_mutex_owner(reg._handle, out) == lib.FORKGUARD_ESTALE  # unregistered
    assert lib.fg_mutex_owner(0, out) == lib.FORKGUARD_ESTALE
