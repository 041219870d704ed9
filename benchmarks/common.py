"""Shared pieces of the benchmark suites (imported by pyperf worker processes too)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

NATIVE_ENV = "FORKGUARD_BENCH_NATIVE"  # where run.py built the helper extension
RECORDS_ENV = "FORKGUARD_BENCH_RECORDS"  # where the seed scenario counts its records
RECORDS_FILE = "seed-records.jsonl"  # that file, in the results folder

NATIVE_CDEF = """
typedef ... pthread_mutex_t;
pthread_mutex_t *bench_mutexes(long n);
pthread_mutex_t *bench_mutex_at(pthread_mutex_t *array, long i);
uintptr_t bench_mutex_size(void);
double bench_c_api_pairs(const void *table, pthread_mutex_t *m, long n);
int bench_c_api_register_all(const void *table, pthread_mutex_t *array, long n);
int bench_hand_reset(pthread_mutex_t *array, long n);
"""

NATIVE_SOURCE = r"""
#include <forkguard.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

/* n default mutexes in one array, as an extension with many objects might have. */
pthread_mutex_t *bench_mutexes(long n)
{
    pthread_mutex_t *a = calloc((size_t)n, sizeof *a);
    for (long i = 0; a != NULL && i < n; i++)
        pthread_mutex_init(&a[i], NULL);
    return a;
}

pthread_mutex_t *bench_mutex_at(pthread_mutex_t *array, long i) { return &array[i]; }

uintptr_t bench_mutex_size(void) { return sizeof(pthread_mutex_t); }

/* n register+unregister pairs through the C API table; seconds, or -1. */
double bench_c_api_pairs(const void *table, pthread_mutex_t *m, long n)
{
    struct timespec a, b;
    if (forkguard_attach(table) != FORKGUARD_OK)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        forkguard_handle h;
        if (forkguard_register_mutex(m, FORKGUARD_MUTEX_NORMAL, FORKGUARD_POLICY_RESET,
                                     FORKGUARD_DEFAULT_TIMEOUT, NULL, &h) != FORKGUARD_OK)
            return -1;
        forkguard_unregister(h);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
}

/* Registers each of n mutexes through the C API (no Python object per mutex);
 * 0, or -1 if one was refused. */
int bench_c_api_register_all(const void *table, pthread_mutex_t *array, long n)
{
    if (forkguard_attach(table) != FORKGUARD_OK)
        return -1;
    for (long i = 0; i < n; i++) {
        forkguard_handle h;
        if (forkguard_register_mutex(&array[i], FORKGUARD_MUTEX_NORMAL, FORKGUARD_POLICY_RESET,
                                     FORKGUARD_DEFAULT_TIMEOUT, NULL, &h) != FORKGUARD_OK)
            return -1;
    }
    return 0;
}

/* The fix an extension writes by hand: its own child handler initialises each of
 * its mutexes again.  Once per process; 0, or pthread_atfork's error. */
static pthread_mutex_t *hand_array;
static long hand_n;

static void hand_child(void)
{
    for (long i = 0; i < hand_n; i++)
        pthread_mutex_init(&hand_array[i], NULL);
}

int bench_hand_reset(pthread_mutex_t *array, long n)
{
    hand_array = array;
    hand_n = n;
    return pthread_atfork(NULL, NULL, hand_child);
}
"""


def build_native(directory: Path) -> Path:
    """Compile the helper extension into `directory`; returns the module's path."""
    from cffi import FFI

    import forkguard

    ffi = FFI()
    ffi.cdef(NATIVE_CDEF)
    ffi.set_source("_fgbench", NATIVE_SOURCE, include_dirs=[forkguard.get_include()])
    return Path(ffi.compile(tmpdir=str(directory)))


def native() -> ModuleType:
    """The helper extension run.py built (path in $FORKGUARD_BENCH_NATIVE)."""
    cached = sys.modules.get("_fgbench")
    if cached is not None:
        return cached
    spec = importlib.util.spec_from_file_location("_fgbench", os.environ[NATIVE_ENV])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["_fgbench"] = module
    return module


def ballast(megabytes: int) -> list[Any]:
    """About `megabytes` of live Python objects: 1 KiB bytes objects (and the list
    holding them), every page written, as a parent that has loaded data would."""
    return [bytes(1000) for _ in range(megabytes * 1000)]


def fork_exit_wait(loops: int) -> float:
    """Seconds for `loops` rounds of os.fork() + os._exit(0) in the child + waitpid."""
    fork, exit_, waitpid = os.fork, os._exit, os.waitpid
    start = time.perf_counter()
    for _ in range(loops):
        pid = fork()
        if pid == 0:
            exit_(0)
        waitpid(pid, 0)
    return time.perf_counter() - start
