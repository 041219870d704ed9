"""What importing and using forkguard adds to a fork, against honest baselines, side by side.

Each variant is a few long-lived processes of its own: "realistic" processes that have
imported threading, logging, queue and multiprocessing, then set up one variant
(forkguard not imported; imported with nothing registered; a hand-written fix; the
same thing through forkguard).  The driver asks the variants in turn, in a new random
order every round, for a batch of forks (``os.fork()``, ``os._exit(0)`` in the child,
``os.wait4()``), so every variant sees the same machine noise; differences of 1-3%
stay visible where separate runs would drift by more.  Each fork is timed, and its
minor page faults are counted in the child (``wait4``'s rusage) and in the parent
(``getrusage`` around the fork).

Also measured: ``import forkguard`` on top of ``import threading, queue, logging``,
in fresh interpreters, alternating with and without.

Writes pyperf JSON (one benchmark per variant; one run per process and round; faults in each
run's metadata): ``python bench_fastpath.py -o fastpath.json [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import NATIVE_ENV

LOCKS = 100  # Python locks in the "N locks" variants
MANY = 10000  # ... and in the "many locks" ones, where the cost per lock shows
MUTEXES = 1000  # C mutexes in the "C mutexes" variant
# Ten threads waiting on an event, as idle workers do (forkguard.watch()'s variants).
THREADS = (
    "stop = threading.Event()\n"
    "workers = [threading.Thread(target=stop.wait, daemon=True) for _ in range(10)]\n"
    "for worker in workers:\n"
    "    worker.start()\n"
)

# What one writes without forkguard: a child hook that re-initialises each of `locks`.
HAND_LOOP = (
    "def reinit():\n"
    "    for lock in locks:\n"
    "        lock._at_fork_reinit()\n"
    "os.register_at_fork(after_in_child=reinit)"
)
# name -> set-up code run in the variant's process after the realistic imports.
VARIANTS = {
    "bare": "",
    "imported": "import forkguard",
    # Controls: other imports, for the size of the effect any import has on a fork
    # (where the heap and the allocator's free lists lie when the child writes).
    "control-decimal": "import decimal",
    "control-dataclasses": "import dataclasses",
    # forkguard.watch(): what it adds to each fork of a process with 10 threads.
    "threads-10": "import forkguard\n" + THREADS,
    # The floor of any Python before-hook: one that does nothing.
    "empty-hook-threads-10": "import forkguard\n"
    + THREADS
    + "os.register_at_fork(before=lambda: None)",
    "watch-threads-10": "import forkguard\n" + THREADS + "handle = forkguard.watch()",
    "hand-queue": (
        "q = queue.Queue()\nos.register_at_fork(after_in_child=q.mutex._at_fork_reinit)"
    ),
    "forkguard-queue": "import forkguard\nq = queue.Queue()\nreg = forkguard.register(q)",
    "hand-locks": f"locks = [threading.Lock() for _ in range({LOCKS})]\n" + HAND_LOOP,
    "forkguard-locks": (
        "import forkguard\n"
        f"locks = [threading.Lock() for _ in range({LOCKS})]\n"
        "regs = [forkguard.register(lock) for lock in locks]"
    ),
    # Per lock, at MANY: the hand-written loop, forkguard, and the floor under forkguard:
    # its registrations kept (their memory, which every fork maps) with the child's
    # work done by the hand-written loop (the registry's list of plain locks emptied,
    # a private detail only this measurement touches).
    "hand-many-locks": f"locks = [threading.Lock() for _ in range({MANY})]\n" + HAND_LOOP,
    "forkguard-many-locks": (
        "import forkguard\n"
        f"locks = [threading.Lock() for _ in range({MANY})]\n"
        "regs = [forkguard.register(lock) for lock in locks]"
    ),
    "floor-many-locks": (
        "import forkguard\n"
        f"locks = [threading.Lock() for _ in range({MANY})]\n"
        "regs = [forkguard.register(lock) for lock in locks]\n"
        "forkguard._REGISTRY._plain_locks.clear()\n" + HAND_LOOP
    ),
    # The baseline for registering C mutexes: the extension that owns them is loaded
    # and has made them (cffi and its .so mapped), forkguard imported and its C core
    # loaded, none registered.  (Without the core loaded, this variant's children took
    # about 65 more page faults per fork in every process of a run, and one registered
    # mutex, which loads it, fewer: where glibc's heap then stood, not work at a fork.)
    "c-mutexes": (
        "import forkguard\n"
        "from common import native\n"
        f"lib = native().lib\narray = lib.bench_mutexes({MUTEXES})\n"
        "forkguard._REGISTRY.backend._lib  # loads the core"
    ),
    "forkguard-c-mutex": (  # one: the C core's fixed part (its handlers, its mapping)
        "import forkguard\n"
        "from common import native\n"
        f"lib = native().lib\narray = lib.bench_mutexes({MUTEXES})\n"
        "reg = forkguard.register(lib.bench_mutex_at(array, 0), mutex_type='normal')"
    ),
    # The fix an extension writes without forkguard: its own child handler runs
    # pthread_mutex_init on each of its mutexes (every page of them written).
    "hand-c-mutexes": (
        "import forkguard\n"
        "from common import native\n"
        f"lib = native().lib\narray = lib.bench_mutexes({MUTEXES})\n"
        "forkguard._REGISTRY.backend._lib  # loads the core\n"
        f"assert lib.bench_hand_reset(array, {MUTEXES}) == 0"
    ),
    # All of them registered through the C API (forkguard.h): the C core's part alone,
    # no Python object per mutex.
    "capi-c-mutexes": (
        "import forkguard\n"
        "from common import native\n"
        f"lib = native().lib\narray = lib.bench_mutexes({MUTEXES})\n"
        "table = native().ffi.cast('void *', forkguard._C_API_ADDRESS)\n"
        f"assert lib.bench_c_api_register_all(table, array, {MUTEXES}) == 0"
    ),
    "forkguard-c-mutexes": (
        "import forkguard\n"
        "from common import native\n"
        f"lib = native().lib\narray = lib.bench_mutexes({MUTEXES})\n"
        "regs = [forkguard.register(lib.bench_mutex_at(array, i), mutex_type='normal')\n"
        f"        for i in range({MUTEXES})]"
    ),
}

WORKER = r"""
import logging, multiprocessing, os, queue, resource, sys, threading, time, json, random
sys.path.insert(0, sys.argv[2])
# A random heap layout per process (objects of every small size, a random malloc):
# which objects share a page decides how many pages a child's writes copy, and it
# is fixed for given code, so without this one layout would stand for a variant.
padding = [bytes(random.randrange(1, 512)) for _ in range(random.randrange(1, 4000))]
padding.append(bytearray(random.randrange(1, 1 << 17)))
exec(sys.argv[1])
fork, exit_, wait4, clock = os.fork, os._exit, os.wait4, time.perf_counter
minflt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for line in sys.stdin:
    times, child, parent = [], 0, 0
    for _ in range(int(line)):
        before = minflt()
        start = clock()
        pid = fork()
        if pid == 0:
            exit_(0)
        usage = wait4(pid, 0)[2]
        times.append(clock() - start)
        parent += minflt() - before
        child += usage.ru_minflt
    n = len(times)
    sys.stdout.write(json.dumps([times, child / n, parent / n]) + "\n")
    sys.stdout.flush()
