"""Turn the suites' pyperf JSON into results.md (tables, ratios, targets) and plots.

python benchmarks/report.py [FOLDER]     # re-render from existing JSON
"""

from __future__ import annotations

import collections
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyperf

from common import RECORDS_FILE

COUNTS = (10, 100, 1000, 10000)
C_BASE = "fork/c-mutex/0"  # bench_fork.py's baselines for the C columns
CTYPES_BASE = "fork/hand-ctypes-mutex/0"
FAST_LOCKS, FAST_MANY, FAST_MUTEXES = 100, 10000, 1000  # bench_fastpath.py's LOCKS, MANY, MUTEXES
FAST_VARIANTS = {  # bench_fastpath.py's variants, in table order, with what they are
    "bare": "forkguard not imported",
    "imported": "`import forkguard`, nothing registered",
    "control-decimal": "control: `import decimal` instead",
    "control-dataclasses": "control: `import dataclasses` instead",
    "threads-10": "`import forkguard`, 10 threads waiting on an event",
    "empty-hook-threads-10": "the same, with an empty `os.register_at_fork(before=...)` hook",
    "watch-threads-10": "the same, with `forkguard.watch()` on",
    "memory-threads-10": "the same without watch(), holding as much more memory as it adds",
    "hand-queue": "hand-written fix for one Queue: `register_at_fork(after_in_child="
    "q.mutex._at_fork_reinit)`",
    "forkguard-queue": "`forkguard.register(q)`",
    "hand-locks": f"hand-written `_at_fork_reinit` loop over {FAST_LOCKS} locks",
    "forkguard-locks": f"{FAST_LOCKS} locks registered",
    "hand-many-locks": f"hand-written `_at_fork_reinit` loop over {FAST_MANY:,} locks",
    "forkguard-many-locks": f"{FAST_MANY:,} locks registered",
    "floor-many-locks": f"{FAST_MANY:,} locks registered, the child's work done by the "
    "hand-written loop",
    "c-mutexes": (
        f"{FAST_MUTEXES:,} C mutexes made by an extension (cffi), forkguard's core loaded, "
        "none registered"
    ),
    "hand-c-mutexes": "the same, with the extension's own fix: its `pthread_atfork` child "
    "handler runs `pthread_mutex_init` on each",
    "capi-c-mutexes": "all registered through the C API (`forkguard.h`): no Python object each",
    "forkguard-c-mutex": f"one of those {FAST_MUTEXES:,} C mutexes registered",
    "forkguard-c-mutexes": f"all {FAST_MUTEXES:,} C mutexes registered",
    "memory-c-mutexes": f"none registered, holding as much more memory as {FAST_MUTEXES:,} "
    "registrations do",
}
METHODS = ("fork", "fork+forkguard", "forkserver", "spawn")
SIZES = ("bare", "200MB", "1GB")
PROCESSES = {"quick": 1, "full": 8}  # as run.py's MODES


class Results:
    """Every benchmark of every suite JSON in a folder, by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.benches: dict[str, pyperf.Benchmark] = {}
        for path in sorted(folder.glob("*.json")):
            for bench in pyperf.BenchmarkSuite.load(str(path)).get_benchmarks():
                self.benches[bench.get_name()] = bench

    def __contains__(self, name: str) -> bool:
        return name in self.benches

    def mean(self, name: str) -> float:
        return float(self.benches[name].mean())

    def stdev(self, name: str) -> float:
        bench = self.benches[name]
        return float(bench.stdev()) if len(bench.get_values()) > 1 else 0.0

    def median(self, name: str) -> float:
        return float(self.benches[name].median())

    def run_mean(self, name: str, key: str) -> float:
        """The mean over runs of a number each run recorded in its metadata."""
        runs = self.benches[name].get_runs()
        return sum(float(run.get_metadata()[key]) for run in runs) / len(runs)

    def cell(self, name: str, scale: float = 1e6, digits: int = 0) -> str:
        if name not in self:
            return "n/a"
        return f"{self.mean(name) * scale:,.{digits}f} ± {self.stdev(name) * scale:,.{digits}f}"

    def metadata(self) -> dict[str, Any]:
        for bench in self.benches.values():
            dates = bench.get_dates()
            if dates is None:  # bench_fastpath.py's runs carry no pyperf system metadata
                continue
            meta = dict(bench.get_metadata())
            meta["date"] = f"{dates[0]:%Y-%m-%d %H:%M} (local time)"
            return meta
        return {}


@dataclass
class Target:
    claim: str
    measured: str
    met: bool | None  # None: not measured in this run
    why_missed: str


def fast(name: str) -> str:
    """The name of bench_fastpath.py's variant `name` in the results."""
    return f"fastpath/{name}"


def _cost_per_byte(r: Results) -> float | None:
    """Seconds a fork costs per byte a process holds, from this run: the many-locks
    floor (forkguard's registrations, the hand-written loop's work) less the
    hand-written loop, over the registrations' resident bytes."""
    names = ("floor-many-locks", "imported", "hand-many-locks", "bare")
    if "memory/py-lock-registration" not in r or not all(fast(n) in r for n in names):
        return None
    floor, imported, hand, bare = (r.median(fast(n)) for n in names)
    extra = ((floor - imported) - (hand - bare)) / FAST_MANY
    return extra / r.median("memory/py-lock-registration") if extra > 0 else None


