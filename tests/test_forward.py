"""Children's records reach the parent's QueueListener: none lost, none twice.

The seed's set-up (QueueHandler -> queue.Queue -> QueueListener -> FileHandler)
with a parent thread logging numbered records without pause.  Children log
numbered records and leave in every way a child leaves; what must arrive is
counted in the file: each child record once, each parent record once.  With only
the queue registered (no hang, but the child's records go into its own copy of
the queue, which nothing reads), they are lost: the unprotected variant.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
from collections.abc import Callable, Iterator
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import Any

import pytest

import forkguard

from forking import run_in_child
from scenario_script import run_script

DEADLINE = 5.0
CHILD_RECORDS = 20


_SEEDS = itertools.count()


class Seed:
    """The seed's logging, to a file, with a parent thread logging numbered records."""

    def __init__(self, path: Path, register: str) -> None:
        self.path = path
        self.queue: queue.Queue[Any] = queue.Queue()
        self.handler = logging.FileHandler(path)
        self.listener = QueueListener(self.queue, self.handler)
        self.listener.start()
        # A logger of its own: named by id(), a later Seed at the same address got an
        # earlier one's logger, QueueHandler and all, and its children hung on that
        # unregistered queue's mutex.
        self.log = logging.getLogger(f"forkguard-test-{next(_SEEDS)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        self.log.addHandler(QueueHandler(self.queue))
        what = self.listener if register == "listener" else self.queue
        self.registration = forkguard.register(what)
        self.parent_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._parent_logs, daemon=True)
        self._thread.start()

    def _parent_logs(self) -> None:
        while not self._stop.is_set() and self.parent_sent < 100_000:
            self.log.info("parent %d", self.parent_sent)
            self.parent_sent += 1

    def finish(self) -> dict[str, list[str]]:
        self._stop.set()
        self._thread.join(10)
        if self.listener._thread is not None:  # type: ignore[attr-defined]
            self.listener.stop()  # registered: takes in what children sent, first
        self.handler.close()
        self.registration.unregister()
        text = self.path.read_text()
        return {
            "parent": re.findall(r"^parent (\d+)$", text, re.M),
            "child": re.findall(r"^child (\d+) (\d+)$", text, re.M),
        }


@pytest.fixture
def seed(tmp_path: Path) -> Iterator[Callable[[str], Seed]]:
    made: list[Seed] = []

    def make(register: str) -> Seed:
        made.append(Seed(tmp_path / f"out-{len(made)}.log", register))
        return made[-1]

    yield make
    for s in made:
        s.finish()  # again if the test did: harmless


def _log_and_leave(s: Seed, k: int, how: str) -> Callable[[], object]:
    def child() -> bool:
        for j in range(CHILD_RECORDS):
            s.log.info("child %d %d", k, j)
        if how == "SIGTERM":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # as Pool.terminate() ends a worker
        return True  # os._exit, as multiprocessing's workers leave

    return child


def _counts(found: dict[str, list[str]], s: Seed, children: int) -> tuple[bool, bool]:
    child = sorted(found["child"])
    expected = sorted((str(k), str(j)) for k in range(children) for j in range(CHILD_RECORDS))
    parent = sorted(map(int, found["parent"]))
    return child == expected, parent == list(range(s.parent_sent))


EXITS = ["return", "SIGTERM"]  # sys.exit needs a whole program: see below


@pytest.mark.parametrize("how", EXITS)
def test_children_records_are_lost_with_only_the_queue_registered(seed: Any, how: str) -> None:
    s = seed("queue")
    for k in range(3):
        run_in_child(_log_and_leave(s, k, how), deadline=DEADLINE)
    found = s.finish()
    assert found["child"] == [], found["child"][:5]


@pytest.mark.parametrize("how", EXITS)
def test_a_registered_listener_gets_every_child_record_once(seed: Any, how: str) -> None:
    s = seed("listener")
    for k in range(3):
        result = run_in_child(_log_and_leave(s, k, how), deadline=DEADLINE)
        expected = "crashed" if how == "SIGTERM" else "ok"
        assert result.status == expected, result
    found = s.finish()
    children_ok, parent_ok = _counts(found, s, 3)
    assert children_ok, sorted(found["child"])[:10]
    assert parent_ok, (len(found["parent"]), s.parent_sent)


# --------------------------------------------------------------------------
# Whole programs (tests/forward_scenarios.py): every way a child leaves, sys.exit
# through the interpreter's real shutdown included, and protect() alone.

SCRIPT = str(Path(__file__).with_name("forward_scenarios.py"))


def run(mode: str, how: str) -> dict[str, Any]:
    summary, _, _ = run_script(SCRIPT, "--mode", mode, "--exit", how)
    return summary


@pytest.mark.parametrize("how", ["os._exit", "pool"])
def test_a_whole_program_loses_children_records_with_only_the_queue(how: str) -> None:
    result = run("queue", how)
    assert result["child_records"] == 0, result
    assert result["parent_found"] == result["parent_unique"] == result["parent_sent"], result


@pytest.mark.parametrize("how", ["os._exit", "sys.exit", "SIGTERM", "pool"])
@pytest.mark.parametrize("mode", ["listener", "protect"])
def test_a_whole_program_keeps_every_record_once(mode: str, how: str) -> None:
    result = run(mode, how)
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert result["child_records"] == result["child_unique"] == result["child_expected"], result
    assert result["parent_found"] == result["parent_unique"] == result["parent_sent"], result