"""

IMPORT_PROBE = r"""
import sys, time
import threading, queue, logging
start = time.perf_counter()
if sys.argv[1] == "1":
    import forkguard
print(time.perf_counter() - start)
"""


MEMORY_PROBE = r"""
import gc, os, sys, threading
sys.path.insert(0, sys.argv[3])
import forkguard
kind, n, first = sys.argv[1], int(sys.argv[2]), 1000
if kind == "py-lock":
    objs, options = [threading.Lock() for _ in range(first + n)], {}
else:
    from common import native
    lib = native().lib
    array = lib.bench_mutexes(first + n)
    objs = [lib.bench_mutex_at(array, i) for i in range(first + n)]
    options = {"mutex_type": "normal"}
regs = [None] * len(objs)
for i in range(first):  # what the first registrations load (the C core, its tables) stays out
    regs[i] = forkguard.register(objs[i], **options)
gc.collect()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
for i in range(first, first + n):
    regs[i] = forkguard.register(objs[i], **options)
print((resident() - before) / n)
"""


# The anonymous memory forkguard.watch() adds to the 10-thread process: the modules it
# loads to diagnose (the audit, the files' layout check, ctypes, the C core) and what
# it learns of the process's locks.
WATCH_MEMORY_PROBE = r"""
import gc, logging, multiprocessing, os, queue, sys, threading
sys.path.insert(0, sys.argv[2])
exec(sys.argv[1])
def anonymous():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
gc.collect()
before = anonymous()
handle = forkguard.watch()
gc.collect()
print(anonymous() - before)
"""


def measure_watch_bytes() -> float:
    """Anonymous resident bytes forkguard.watch() adds to the "threads-10" variant."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", WATCH_MEMORY_PROBE, VARIANTS["threads-10"], here],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def measure_registration_bytes(kind: str) -> float:
    """Resident bytes per registration of a `kind` ("py-lock" or "c-mutex") at MANY
    registrations, Python's heap and the C core's together: what a fork copies page
    tables for (the object itself and the program's list of registrations left out)."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, kind, str(MANY), here],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def memory_control(c_mutex_bytes: float) -> str:
    """The "C mutexes" baseline holding as much more memory as registering them all
    takes, in bytes objects (each in an allocator size class a little over the
    measured bytes): the floor a registration of that size cannot go below."""
    size = max(int(c_mutex_bytes) - 40, 1)  # less a bytes object's header
    return VARIANTS["c-mutexes"] + f"\nballast = [bytes({size}) for _ in range({MUTEXES})]"


def watch_memory_control(watch_bytes: float) -> str:
    """The "threads-10" process holding as much more memory as watch() adds, in
    objects of 1 KiB (as `bytes`): the floor under watch() that is its memory."""
    count = max(int(watch_bytes) // 1024, 0)
    return VARIANTS["threads-10"] + f"\nballast = [bytes(1024 - 40) for _ in range({count})]"


def measure_forks(
    variants: dict[str, str], rounds: int, batch: int, processes: int
) -> dict[str, list[pyperf.Run]]:
    here = os.path.dirname(os.path.abspath(__file__))
    # Several processes per variant, each with its own heap layout (WORKER): the
    # layout moves a fork's time and page faults by about as much as the effects
    # measured here, and averaging over processes evens it out.
    workers = {
        (name, number): subprocess.Popen(
            [sys.executable, "-c", WORKER, setup, here],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, setup in variants.items()
        for number in range(processes)
    }
    runs: dict[str, list[pyperf.Run]] = {name: [] for name in variants}
    try:
        for round_ in range(rounds + 1):  # round 0 warms every process up
            order = list(workers)
            random.shuffle(order)
            for name, number in order:
                worker = workers[name, number]
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write(f"{batch}\n")
                worker.stdin.flush()
                reply = worker.stdout.readline()
                if not reply:
                    raise RuntimeError(f"variant {name!r} died (see its stderr above)")
                times, child, parent = json.loads(reply)
                if round_:
                    metadata = {"name": f"fastpath/{name}", "unit": "second"}
                    metadata["process"] = number
                    metadata["child_minflt"] = child
                    metadata["parent_minflt"] = parent
                    runs[name].append(pyperf.Run(times, metadata=metadata, collect_metadata=False))
    finally:
        for worker in workers.values():
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(30)
    return runs


def measure_import(samples: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(samples):
        for arm in random.sample(["0", "1"], 2):
            out = subprocess.run(
                [sys.executable, "-c", IMPORT_PROBE, arm],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds[arm].append(float(out.stdout))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10, help="forks per process per round")
    parser.add_argument("--processes", type=int, default=5, help="processes per variant")
    parser.add_argument("--import-samples", type=int, default=30)
    args = parser.parse_args()
    if NATIVE_ENV not in os.environ:
        sys.exit(f"{NATIVE_ENV} is not set: run this through benchmarks/run.py")
    benches = []
    memory = {kind: measure_registration_bytes(kind) for kind in ("py-lock", "c-mutex")}
    for kind, nbytes in memory.items():
        metadata = {"name": f"memory/{kind}-registration", "unit": "byte"}
        run = pyperf.Run([nbytes], metadata=metadata, collect_metadata=False)
        benches.append(pyperf.Benchmark([run]))
    watch_bytes = measure_watch_bytes()
    metadata = {"name": "memory/watch", "unit": "byte"}
    benches.append(
        pyperf.Benchmark([pyperf.Run([watch_bytes], metadata=metadata, collect_metadata=False)])
    )
    variants = dict(
        VARIANTS,
        **{
            "memory-c-mutexes": memory_control(memory["c-mutex"]),
            "memory-threads-10": watch_memory_control(watch_bytes),
        },
    )
    forks = measure_forks(variants, args.rounds, args.batch, args.processes)
    benches += [pyperf.Benchmark(runs) for runs in forks.values()]
    imports = measure_import(args.import_samples)
    for arm, label in (("0", "without"), ("1", "with")):
        metadata = {"name": f"import/{label}-forkguard", "unit": "second"}
        runs = [pyperf.Run([s], metadata=metadata, collect_metadata=False) for s in imports[arm]]
        benches.append(pyperf.Benchmark(runs))
    suite = pyperf.BenchmarkSuite(benches)
    args.output.unlink(missing_ok=True)
    suite.dump(str(args.output))
    for bench in benches:
        median = statistics.median(bench.get_values())
        print(f"{bench.get_name()}: median {median * 1e6:,.0f} us")


if __name__ == "__main__":
    main()
