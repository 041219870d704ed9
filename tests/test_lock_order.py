"""forkguard never hangs its host: every edge of the lock order (docs/design.md).

Each scenario is a small program run in a fresh interpreter of its own process group
under a deadline, with the test extension gilprobe (tests/gilprobe.c), which uses the
C API with the GIL held as extensions do in tp_new/tp_dealloc.  Each lock-order
scenario also runs against an emulation of forkguard's earlier discipline (the
registry lock taken in the os.fork() before-hook and kept until after the fork): that
variant must hang, which shows the scenario reaches the inversion it is about.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import forkguard

from conftest import LINUX

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not LINUX, reason="builds a CPython extension with gcc")


@dataclass
class Outcome:
    hung: bool
    returncode: int | None
    output: str

    def lines(self) -> list[str]:
        return self.output.splitlines()


PRELUDE = """
import os, signal, sys, threading, time, warnings
warnings.simplefilter("ignore")  # HoldTimeoutWarning, CPython's fork-with-threads warning

def fork_and_reap():
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
"""


def run(probe_dir: Path, program: str, deadline: float = 20.0) -> Outcome:
    """Run `program` (after PRELUDE); on deadline, kill its whole process group."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(probe_dir), str(TESTS)]))
    code = PRELUDE + textwrap.dedent(program)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=deadline)
        return Outcome(False, proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Outcome(True, None, out)


def assert_clean(outcome: Outcome, *expected: str) -> None:
    assert not outcome.hung, f"hung; output so far:\n{outcome.output}"
    assert outcome.returncode == 0, outcome.output
    for line in expected:
        assert line in outcome.lines(), outcome.output


# --------------------------------------------------------------------------------------
# The GIL against the registry: C API calls with the GIL held, forks from C with it.

# A thread registers and unregisters a C mutex through the C API with the GIL held, in
# a loop, while the main thread forks; a hold on a mutex another thread keeps makes
# every fork wait in its prepare handler.
# A thread does `work` in a loop (holding the GIL around each C call) while the main
# thread makes 100 forks.
BUSY_WHILE_FORKING = """
import gilprobe
{setup}
stop = False
def busy():
    n = 0
    while not stop:
        {work}
        n += 1
    print("{label}", "many" if n > 10 else n, flush=True)
t = threading.Thread(target=busy, daemon=True)
t.start()
statuses = [fork_and_reap() for _ in range(100)]
stop = True
t.join()
print("children exited 0:", statuses.count(0), "of", len(statuses), flush=True)
"""

NEW_GIL_REGISTRATIONS = BUSY_WHILE_FORKING.format(
    label="registrations",
    setup="""
import ctypes, forkguard
gilprobe.attach()
libc = ctypes.CDLL(None)
m = (ctypes.c_uint64 * 8)()
forkguard.register(ctypes.addressof(m), kind="pthread_mutex", policy="hold", timeout=0.05)
threading.Thread(target=lambda: (libc.pthread_mutex_lock(m), time.sleep(600)), daemon=True).start()
time.sleep(0.1)
""",
    work="gilprobe.free_mutex(*gilprobe.new_mutex())",
)

OLD_GIL_REGISTRATIONS = BUSY_WHILE_FORKING.format(
    label="registrations",
    setup="gilprobe.old_install(); os.register_at_fork(before=gilprobe.old_before)",
    work="gilprobe.old_register()",
)


def test_c_api_calls_with_the_gil_held_while_another_thread_forks(probe_dir: Path) -> None:
    assert_clean(
        run(probe_dir, NEW_GIL_REGISTRATIONS),
        "children exited 0: 100 of 100",
        "registrations many",
    )


def test_c_api_calls_with_the_gil_held_hang_the_earlier_discipline(probe_dir: Path) -> None:
    assert run(probe_dir, OLD_GIL_REGISTRATIONS, deadline=3).hung


# Hooks and hold-policy objects wait for a fork in progress when they come and go: a
# C fork from a native thread (no GIL) has to finish without the GIL.
def test_hooks_and_holds_registered_with_the_gil_held_during_c_forks(probe_dir: Path) -> None:
    program = """
    import gilprobe, forkguard
    gilprobe.attach()
    stop = False
    def ext_user():
        while not stop:
            gilprobe.unregister(gilprobe.new_hooks())
            gilprobe.free_mutex(*gilprobe.new_mutex(1))  # policy hold
    t = threading.Thread(target=ext_user, daemon=True)
    t.start()
    statuses = [gilprobe.c_fork_gil_held() for _ in range(200)]
    statuses += [fork_and_reap() for _ in range(100)]
    stop = True
    t.join()
    print("children exited 0:", statuses.count(0), "of", len(statuses), flush=True)
    """
    assert_clean(run(probe_dir, program), "children exited 0: 300 of 300")


# fork() from C with the GIL held (subprocess with user=, an extension) in one thread,
# os.fork() in another.
C_FORKS_SETUP = """
import ctypes, forkguard
libc = ctypes.CDLL(None)
m = (ctypes.c_uint64 * 8)()
forkguard.register(ctypes.addressof(m), kind="pthread_mutex", policy="hold", timeout=0.02)
threading.Thread(target=lambda: (libc.pthread_mutex_lock(m), time.sleep(600)), daemon=True).start()
plain = (ctypes.c_uint64 * 8)()
forkguard.register(ctypes.addressof(plain), kind="pthread_mutex")
time.sleep(0.1)
"""


@pytest.mark.parametrize(
    "c_fork",
    [
        "subprocess.run(['true'], user=os.getuid(), check=True)",
        "assert gilprobe.c_fork_gil_held() == 0",
    ],
    ids=["subprocess-user", "extension"],
)
def test_forks_from_c_with_the_gil_held_while_another_thread_forks(
    probe_dir: Path, c_fork: str
) -> None:
    program = BUSY_WHILE_FORKING.format(
        label="C forks", setup="import subprocess" + C_FORKS_SETUP, work=c_fork
    )
    assert_clean(run(probe_dir, program), "children exited 0: 100 of 100", "C forks many")


def test_forks_from_c_with_the_gil_held_hang_the_earlier_discipline(probe_dir: Path) -> None:
    program = BUSY_WHILE_FORKING.format(
        label="C forks",
        setup="gilprobe.old_install(); os.register_at_fork(before=gilprobe.old_before)",
        work="gilprobe.c_fork_gil_held()",
    )
    assert run(probe_dir, program, deadline=3).hung


# --------------------------------------------------------------------------------------
# Foreign before-hooks: logging's (registered earlier, so it runs after forkguard's)
# waits for logging's lock while a thread inside dictConfig registers a C lock.

DICTCONFIG = """
import ctypes, logging, logging.config
{setup}
class CLockHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self._m = (ctypes.c_uint64 * 8)()
        time.sleep(0.5)  # configuring takes a while; logging's lock is held meanwhile
        {register}
        print("handler registered its lock", flush=True)

def configure():
    logging.config.dictConfig(
        {{"version": 1, "handlers": {{"c": {{"()": CLockHandler}}}}, "root": {{"handlers": ["c"]}}}}
    )
    print("configured", flush=True)

t = threading.Thread(target=configure)
t.start()
time.sleep(0.2)
print("child exited", fork_and_reap(), flush=True)
t.join()
"""


def test_registering_inside_logging_dictconfig_while_forking(probe_dir: Path) -> None:
    program = DICTCONFIG.format(
        setup="import forkguard",
        register='self._reg = forkguard.register(ctypes.addressof(self._m), kind="pthread_mutex")',
    )
    assert_clean(
        run(probe_dir, program), "handler registered its lock", "configured", "child exited 0"
    )


def test_registering_inside_logging_dictconfig_hangs_the_earlier_discipline(
    probe_dir: Path,
) -> None:
    program = DICTCONFIG.format(
        setup="import gilprobe; gilprobe.old_install(); "
        "os.register_at_fork(before=gilprobe.old_before)",
        register="gilprobe.old_register()",
    )
    assert run(probe_dir, program, deadline=3).hung


def test_before_hooks_that_run_after_forkguards_can_register(probe_dir: Path) -> None:
    """A hook registered before forkguard was imported runs after forkguard's
    before-hook; it can register and unregister C and Python objects."""
    program = """
    import ctypes, queue
    done = []
    def before():
        if done:
            return
        m = (ctypes.c_uint64 * 8)()
        reg = forkguard.register(ctypes.addressof(m), kind="pthread_mutex", name="late")
        done.append(reg.unregister())
        done.append(forkguard.register(q).active)
    os.register_at_fork(before=before)
    import forkguard
    q = queue.Queue()
    print("child exited", fork_and_reap(), flush=True)
    print("hook results", done, flush=True)
    """
    assert_clean(run(probe_dir, program), "child exited 0", "hook results [True, True]")


# --------------------------------------------------------------------------------------
# Forks from awkward places: hooks, signal handlers, before-hooks.


def test_fork_from_a_c_prepare_hook_and_a_c_parent_hook(probe_dir: Path) -> None:
    """A nested fork() passes through forkguard (no hooks, no holds) and its child
    still gets registered objects restored."""
    for where in ("fork_in_prepare", "fork_in_parent"):
        program = f"""
        import gilprobe, forkguard
        gilprobe.attach()
        gilprobe.add_hook({where!r})
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # threads
        print("child exited", fork_and_reap(), flush=True)
        print("nested child exited", gilprobe.hook_results()[0], flush=True)
        """
        assert_clean(run(probe_dir, program), "child exited 0", "nested child exited 0")


def test_registering_from_a_c_hook_is_refused_not_deadlocked(probe_dir: Path) -> None:
    program = """
    import gilprobe, forkguard
    gilprobe.attach()
    gilprobe.add_hook("register_in_prepare")
    print("child exited", fork_and_reap(), flush=True)
    print("rc in hook", gilprobe.hook_results()[1], flush=True)
    """
    busy = f"rc in hook {forkguard._REGISTRY.backend._lib.FORKGUARD_EBUSY}"  # type: ignore[union-attr]
    assert_clean(run(probe_dir, program), "child exited 0", busy)


def test_fork_from_a_signal_handler_that_interrupts_registrations(probe_dir: Path) -> None:
    """A native thread registers and unregisters in a loop and handles signals with
    fork(): forks land inside the registry's critical sections, pass through, and
    every child exits.  (Signals that arrive during a handler merge into one.)"""
    program = """
    import gilprobe, forkguard
    gilprobe.attach()
    forks, ok = gilprobe.signal_fork_storm(2000)
    print("signal forks", forks, "ok", ok, flush=True)
    # Signals that land during a handler merge: under ASan fewer than 100 of the 2,000
    # become forks, so the floor only proves the storm ran.
    print("equal", forks == ok and forks >= 50, flush=True)
    print("registry empty", forkguard._REGISTRY.backend.count() == 0, flush=True)
    """
    assert_clean(run(probe_dir, program, deadline=60), "equal True", "registry empty True")


# A before-hook registered before forkguard (so it runs after forkguard's) forks once.
FORK_IN_EARLIER_HOOK = """
once = []
def spawn_helper_before_fork():
    if not once:
        once.append(None)  # before forking: the inner fork runs this hook too
        once[0] = fork_and_reap()
os.register_at_fork(before=spawn_helper_before_fork)
import forkguard
"""


def test_os_fork_inside_an_earlier_before_hook_keeps_the_outer_holds(probe_dir: Path) -> None:
    """A before-hook registered before forkguard runs after forkguard's hook took its
    holds; if it forks, the inner fork keeps the outer fork's holds held (this thread
    holds them for the outer fork) and the outer fork releases them afterwards."""
    program = FORK_IN_EARLIER_HOOK + textwrap.dedent("""
    L = threading.Lock()
    forkguard.register(L, policy="hold", timeout=0.3)
    print("child exited", fork_and_reap(), flush=True)
    print("inner child exited", once[0], flush=True)
    print("parent can take L:", L.acquire(timeout=2), flush=True)
    """)
    assert_clean(
        run(probe_dir, program), "child exited 0", "inner child exited 0", "parent can take L: True"
    )


def test_earlier_hold_bookkeeping_loses_the_outer_hold(probe_dir: Path) -> None:
    """The scenario above, with forkguard's per-thread fork state as it was (one slot
    per thread, overwritten by the inner fork): the outer hold stays taken forever."""
    program = FORK_IN_EARLIER_HOOK + textwrap.dedent("""
    from forkguard import _REGISTRY
    class OneSlot(dict):  # what _forks was: one state per thread
        def setdefault(self, key, default):
            self[key] = default
            return default
    _REGISTRY._forks = OneSlot()
    L = threading.Lock()
    forkguard.register(L, policy="hold", timeout=0.3)
    fork_and_reap()
    print("parent can take L:", L.acquire(timeout=2), flush=True)
    """)
    assert "parent can take L: False" in run(probe_dir, program).lines()


def test_hold_timeouts_have_one_limit_for_python_and_c(ext: ModuleType) -> None:
    backend = forkguard._REGISTRY.backend
    limit = backend.timeout_max
    m = ext.lib.mutex_new(ext.lib.PTHREAD_MUTEX_NORMAL, 0, 0)
    for obj in (m, threading.Lock()):
        with pytest.raises(ValueError, match="from 0 to 1e\\+09"):
            forkguard.register(obj, policy="hold", timeout=limit * 10)
        forkguard.register(obj, policy="hold", timeout=limit).unregister()
    # the C API's own check: the same limit
    ffi, lib = backend._ffi, backend._lib  # type: ignore[union-attr]
    mutex = ffi.cast("pthread_mutex_t *", int(ext.ffi.cast("uintptr_t", m)))
    out = ffi.new("uint64_t *")
    for timeout in (limit * 10, float("inf"), float("nan"), -1.0):
        assert lib.fg_register_mutex(mutex, -1, 1, timeout, b"x", out) == lib.FORKGUARD_EINVAL
    assert lib.fg_register_mutex(mutex, -1, 1, limit, b"x", out) == lib.FORKGUARD_OK
    assert lib.fg_unregister(out[0]) == lib.FORKGUARD_OK
