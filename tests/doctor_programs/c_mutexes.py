"""A C extension (tests/native.py, built by the test; its folder is argv[1]) whose
native thread "ext-worker" holds two pthread mutexes across a fork: one registered
with forkguard (a child gets it back free), one nobody registered (a child that
takes it blocks for ever)."""

import os
import sys

sys.path.insert(0, sys.argv[1])
import _fgtest_native as ext

import forkguard

lib, ffi = ext.lib, ext.ffi
registered = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
unregistered = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
forkguard.register(registered, name="ext's registered mutex")

before = set(os.listdir("/proc/self/task"))
kinds = ffi.new("int[]", [lib.K_MUTEX, lib.K_MUTEX])
objs = ffi.new("void *[]", [registered, unregistered])
lib.holder_start(2, kinds, objs, ffi.new("int[]", [1, 1]))
(tid,) = set(os.listdir("/proc/self/task")) - before
with open(f"/proc/self/task/{tid}/comm", "w") as comm:
    comm.write("ext-worker")

pid = os.fork()
if pid == 0:
    lib.pthread_mutex_lock(registered)  # free again in the child
    lib.pthread_mutex_unlock(registered)
    lib.pthread_mutex_lock(unregistered)  # held by ext-worker at the fork: blocks
    os._exit(0)
_, status = os.waitpid(pid, 0)
os._exit(0)
