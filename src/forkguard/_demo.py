"""``python -m forkguard demo``: the seed's deadlock, without and with forkguard, and
its children's log records: lost with only the queue registered, all there with the
listener registered."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any

from forkguard._seed import run_isolated

UNPROTECTED_POOLS = 30
UNPROTECTED_DEADLINE = 3.0  # a clean pool takes ~0.1 s here; a hung one never ends
PROTECTED_POOLS = 100
PROTECTED_DEADLINE = 15.0
QUEUE_ONLY_POOLS = 20
TIMED_POOLS = 6  # per other start method; the first is a warm-up


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def _all_arrived(result: dict[str, Any]) -> bool:
    return bool(
        result.get("child_records") == result.get("child_expected")
        and result.get("parent_handled") == result.get("parent_sent")
    )


def _records(result: dict[str, Any]) -> str:
    """One line: pools, and which records reached the log."""
    if result["result"] != "clean":
        return f"FAILED at pool {result['pool']} ({result['result']})"
    lost = result["parent_sent"] - result["parent_handled"]
    return (
        f"{result['clean_pools']} pools clean; the workers' records that reached the "
        f"log: {result['child_records']} of {result['child_expected']}; the parent's: "
        f"{result['parent_handled']:,} of {result['parent_sent']:,}"
        + (f" ({lost:,} lost)" if lost else "")
    )


def run(
    out: Any = None, *, protected_pools: int = PROTECTED_POOLS, timed_pools: int = TIMED_POOLS
) -> int:
    """Print the demo's report to `out`; 0 when the protected run was clean."""
    out = out or sys.stdout
    start = time.monotonic()

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if not hasattr(os, "fork"):
        say("forkguard demo: this platform has no fork(), so there is nothing to repair.")
        return 0

    say("forkguard demo: a thread logs through QueueHandler while multiprocessing Pools fork")
    say(
        f"(CPython {platform.python_version()}, {platform.system()}, "
        f"{os.cpu_count()} CPUs; each pool: Pool(2), one apply(), close, join)"
    )
    say()

    bare = run_isolated(
        register="none",
        pools=UNPROTECTED_POOLS,
        deadline=UNPROTECTED_DEADLINE,
        limit=UNPROTECTED_POOLS * UNPROTECTED_DEADLINE + 30,
    )
    if bare["result"] == "deadlocked":
        say(
            f"without forkguard: deadlocked at pool {bare['pool']} after "
            f"{bare['clean_pools']} clean pools: the worker waited "
            f"{UNPROTECTED_DEADLINE:g} s for the log queue's lock, which the logging "
            f"thread held at fork time"
        )
    else:
        say(
            f"without forkguard: {bare['clean_pools']} pools clean this time "
            f"(the race is timing-dependent; it usually hangs within a few pools)"
        )

    queue_only = run_isolated(
        register="queue",
        pools=QUEUE_ONLY_POOLS,
        deadline=PROTECTED_DEADLINE,
        limit=QUEUE_ONLY_POOLS * 2.0 + 60,
    )
    say(f"with forkguard.register(log_queue): {_records(queue_only)}")
    guarded = run_isolated(
        register="listener",
        pools=protected_pools,
        deadline=PROTECTED_DEADLINE,
        limit=protected_pools * 2.0 + 60,
    )
    clean = guarded["result"] == "clean" and _all_arrived(guarded)
    say(f"with forkguard.register(listener): {_records(guarded)}")

    say()
    say("time per pool, with the logging thread running (median):")
    rows: list[tuple[str, float]] = []
    if guarded["seconds"]:
        rows.append(("fork + forkguard", _median_ms(guarded["seconds"])))
    for method in ("forkserver", "spawn"):
        timed = run_isolated(
            register="none", pools=timed_pools, deadline=PROTECTED_DEADLINE, method=method
        )
        if len(timed["seconds"]) > 1:
            rows.append((method, _median_ms(timed["seconds"][1:])))
        else:
            say(f"  {method}: {timed['result']}")
    base = rows[0][1] if rows and rows[0][0].startswith("fork +") else None
    for label, ms in rows:
        ratio = f"  ({ms / base:.1f}x fork)" if base and label != rows[0][0] else ""
        say(f"  {label:<18}{ms:8.1f} ms{ratio}")
    say()
    say(f"done in {time.monotonic() - start:.0f} s")
    return 0 if clean else 1
