"""Registering and unregistering from several threads while another thread forks."""

from __future__ import annotations

import queue
import random
import threading
from types import ModuleType

import forkguard

from forking import run_in_child

OK = 20.0
FORKS = 40
WORKERS = 8


def _churn(
    mine: list[object], seed: int, stop: threading.Event, errors: list[BaseException]
) -> None:
    """Register and unregister Python locks, Queues and C mutexes at random until stopped."""
    rng = random.Random(seed)
    live: list[tuple[forkguard.Registration, object]] = []
    try:
        while not stop.is_set():
            if live and rng.random() < 0.5:
                reg, _ = live.pop(rng.randrange(len(live)))
                assert reg.unregister()
                continue
            kind = rng.randrange(3)
            if kind == 0:
                obj: object = threading.Lock()
                obj.acquire()  # type: ignore[attr-defined]
            elif kind == 1:
                obj = queue.Queue()
                obj.mutex.acquire()  # type: ignore[attr-defined]
            else:
                obj = mine[rng.randrange(len(mine))]
                if any(o is obj for _, o in live):
                    continue
                live.append((forkguard.register(obj, mutex_type="normal"), obj))
                continue
            live.append((forkguard.register(obj), obj))
    except BaseException as exc:
        errors.append(exc)
    finally:
        for reg, _ in live:
            reg.unregister()


def test_register_and_unregister_while_forking(ext: ModuleType) -> None:
    lib = ext.lib
    mutexes = [lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0) for _ in range(WORKERS * 8)]
    stop = threading.Event()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_churn, args=(mutexes[i * 8 : i * 8 + 8], i, stop, errors))
        for i in range(WORKERS)
    ]
    for t in threads:
        t.start()

    def child() -> None:
        # Every object registered at fork time is usable; the registry works.
        for reg in forkguard.registrations():
            obj = reg.target
            if reg.kind == "threading.Lock":
                assert obj.acquire(blocking=False), reg  # type: ignore[union-attr]
            elif reg.kind == "queue.Queue":
                obj.put_nowait(1)  # type: ignore[union-attr]
            elif reg.kind.startswith("pthread_mutex_t"):
                # A registration a thread had half made at fork time is in the C registry
                # (and restored) but has no Python object: it is listed by address.
                ptr = ext.ffi.cast("pthread_mutex_t *", obj) if isinstance(obj, int) else obj
                assert lib.pthread_mutex_trylock(ptr) == 0, reg
        with forkguard.register(threading.Lock()):
            pass

    try:
        for _ in range(FORKS):
            result = run_in_child(child, deadline=OK)
            assert result.status == "ok", result.detail
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert forkguard.registrations() == []
