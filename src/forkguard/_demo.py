"""``python -m forkguard demo``: the seed's deadlock, without and with forkguard."""

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
TIMED_POOLS = 6  # per other start method; the first is a warm-up


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


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
        protect=False,
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

    guarded = run_isolated(
        protect=True,
        pools=protected_pools,
        deadline=PROTECTED_DEADLINE,
        limit=protected_pools * 2.0 + 60,
    )
    clean = guarded["result"] == "clean"
    if clean:
        say(f"with forkguard.register(queue): {guarded['clean_pools']} pools clean")
    else:
        say(
            f"with forkguard.register(queue): FAILED at pool {guarded['pool']} "
            f"({guarded['result']}) after {guarded['clean_pools']} clean pools"
        )

    say()
    say("time per pool, with the logging thread running (median):")
    rows: list[tuple[str, float]] = []
    if guarded["seconds"]:
        rows.append(("fork + forkguard", _median_ms(guarded["seconds"])))
    for method in ("forkserver", "spawn"):
        timed = run_isolated(
            protect=False, pools=timed_pools, deadline=PROTECTED_DEADLINE, method=method
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