def _watch_memory_why(r: Results) -> str:
    """What watch()'s memory alone costs a fork, from this run's numbers."""
    if "memory/watch" not in r or fast("memory-threads-10") not in r:
        return ""
    base, floor, watch = (
        r.median(fast(v)) for v in ("threads-10", "memory-threads-10", "watch-threads-10")
    )
    return (
        f" What is left is watch()'s memory: it adds {r.median('memory/watch') / 1024:.0f} KB "
        "of anonymous memory to this process (the modules it loads to diagnose: the audit, "
        "the check of the files' layout, ctypes, the C core; and what it learns of the "
        "process's locks), whose page tables every fork copies. The floor, measured in this "
        "run: the same process without watch() holding as much more memory (1 KiB bytes "
        f"objects) costs {floor / base:.3f}x, and watch() {watch / floor:.3f}x that floor."
    )


def _c_mutexes_why(r: Results) -> str:
    """Why the 1,000-C-mutex target stands where it does, from this run's numbers."""
    base, one, all_ = (
        r.median(fast(v)) for v in ("c-mutexes", "forkguard-c-mutex", "forkguard-c-mutexes")
    )
    per_byte, memory = _cost_per_byte(r), ""
    if per_byte is not None and "memory/c-mutex-registration" in r:
        nbytes = r.median("memory/c-mutex-registration")
        memory = (
            f" A registration holds {nbytes:.0f} resident bytes (its Registration object "
            "and dict entry, the C core's 64-byte entry, restore record and index slot); at "
            f"this run's cost of memory held (the 10,000-lock floor below: "
            f"{per_byte * 1e9 * 1024:.0f} ns per KB) that alone is about "
            f"{nbytes * per_byte * 1e9:.0f} ns per mutex."
        )
    if fast("memory-c-mutexes") in r:
        floor = r.median(fast("memory-c-mutexes"))
        memory += (
            " The floor, measured in this run: the same process with none registered "
            "but holding as much more memory (in bytes objects) costs "
            f"{floor / base:.3f}x, and forkguard {all_ / floor:.3f}x that floor."
        )
    if per_byte is not None and "memory/c-mutex-registration" in r:
        room = 0.01 * base / FAST_MUTEXES / per_byte
        memory += (
            f" +1% leaves room for about {room:.0f} bytes per registration at that cost, "
            "less than the Registration object that register() returns takes with its "
            "dict entry (about 280 bytes on CPython 3.11, by tracemalloc)."
        )
    if fast("hand-c-mutexes") in r and fast("capi-c-mutexes") in r:
        hand, capi = r.median(fast("hand-c-mutexes")), r.median(fast("capi-c-mutexes"))
        memory += (
            " Side by side in this run, the fix an extension writes without forkguard "
            "(its own child handler re-initialises each mutex, which copies every page "
            f"of them) costs {hand / base:.3f}x, and the same mutexes registered through "
            f"forkguard's C API (no Python object each) {capi / base:.3f}x."
        )
        if hand > 1.01 * base:
            memory += (
                " +1% is less than the hand-written fix costs here: forkguard through "
                f"the C API is {'below' if capi < hand else 'at'} that fix's cost, "
                "and register() from Python adds the memory of its Registration "
                "objects to it."
            )
        else:
            memory += (
                " The hand-written fix is within +1% here, so forkguard's excess over "
                "it is what this target measures."
            )
    return (
        f"in this run one registered mutex costs {one / base:.3f}x: the C core's fixed "
        "part, paid once by a process that registers any C object: its atfork handlers "
        "run, and the child handler writes or faults in four pages (its code, the page "
        "of the registry's two locks, renewed in the child, and the thread-local fork "
        "state: __tls_get_addr's page and the block dlopen allocated; counted with "
        "perf, docs/design.md), each a page fault of about 5 µs here. The other "
        f"{FAST_MUTEXES - 1:,} add "
        f"{(all_ - one) / (FAST_MUTEXES - 1) * 1e9:.0f} ns each: their restore entries "
        "and the mutexes are read (a free mutex is only read, so its page is not "
        "copied), and each registration makes the memory whose page tables a fork "
        "copies bigger." + memory
    )