def _pool_task(k: int) -> int:
    logging.getLogger("forkguard-pool").info("child %d %d", k, 0)
    return k


@pytest.mark.parametrize("register", ["queue", "listener"])
def test_a_fork_pool_terminated_while_idle(seed: Any, register: str) -> None:
    s = seed(register)
    pool_log = logging.getLogger("forkguard-pool")
    pool_log.propagate = False
    pool_log.setLevel(logging.INFO)
    handler = QueueHandler(s.queue)
    pool_log.addHandler(handler)
    try:
        pool = multiprocessing.get_context("fork").Pool(2)
        try:
            # A deadline: a hung worker fails the test instead of stalling the suite.
            done = pool.map_async(_pool_task, range(40), chunksize=1).get(timeout=60)
            assert done == list(range(40))
        finally:
            pool.terminate()  # the workers are idle: SIGTERM
            pool.join()
    finally:
        pool_log.removeHandler(handler)
    found = s.finish()
    tasks = sorted(int(k) for k, _ in found["child"])
    assert tasks == ([] if register == "queue" else list(range(40))), tasks
    assert sorted(map(int, found["parent"])) == list(range(s.parent_sent))


def test_what_the_parent_had_queued_is_handled_once_by_the_parent_only(tmp_path: Path) -> None:
    gate = threading.Event()
    handled: list[str] = []

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            gate.wait()
            handled.append(record.getMessage())

    q: queue.Queue[Any] = queue.Queue()
    listener = QueueListener(q, Slow())
    listener.start()
    reg = forkguard.register(listener)
    handler = QueueHandler(q)
    for i in range(50):  # the listener is stuck on the first: 49 wait in the queue
        q.put_nowait(handler.prepare(logging.makeLogRecord({"msg": f"parent {i}"})))

    def child() -> bool:
        assert q.qsize() == 0  # the parent's records stay the parent's
        q.put_nowait(handler.prepare(logging.makeLogRecord({"msg": "child 0"})))
        return True

    try:
        assert run_in_child(child, deadline=DEADLINE)
    finally:
        gate.set()
        listener.stop()
        reg.unregister()
    assert sorted(handled) == sorted([f"parent {i}" for i in range(50)] + ["child 0"])


class Item:
    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)


def test_forward_carries_any_picklable_item_of_any_size() -> None:
    q: queue.Queue[Any] = queue.Queue()
    sizes = [0, 1, 32 * 1024 - 40, 32 * 1024, 200 * 1024, 3 * 1024 * 1024]
    sent: list[bytes] = []
    with forkguard.forward(q) as forwarding:

        def child() -> bool:
            for size in sizes:
                item = Item(size)
                q.put(item)
                os.write(w, b"=" + item.data[:16].hex().encode() + b"\n")
            return True

        r, w = os.pipe()
        try:
            assert run_in_child(child, deadline=DEADLINE)
        finally:
            os.close(w)
            with os.fdopen(r) as marks:
                sent = marks.read().split()
        assert forwarding.drain(10)
        assert forwarding.received == len(sizes)
    got = [q.get_nowait() for _ in sizes]
    assert [len(i.data) for i in got] == sizes
    assert ["=" + i.data[:16].hex() for i in got] == sent


def test_an_unpicklable_item_is_refused_in_the_child_with_the_reason() -> None:
    q: queue.Queue[Any] = queue.Queue()
    with forkguard.forward(q, name="results"):

        def child() -> bool:
            with pytest.raises(TypeError, match="items put on results go to the parent"):
                q.put(threading.Lock())
            return True

        assert run_in_child(child, deadline=DEADLINE)


def test_forward_refuses_what_is_not_a_queue() -> None:
    with pytest.raises(TypeError, match=r"forward\(\) takes a queue\.Queue"):
        forkguard.forward(multiprocessing.get_context("fork").SimpleQueue())  # type: ignore[arg-type]
    assert forkguard.registrations() == []


# --------------------------------------------------------------------------
# protect(): listeners running at the call and those started after it.


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _listener() -> tuple[QueueListener, Collect, logging.Logger]:
    q: queue.Queue[Any] = queue.Queue()
    collect = Collect()
    listener = QueueListener(q, collect)
    log = logging.getLogger(f"forkguard-test-protect-{id(q)}")
    log.propagate = False
    log.addHandler(QueueHandler(q))
    return listener, collect, log


def test_protect_registers_the_listeners_running_and_those_started_after() -> None:
    original_start = QueueListener.start
    running, running_got, running_log = _listener()
    running.start()
    handle = forkguard.protect()
    try:
        later, later_got, later_log = _listener()
        later.start()

        def child() -> None:
            running_log.warning("from the child")
            later_log.warning("from the child")

        for _ in range(3):
            assert run_in_child(child, deadline=DEADLINE).status == "ok"
        running.stop()  # registered: takes in what children sent, first
        later.stop()
    finally:
        handle.undo()
    assert running_got.messages == later_got.messages == ["from the child"] * 3

    # undo(): listeners started from now on are left alone (children keep their records).
    assert QueueListener.start is original_start
    after, after_got, after_log = _listener()
    after.start()
    try:
        assert run_in_child(lambda: after_log.warning("lost"), deadline=DEADLINE).status == "ok"
    finally:
        after.stop()
    assert after_got.messages == []