def _fastpath_targets(r: Results, add: Callable[..., None]) -> None:
    """The fast path's targets, from bench_fastpath.py's interleaved run."""

    def versus(ours: str, base: str, limit: float) -> Callable[[], tuple[str, bool]]:
        def compute() -> tuple[str, bool]:
            ratio = r.median(fast(ours)) / r.median(fast(base))
            return f"{ratio:.3f}x ({(ratio - 1) * 100:+.1f}%)", ratio <= limit

        return compute

    def faults(ours: str, base: str) -> Callable[[], tuple[str, bool]]:
        def compute() -> tuple[str, bool]:
            child, parent = (
                r.run_mean(fast(ours), key) - r.run_mean(fast(base), key)
                for key in ("child_minflt", "parent_minflt")
            )
            return f"{child:+.1f} in the child, {parent:+.1f} in the parent", max(
                child, parent
            ) <= 3

        return compute

    def controls(key: str | None) -> str:
        """What the control imports did to a fork in this run: time, or faults by `key`."""
        parts = []
        for name, what in (("control-decimal", "decimal"), ("control-dataclasses", "dataclasses")):
            if fast(name) not in r:
                continue
            if key is None:
                ratio = r.median(fast(name)) / r.median(fast("bare"))
                parts.append(f"`import {what}` {ratio:.3f}x")
            else:
                extra = r.run_mean(fast(name), key) - r.run_mean(fast("bare"), key)
                parts.append(f"`import {what}` {extra:+.1f}")
        return "; ".join(parts) or "no control imports in this run"

    no_code = (
        "with nothing registered forkguard installs no fork hook, Python or C, so no "
        "forkguard code runs at these forks (tests/test_fast_path.py checks it). What is "
        "left is what any import does to a fork: a bigger heap, and the child's own "
        "writes (CPython's after-fork work, the allocator's free lists) landing on other "
        "pages. The controls measure that floor in this same run, against the same "
        "baseline: "
    )
    add(
        "`import forkguard`, nothing registered: a fork costs at most 2% more than without "
        "forkguard (a process with threading, logging, queue, multiprocessing imported)",
        [fast("imported"), fast("bare")],
        versus("imported", "bare", 1.02),
        lambda: no_code + controls(None) + ".",
    )
    add(
        "`import forkguard`, nothing registered: at most 3 more page faults per fork, in the "
        "child and in the parent",
        [fast("imported"), fast("bare")],
        faults("imported", "bare"),
        lambda: (
            no_code
            + "child faults "
            + controls("child_minflt")
            + "; parent faults "
            + controls("parent_minflt")
            + "."
        ),
    )
    add(
        "`forkguard.watch()` on, in a process with 10 threads: a fork costs at most 5% more "
        "than the same process without it",
        [fast("watch-threads-10"), fast("threads-10")],
        versus("watch-threads-10", "threads-10", 1.05),
        lambda: (
            "watch()'s look before each fork is a C function (csrc/forkguard_watch.c): it "
            "reads the known files' owner fields (here sys.stdin/stdout/stderr's buffers) "
            "and tries the known locks, and calls Python only when one is taken, and every "
            "32nd fork (to count threads); the child runs no Python of watch()'s until a "
            "fork finds a lock taken. Faults per fork against the same process without "
            "watch(): "
            + faults("watch-threads-10", "threads-10")()[0]
            + ". The child's are what the modules watch() loads (ctypes, the audit) do to "
            "any child, as the control imports show (" + controls("child_minflt") + "). "
            "An empty Python before-hook, measured in this run: "
            + (
                versus("empty-hook-threads-10", "threads-10", 1.0)()[0]
                + ", "
                + faults("empty-hook-threads-10", "threads-10")()[0]
                + " faults"
                if fast("empty-hook-threads-10") in r
                else "not measured"
            )
            + "."
            + _watch_memory_why(r)
        ),
    )

    def child_faults(ours: str, base: str) -> float:
        return r.run_mean(fast(ours), "child_minflt") - r.run_mean(fast(base), "child_minflt")

    def p10(name: str) -> float:
        values = sorted(r.benches[name].get_values())
        return float(values[len(values) // 10])

    add(
        "one registered `queue.Queue`: a fork costs at most 1.05x the hand-written fix "
        "(`os.register_at_fork(after_in_child=q.mutex._at_fork_reinit)`)",
        [fast("forkguard-queue"), fast("hand-queue")],
        versus("forkguard-queue", "hand-queue", 1.05),
        lambda: (
            "the hand-written fix is one C call; forkguard's is one Python call, which "
            "touches the function, the registry and its lists, the weak reference and the "
            "Queue's three waiter lists: in this run "
            f"{child_faults('forkguard-queue', 'hand-queue'):+.1f} page faults per fork in "
            "the child, and a p10 of "
            f"{p10(fast('forkguard-queue')) / p10(fast('hand-queue')):.3f}x. Closing it "
            "would take the reset out of Python, into a C hook per registered lock."
        ),
    )

    def locks_why() -> str:
        decimal = (
            f" (importing `decimal` alone: {child_faults('control-decimal', 'bare'):+.1f})"
            if fast("control-decimal") in r
            else ""
        )
        return (
            "per lock, forkguard also touches the weak reference it holds the lock by "
            "(registering must not keep a lock alive), whose page the child then copies; "
            "the child's one Python call reads the registry's lists; and the process holds "
            f"forkguard and {FAST_LOCKS} registrations besides. In this run the child took "
            f"{child_faults('forkguard-locks', 'hand-locks'):+.1f} page faults per fork "
            f"against the hand-written loop{decimal}. From 512 locks on the child walks "
            "them in C, which writes no weak reference; below that the C call's own pages "
            "(the C module's code and cffi's, about 6) cost more than it saves."
        )

    add(
        f"{FAST_LOCKS} registered Python locks: a fork costs at most 1.1x a hand-written "
        "`_at_fork_reinit` loop over the same locks",
        [fast("forkguard-locks"), fast("hand-locks")],
        versus("forkguard-locks", "hand-locks", 1.1),
        locks_why,
    )

    add(
        f"{FAST_MUTEXES:,} registered C mutexes: a fork costs at most 1% more than the same "
        "process with none registered (forkguard imported and its C core loaded, the "
        "extension that made them loaded)",
        [fast("forkguard-c-mutexes"), fast("c-mutexes")],
        versus("forkguard-c-mutexes", "c-mutexes", 1.01),
        lambda: _c_mutexes_why(r),
    )

    def import_cost() -> tuple[str, bool]:
        extra = r.median("import/with-forkguard") - r.median("import/without-forkguard")
        return f"{extra * 1e3:.1f} ms", extra <= 5e-3

    add(
        "`import forkguard` costs at most 5 ms on top of `import threading, queue, logging`",
        ["import/with-forkguard", "import/without-forkguard"],
        import_cost,
        "what is left is forkguard's own modules; typing, dataclasses and the cffi "
        "extension are not imported (the extension loads at the first C registration).",
    )


def _many_locks_target(r: Results, add: Callable[..., None]) -> None:
    """Python locks at bench_fastpath.py's MANY: forkguard, by hand, and the floor."""

    def per_lock(ours: str, base: str) -> float:
        return (r.median(fast(ours)) - r.median(fast(base))) / FAST_MANY

    def many_vs_hand() -> tuple[str, bool]:
        ours = per_lock("forkguard-many-locks", "imported")
        hand = per_lock("hand-many-locks", "bare")
        return f"{ours * 1e9:.0f} ns vs {hand * 1e9:.0f} ns per lock = {ours / hand:.2f}x", (
            ours / hand <= 1.1
        )

    def many_why() -> str:
        ours = per_lock("forkguard-many-locks", "imported")
        hand = per_lock("hand-many-locks", "bare")
        floor = per_lock("floor-many-locks", "imported")
        size, room = "a few hundred bytes", ""
        per_byte = _cost_per_byte(r)
        if "memory/py-lock-registration" in r:
            size = f"{r.median('memory/py-lock-registration'):.0f} resident bytes"
        if per_byte is not None:  # the room 1.1x leaves, at this run's cost per byte held
            room = f" (about {0.1 * hand / per_byte:.0f} bytes here)"
        loop = (
            "is within a few percent of the hand-written loop's"
            if ours <= floor * 1.05
            else f"costs {(ours - floor) * 1e9:.0f} ns per lock more than the hand-written loop"
        )
        return (
            "per lock a fork copies more page tables, and the child's exit frees them, for "
            "every byte the process holds; here the hand-written loop's process holds the "
            "locks, forkguard's holds a registration for each besides. The floor, "
            "measured in this run: forkguard's registrations kept with the child's work "
            f"done by the hand-written loop cost {floor * 1e9:.0f} ns per lock "
            f"({floor / hand:.2f}x the hand-written loop), and forkguard {ours / floor:.2f}x "
            "that floor: what forkguard's loop itself does in the child (in C from 512 "
            "locks on, csrc/forkguard_plain.c; it reads the weak references and writes "
            f"only the locks, tests/test_plain_in_c.py) {loop}. The rest is the "
            f"registrations' memory: {size} each (the Registration that register() returns, the "
            "weak reference it holds the lock by, its entries in the registry's dicts). "
            f"1.1x would leave room for a fraction of that{room}: less than the "
            "Registration object and its weak reference alone take, so it is out of "
            "reach for an API that returns an object per registration and must not keep "
            "the lock alive."
        )

    add(
        f"resetting {FAST_MANY:,} registered Python locks costs at most 1.1x per lock what "
        "the hand-written `_at_fork_reinit` loop over them costs",
        [fast("forkguard-many-locks"), fast("hand-many-locks"), fast("floor-many-locks")],
        many_vs_hand,
        many_why,
    )


def _targets(r: Results) -> list[Target]:
    targets: list[Target] = []

    def add(
        claim: str,
        names: list[str],
        compute: Callable[[], tuple[str, bool]],
        why: str | Callable[[], str],  # a callable when it quotes this run's numbers
    ) -> None:
        if all(n in r for n in names):
            measured, met = compute()
            targets.append(Target(claim, measured, met, why if isinstance(why, str) else why()))
        else:
            missing = why if isinstance(why, str) else "(not measured in this run)"
            targets.append(Target(claim, "not measured in this run", None, missing))

    _fastpath_targets(r, add)
    _many_locks_target(r, add)

    def c_1000() -> tuple[str, bool]:
        ratio = r.mean("fork/c-mutex/1000") / r.mean(C_BASE)
        return f"{ratio:.3f}x ({(ratio - 1) * 100:+.1f}%)", ratio <= 1.03

    add(
        "with 1,000 registered C mutexes a fork costs at most 3% more than with none",
        ["fork/c-mutex/1000", C_BASE],
        c_1000,
        "the per-fork noise of a shared machine (see the ± columns) is of the same order "
        "as the whole effect; the per-mutex slope in the table below is the steadier "
        "measure. Closing it for good would need a quieter machine or more samples.",
    )

    def per_object(ours: str, ours_base: str, hand: str, hand_base: str) -> tuple[float, float]:
        n = COUNTS[-1]
        return (r.mean(ours) - r.mean(ours_base)) / n, (r.mean(hand) - r.mean(hand_base)) / n

    def c_vs_ctypes() -> tuple[str, bool]:
        ours, hand = per_object(
            "fork/c-mutex/10000", C_BASE, "fork/hand-ctypes-mutex/10000", CTYPES_BASE
        )
        ratio = ours / hand
        return (
            f"{ours * 1e9:.0f} ns vs {hand * 1e9:.0f} ns per mutex = 1/{1 / ratio:.0f}"
            if ratio > 0
            else f"{ours * 1e9:.0f} ns vs {hand * 1e9:.0f} ns per mutex",
            ratio <= 1 / 20,
        )

    add(
        "resetting a C mutex costs at most 1/20 of the per-lock cost of the ctypes alternative",
        ["fork/c-mutex/10000", C_BASE, "fork/hand-ctypes-mutex/10000", CTYPES_BASE],
        c_vs_ctypes,
        "noise in the two baselines; per mutex forkguard only compares 40 bytes in C.",
    )

    def pairs() -> tuple[str, bool]:
        rate = 1 / r.mean("register/python-api/c-mutex")
        return f"{rate:,.0f} pairs/s", rate >= 300_000

    add(
        "at least 300,000 register+unregister pairs per second through the Python API for "
        "C mutexes",
        ["register/python-api/c-mutex", "register/c-calls-only/c-mutex"],
        pairs,
        lambda: (
            "a pair is two calls into C, each releasing and retaking the GIL (a "
            "registration can wait for a fork in another thread, so it must not hold the "
            "GIL): in this run those two calls alone take "
            f"{r.mean('register/c-calls-only/c-mutex') * 1e9:,.0f} ns (the Registration "
            "table). The rest is the Python bookkeeping, each step a few hundred ns on this "
            "machine: the call and argument checks, the cffi pointer's type and address, a "
            "Registration object and one dict entry (no lock: the C core decides between "
            "racing calls). What is left would go only with the registry itself written "
            "in C against CPython's API (its Registration objects and dicts), as the "
            "child's loop over plain locks now is (csrc/forkguard_plain.c): a rewrite of "
            "the registry, not done."
        ),
    )

    def creation(what: str) -> Callable[[], tuple[str, bool]]:
        def compute() -> tuple[str, bool]:
            bare, ours = (r.mean(f"protect/create/{what}/{k}") for k in ("bare", "tracked"))
            return f"{ours * 1e9:.0f} ns vs {bare * 1e9:.0f} ns = {ours / bare:.2f}x", (
                ours / bare <= 2
            )

        return compute

    for what in ("Lock", "RLock"):
        add(
            f"creating a `threading.{what}` under `protect()` costs at most 2x the bare cost",
            [f"protect/create/{what}/bare", f"protect/create/{what}/tracked"],
            creation(what),
            "a tracked Lock is a Python object with no __init__ (its inner lock is made on "
            "first use); what is left is the allocation of that object.",
        )

    def idle_fork() -> tuple[str, bool]:
        ratio = r.mean("protect/fork/10000/tracked") / r.mean("protect/fork/10000/bare")
        return f"{ratio:.3f}x ({(ratio - 1) * 100:+.1f}%)", ratio <= 1.03

    add(
        "a fork with 10,000 tracked locks, none held, costs at most 3% more than the same "
        "process without `protect()`",
        ["protect/fork/10000/tracked", "protect/fork/10000/bare"],
        idle_fork,
        "an idle tracked lock is not listed anywhere, so the fork does no work for it, and "
        "idle files (sys.stdin, stdout, stderr: nothing buffered, lock free) are left as "
        "they are. What is left is the Python code of the child's hooks: every object it "
        "touches, code objects included (the interpreter writes to them as it runs), "
        "costs the child a copy-on-write page fault, about 5 µs each here. Counted with "
        "getrusage in the child between the first and last at-fork hook: 37 faults "
        "without protect(), 59 with protect() and no files enrolled, 117 with the three "
        "stdio files enrolled (about 0.15, 0.3 and 0.6 ms). Closing it would take the "
        "idle checks out of Python: in the C child handler, or decided in the parent.",
    )

    def per_held() -> tuple[str, bool]:
        held = "protect/fork/10000/tracked-thread-1000-held"
        each = (r.mean(held) - r.mean("protect/fork/10000/tracked-thread-0-held")) / 1000
        return f"{each * 1e9:.0f} ns per held lock", each <= 1e-6

    add(
        "a fork costs at most 1 µs per tracked lock held by another thread",
        [
            "protect/fork/10000/tracked-thread-1000-held",
            "protect/fork/10000/tracked-thread-0-held",
        ],
        per_held,
        "each held lock costs the child one Python method call and one release, and the "
        "copy-on-write faults of the pages it writes (about 60 for 1,000 held locks, ~5 µs "
        "each here): timed inside the child, the repair of 1,000 locks held by another "
        "thread takes about 1 µs per lock. The difference of two fork means of ±0.5 ms "
        "each resolves 1 µs per lock only roughly (617 to 1,469 ns over four full runs).",
    )

    def pool1(other: str, factor: float) -> Callable[[], tuple[str, bool]]:
        def compute() -> tuple[str, bool]:
            ratio = r.mean(f"start/pool1/{other}/bare") / r.mean("start/pool1/fork+forkguard/bare")
            return f"{ratio:.1f}x faster", ratio >= factor

        return compute

    for other, factor in (("forkserver", 5), ("spawn", 10)):
        add(
            f"`Pool(1)` first result with fork + forkguard at least {factor}x faster than "
            f"{other} (bare interpreter)",
            ["start/pool1/fork+forkguard/bare", f"start/pool1/{other}/bare"],
            pool1(other, factor),
            f"{other} pays for a fresh interpreter (startup and imports) in each worker; "
            "the ratio shrinks as the machine or Python starts interpreters faster.",
        )
    return targets


def _fastpath_table(r: Results) -> list[str]:
    if "fastpath/bare" not in r:
        return []
    base = r.median("fastpath/bare")
    runs = r.benches["fastpath/bare"].get_runs()
    processes = len({run.get_metadata().get("process", 0) for run in runs})
    lines = [
        "## Fast path: what forkguard adds to a fork",
        "",
        "A process that has imported threading, logging, queue and multiprocessing; each "
        f"variant runs in {processes} long-lived processes, each with a random heap layout "
        "(which objects share a page moves a fork's faults by as much as the effects "
        "measured here), and all of them fork in turn, in a new random order each round "
        "(`benchmarks/bench_fastpath.py`), so all see the same machine noise. `os.fork()` "
        "+ `os._exit(0)` + `os.wait4()`; minor page faults per fork counted in the child "
        "(its rusage) and in the parent, averaged over the processes.",
        "",
        "| variant | µs per fork (median) | p10 | vs not imported | page faults: child | parent |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, what in FAST_VARIANTS.items():
        name = f"fastpath/{variant}"
        if name not in r:  # (a run from before the variant was added)
            continue
        values = sorted(r.benches[name].get_values())
        p10 = values[len(values) // 10]
        median = r.median(name)
        child, parent = (r.run_mean(name, k) for k in ("child_minflt", "parent_minflt"))
        lines.append(
            f"| {what} | {median * 1e6:,.0f} | {p10 * 1e6:,.0f} | {median / base:.3f}x "
            f"| {child:.1f} | {parent:.1f} |"
        )
    if "import/with-forkguard" in r and "import/without-forkguard" in r:
        with_ = r.median("import/with-forkguard") - r.median("import/without-forkguard")
        samples = len(r.benches["import/with-forkguard"].get_values())
        lines += [
            "",
            f"`import forkguard` after `import threading, queue, logging`: {with_ * 1e3:.1f} ms "
            f"(timed inside each of {samples} fresh interpreters, median, less the same "
            "timer around nothing).",
        ]
    if "memory/watch" in r:
        lines += [
            "",
            f"`forkguard.watch()` adds {r.median('memory/watch') / 1024:.0f} KB of anonymous "
            "memory to the process with 10 threads (`RssAnon`, before and after the call).",
        ]
    return lines


def _fork_tables(r: Results) -> list[str]:
    lines = [
        "## Fork cost",
        "",
        "`os.fork()` + `os._exit(0)` in the child + `os.waitpid()`, microseconds per fork "
        "(mean ± std dev). *forkguard* columns: objects registered with "
        "`forkguard.register()` (reset policy). *by hand*: what one writes without "
        "forkguard: an `os.register_at_fork(after_in_child=...)` hook that calls "
        "`lock._at_fork_reinit()` on each lock, or `pthread_mutex_init` through ctypes on "
        "each mutex. Each column's first row is its own baseline: for Python locks, "
        "forkguard imported with nothing registered, and a process without forkguard; for "
        "C mutexes, the same with the extension that owns the mutexes loaded and its "
        "mutexes made (cffi and its libraries mapped, which every fork copies), and for "
        "ctypes the hook installed over no mutex.",
        "",
        "| registered | forkguard: C mutexes | forkguard: Python locks | by hand: Python locks "
        "| by hand: ctypes mutexes |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| none | {r.cell(C_BASE)} | {r.cell('fork/none/0')} "
        f"| {r.cell('fork/bare/0')} | {r.cell(CTYPES_BASE)} |",
    ]
    for n in COUNTS:
        lines.append(
            f"| {n:,} | {r.cell(f'fork/c-mutex/{n}')} | {r.cell(f'fork/py-lock/{n}')} "
            f"| {r.cell(f'fork/hand-py-lock/{n}')} | {r.cell(f'fork/hand-ctypes-mutex/{n}')} |"
        )
    slopes = []
    for label, name, base in (
        ("forkguard, C mutex", "fork/c-mutex/10000", C_BASE),
        ("forkguard, Python lock", "fork/py-lock/10000", "fork/none/0"),
        ("by hand, Python lock", "fork/hand-py-lock/10000", "fork/bare/0"),
        ("by hand, ctypes mutex", "fork/hand-ctypes-mutex/10000", CTYPES_BASE),
    ):
        if name in r and base in r:
            ns = (r.mean(name) - r.mean(base)) / COUNTS[-1] * 1e9
            slopes.append(f"| {label} | {ns:,.0f} |")
    if slopes:
        lines += [
            "",
            "Cost per registered object at 10,000 (fork time above the baseline / 10,000):",
            "",
            "| object | ns per object per fork |",
            "| --- | ---: |",
            *slopes,
        ]
    holds = []
    for label, name, base in (
        ("Python Lock", "fork/hold-free/py-lock", "fork/none/0"),
        ("C mutex", "fork/hold-free/c-mutex", C_BASE),
    ):
        if name in r and base in r:
            extra = (r.mean(name) - r.mean(base)) * 1e6
            holds.append(f"| {label} | {r.cell(name)} | {extra:+,.1f} |")
    if holds:
        lines += [
            "",
            'One `policy="hold"` registration whose lock is free at every fork:',
            "",
            "| held object | µs per fork | µs above its column's baseline |",
            "| --- | ---: | ---: |",
            *holds,
        ]
    return lines


def _register_table(r: Results) -> list[str]:
    rows = []
    for label, name in (
        ("Python API, cffi pointer to a C mutex", "register/python-api/c-mutex"),
        ("Python API, integer address of a C mutex", "register/python-api/c-mutex-address"),
        ("Python API, threading.Lock", "register/python-api/py-lock"),
        ("C API (forkguard.h), C mutex", "register/c-api/c-mutex"),
        ("the Python API's two C calls alone (cffi), C mutex", "register/c-calls-only/c-mutex"),
    ):
        if name in r:
            rows.append(f"| {label} | {r.cell(name, 1e9)} | {1 / r.mean(name):,.0f} |")
    return [
        "## Registration",
        "",
        "One `register` + `unregister` pair.",
        "",
        "| through | ns per pair | pairs per second |",
        "| --- | ---: | ---: |",
        *rows,
    ]


def _forward_table(r: Results) -> list[str]:
    designs = (
        ("forwarded to the parent's listener (`register(listener)`)", "forward"),
        ("handled by the child itself, through the same handlers", "own-consumer"),
        ("a plain `FileHandler` in the child (no queue; the floor)", "plain"),
    )
    rows = [
        f"| {label} | {r.cell(f'forward/child-1000-records/{name}', 1e3, 1)} |"
        for label, name in designs
        if f"forward/child-1000-records/{name}" in r
    ]
    if not rows:
        return []
    return [
        "## A forked child's log records",
        "",
        "Fork a child that logs 1,000 records and leaves with `os._exit`; time until every "
        "record was handled (forwarded ones: by the parent's listener). Handlers write to "
        "`os.devnull`.",
        "",
        "| the child's records are | ms |",
        "| --- | ---: |",
        *rows,
        "",
    ]


def _protect_table(r: Results) -> list[str]:
    rows = []
    for label, name in (
        ("create a `threading.Lock`", "protect/create/Lock"),
        ("create a `threading.RLock`", "protect/create/RLock"),
        ("`with lock: pass` (a `threading.Lock`)", "protect/with/Lock"),
    ):
        if f"{name}/bare" in r and f"{name}/tracked" in r:
            bare, ours = r.mean(f"{name}/bare"), r.mean(f"{name}/tracked")
            rows.append(
                f"| {label} | {r.cell(f'{name}/bare', 1e9)} | {r.cell(f'{name}/tracked', 1e9)} "
                f"| {ours / bare:.2f}x |"
            )
    forks = []
    for label, name in (
        ("10,000 bare locks (forkguard imported, no `protect()`)", "protect/fork/10000/bare"),
        ("10,000 tracked locks, none held", "protect/fork/10000/tracked"),
        ("... and a second thread holding none", "protect/fork/10000/tracked-thread-0-held"),
        ("... and a second thread holding 1,000", "protect/fork/10000/tracked-thread-1000-held"),
    ):
        if name in r:
            forks.append(f"| {label} | {r.cell(name, 1e6)} |")
    return [
        "## protect()",
        "",
        "| operation | bare, ns | under `protect()`, ns | ratio |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        "| one fork (`fork` + `_exit` + `waitpid`) in a process with | µs |",
        "| --- | ---: |",
        *forks,
    ]


def _start_tables(r: Results) -> list[str]:
    lines = [
        "## Start methods",
        "",
        "*fork + forkguard*: the fork start method with forkguard imported and a "
        "`queue.Queue` registered. Parent sizes: a bare interpreter, and about 200 MB and "
        "1 GB of live Python objects (1 KiB `bytes` objects) in the parent.",
    ]
    for title, measure, scale, unit, fmt in (
        ("Process start + join", "process", 1e3, "ms", "time"),
        (
            "`Pool(1)` start + first `apply` (pool shut down outside the timing)",
            "pool1",
            1e3,
            "ms",
            "time",
        ),
        ("Steady `Pool(2)` throughput, tiny tasks", "pool2-task", 1, "tasks/s", "rate"),
    ):
        lines += ["", f"### {title} ({unit})", "", "| method | " + " | ".join(SIZES) + " |"]
        lines.append("| --- |" + " ---: |" * len(SIZES))
        for method in METHODS:
            cells = []
            for size in SIZES:
                name = f"start/{measure}/{method}/{size}"
                if name not in r:
                    cells.append("n/a")
                elif fmt == "rate":
                    cells.append(f"{1 / r.mean(name):,.0f}")
                else:
                    cells.append(r.cell(name, scale, 1))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seed = [m for m in ("fork+forkguard", "forkserver", "spawn") if f"seed/pool1/{m}" in r]
    if seed:
        records = _seed_records(r.folder)
        lines += [
            "",
            "### The seed scenario: `Pool(1)` start + first result while a thread logs "
            "through `QueueHandler` (ms), and the workers' records",
            "",
            "Plain fork is not in this table: it deadlocks (see `python -m forkguard demo`). "
            "Each task logs one numbered record; the parent counts those that reach its "
            "listener (waiting for them is not timed). fork+forkguard registers the "
            "listener; spawn and forkserver workers log through a multiprocessing queue "
            "to a second listener. Workers leave through `close()` + `join()`.",
            "",
            "| method | ms | records sent | lost | twice |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for m in seed:
            sent, lost, twice = records.get(m, ("n/a",) * 3)
            cell = r.cell(f"seed/pool1/{m}", 1e3, 1)
            lines.append(f"| {m} | {cell} | {sent} | {lost} | {twice} |")
    return lines


def _seed_records(folder: Path) -> dict[str, tuple[int, int, int]]:
    """The seed benchmark's record counts (sent, lost, twice) per method, summed over
    every batch of every worker process (bench_start.py appends one line a batch)."""
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    path = folder / RECORDS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            totals[entry["method"]].update({key: entry[key] for key in ("sent", "lost", "twice")})
    return {m: (c["sent"], c["lost"], c["twice"]) for m, c in totals.items()}


def _plots(r: Results, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, prefix, style in (
        ("forkguard: C mutexes", "fork/c-mutex", "o-"),
        ("forkguard: Python locks", "fork/py-lock", "s-"),
        ("by hand: Python locks", "fork/hand-py-lock", "s--"),
        ("by hand: ctypes mutexes", "fork/hand-ctypes-mutex", "o--"),
    ):
        names = [(n, f"{prefix}/{n}") for n in COUNTS if f"{prefix}/{n}" in r]
        if names:
            ax.errorbar(
                [n for n, _ in names],
                [r.mean(name) * 1e6 for _, name in names],
                yerr=[r.stdev(name) * 1e6 for _, name in names],
                fmt=style,
                capsize=3,
                label=label,
            )
    for label, name, color in (
        ("nothing registered", "fork/none/0", "gray"),
        ("bare", "fork/bare/0", "black"),
        ("the mutexes' extension loaded, none registered", C_BASE, "tab:blue"),
    ):
        if name in r:
            ax.axhline(r.mean(name) * 1e6, color=color, linestyle=":", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("registered objects")
    ax.set_ylabel("µs per fork + exit + wait")
    ax.set_title("What registered objects add to a fork")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = folder / "fork_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    width = 0.2
    for ax, (title, measure, rate) in zip(
        axes,
        (
            ("Process start + join (ms)", "process", False),
            ("Pool(1) start + first result (ms)", "pool1", False),
            ("Pool(2) tiny tasks per second", "pool2-task", True),
        ),
        strict=True,
    ):
        for i, method in enumerate(METHODS):
            values = []
            for size in SIZES:
                name = f"start/{measure}/{method}/{size}"
                if name not in r:
                    values.append(0.0)
                else:
                    values.append(1 / r.mean(name) if rate else r.mean(name) * 1e3)
            ax.bar([x + i * width for x in range(len(SIZES))], values, width, label=method)
        ax.set_xticks([x + 1.5 * width for x in range(len(SIZES))], SIZES)
        ax.set_title(title, fontsize=10)
        if not rate:
            ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = folder / "start_methods.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write(folder: Path, mode: str) -> list[Path]:
    """Write results.md and the plots from the JSON in `folder`."""
    r = Results(folder)
    meta = r.metadata()
    targets = _targets(r)
    lines = [
        "# forkguard benchmarks",
        "",
        f"- run: {mode} mode ({PROCESSES[mode]} worker processes per benchmark), "
        f"{meta.get('date', 'unknown date')}",
        f"- machine: {meta.get('cpu_model_name', platform.processor() or 'unknown CPU')}, "
        f"{meta.get('cpu_count', '?')} CPUs, {meta.get('platform', platform.platform())}",
        f"- Python: {meta.get('python_version', sys.version)}",
        "- regenerate: `python benchmarks/run.py` (full) or `--quick`; every ratio below "
        "compares numbers from this one run.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
    ]
    for t in targets:
        verdict = "met" if t.met else ("**missed**" if t.met is False else "n/a")
        lines.append(f"| {t.claim} | {t.measured} | {verdict} |")
    missed = [t for t in targets if t.met is False]
    if missed:
        lines += ["", "Missed targets, why, and what would close them:", ""]
        lines += [f"- *{t.claim}*: {t.why_missed}" for t in missed]
    lines += ["", *_fastpath_table(r), ""]
    lines += ["", *_fork_tables(r), "", "![fork cost](fork_cost.png)", ""]
    lines += [
        *_register_table(r),
        "",
        *_protect_table(r),
        "",
        *_forward_table(r),
        *_start_tables(r),
        "",
        "![start methods](start_methods.png)",
        "",
    ]
    path = folder / "results.md"
    path.write_text("\n".join(lines))
    return [path, *_plots(r, folder)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Re-render results.md and plots from JSON.")
    parser.add_argument("folder", type=Path, nargs="?", default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="the JSON came from a --quick run")
    args = parser.parse_args()
    for written in write(args.folder, mode="quick" if args.quick else "full"):
        print(written)
