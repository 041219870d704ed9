"""Test helpers for fork safety: fork under a deadline, and fork storms.

For extension authors as much as for forkguard itself::

    from forkguard.testing import fork_stress

    def test_my_extension_survives_fork():
        report = fork_stress(setup=worker_step, child_check=use_everything)
        assert report.clean, str(report)

``fork_stress`` is also a pytest fixture (installed with forkguard through the
``pytest11`` entry point); ``pytest --fork-storm-forks N`` sets how many forks
a storm makes when the test does not say.  See docs/testing.md.

Everything here forks; it is POSIX only.
"""

from __future__ import annotations

import math
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ChildResult", "StressReport", "fork_stress", "run_in_child", "verdict"]

Status = Literal["ok", "failed", "hung", "crashed"]

_GRACE = 10.0  # seconds past the child's own alarm before the parent kills it
_DETAIL_MAX = 4000  # bytes of traceback a child sends back


@dataclass(frozen=True)
class ChildResult:
    """How one forked child ended.

    ``status`` is ``"ok"`` (the check passed), ``"failed"`` (the check raised or
    returned False; ``detail`` has the traceback), ``"hung"`` (killed at its
    deadline) or ``"crashed"`` (killed by any other signal).  True when ok.
    """

    status: Status
    detail: str = ""

    def __bool__(self) -> bool:
        return self.status == "ok"


def run_in_child(check: Callable[[], object], *, deadline: float = 20.0) -> ChildResult:
    """Fork; run ``check()`` in the child with a SIGALRM ``deadline`` seconds away.

    The child never returns into the caller: it leaves with ``os._exit``.  A child
    still alive ``deadline`` + 10 s later (its alarm blocked) is killed by the parent.
    """
    _check_deadline(deadline)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(check, deadline, read_end, write_end)  # does not return
    os.close(write_end)
    status = _wait(pid, deadline + _GRACE)
    # Only what is already in the pipe: a process the child forked may still hold the
    # write end open, and waiting for it would escape the deadline.
    os.set_blocking(read_end, False)
    chunks = []
    try:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(read_end)
    return _result(status, b"".join(chunks).decode(errors="replace"), deadline)


def _check_deadline(deadline: object) -> None:
    if not (isinstance(deadline, (int, float)) and 0 < deadline < math.inf):
        raise ValueError(f"deadline must be a finite number of seconds > 0, not {deadline!r}")


def _child(check: Callable[[], object], deadline: float, read_end: int, write_end: int) -> None:
    code = 3
    try:
        os.close(read_end)
        # SIGALRM's default action ends the process even while its only thread
        # is blocked in a C lock call, where no Python signal handler would run.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, deadline)
        outcome = check()
        code = 1 if outcome is False else 0
        if code:
            os.write(write_end, b"the check returned False")
    except BaseException:
        os.write(write_end, traceback.format_exc().encode()[-_DETAIL_MAX:])
        code = 1
    finally:
        os._exit(code)


def _wait(pid: int, limit: float) -> int:
    """waitpid() for `pid`, killing it if it is still alive after `limit` seconds."""
    give_up = time.monotonic() + limit
    pidfd = _pidfd(pid)
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)  # readable when the child exits
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = give_up - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                return os.waitpid(pid, 0)[1]
            if pidfd is not None:
                poller.poll(max(1, int(left * 1000)))
            else:
                time.sleep(min(left, 0.001))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)  # Linux 5.3+, Python 3.9+
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:  # an older kernel, or a sandbox without the syscall
        return None
    return fd


def verdict(status: int) -> Status:
    """A waitpid() status in ChildResult's words (for children forked elsewhere, say
    from C): exit 0 is "ok", another exit "failed", SIGALRM or SIGKILL "hung", any
    other signal "crashed"."""
    if os.WIFEXITED(status):
        return "ok" if os.WEXITSTATUS(status) == 0 else "failed"
    return "hung" if os.WTERMSIG(status) in (signal.SIGALRM, signal.SIGKILL) else "crashed"


def _result(status: int, detail: str, deadline: float) -> ChildResult:
    word = verdict(status)
    if word in ("ok", "failed"):
        return ChildResult(word, detail)
    name = signal.Signals(os.WTERMSIG(status)).name
    if word == "hung":
        return ChildResult("hung", f"killed by {name} after {deadline:g} s")
    return ChildResult("crashed", f"killed by {name}\n{detail}".rstrip())


@dataclass
class StressReport:
    """What a :func:`fork_stress` storm saw.  ``clean`` when every child was ok.

    ``problems`` keeps the first ten children that were not ok, as
    ``(fork number, ChildResult)``; ``worker_errors`` the tracebacks of worker
    threads whose ``setup`` or step raised; ``stuck_threads`` counts workers
    still running a step after the storm (a step that never returns).
    """

    requested: int
    threads: int
    forks: int = 0
    ok: int = 0
    hung: int = 0
    crashed: int = 0
    failed: int = 0
    steps: int = 0
    seconds: float = 0.0
    problems: list[tuple[int, ChildResult]] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    stuck_threads: int = 0

    @property
    def clean(self) -> bool:
        """Every requested fork made, every child ok, every worker well."""
        return (
            self.ok == self.forks == self.requested
            and not self.worker_errors
            and not self.stuck_threads
        )

    def _add(self, number: int, result: ChildResult) -> None:
        self.forks += 1
        if result.status == "ok":
            self.ok += 1
            return
        if result.status == "hung":
            self.hung += 1
        elif result.status == "crashed":
            self.crashed += 1
        else:
            self.failed += 1
        if len(self.problems) < 10:
            self.problems.append((number, result))

    def __str__(self) -> str:
        lines = [
            f"fork_stress: {self.forks} of {self.requested} forks, {self.ok} ok, "
            f"{self.hung} hung, {self.crashed} crashed, {self.failed} failed checks "
            f"({self.threads} threads, {self.steps} steps, {self.seconds:.1f} s)"
        ]
        lines += [f"  fork {n}: {r.status}: {r.detail.strip()}" for n, r in self.problems]
        lines += [f"  worker error: {e.strip()}" for e in self.worker_errors]
        if self.stuck_threads:
            lines.append(f"  {self.stuck_threads} worker thread(s) never returned from a step")
        return "\n".join(lines)


def fork_stress(
    setup: Callable[[int], Callable[[], object]],
    child_check: Callable[[], object],
    *,
    threads: int = 8,
    forks: int = 500,
    deadline: float = 10.0,
    max_problems: int | None = None,
) -> StressReport:
    """Fork ``forks`` times while ``threads`` threads run a workload; check each child.

    setup
        Called once in each worker thread with its index (0 .. threads-1); returns
        the step that thread then calls in a loop until the storm ends.  Steps
        should take and release the locks under test, for example through the
        extension's own functions.
    child_check
        Runs in every child, under a SIGALRM ``deadline``: it should take every
        object the child needs (a lock left held makes it hang).  Raising or
        returning False marks the child "failed".
    max_problems
        Stop forking after this many children that were not ok (None: never), to
        bound a storm that is expected to hang.

    The forks are made from the calling thread, one child at a time.  Returns a
    :class:`StressReport`; it never raises for a bad child.
    """
    _check_stress_arguments(setup, child_check, threads, forks, max_problems)
    _check_deadline(deadline)
    report = StressReport(requested=forks, threads=threads)
    started = time.monotonic()
    with _Workers(setup, report, deadline + _GRACE) as workers:
        for number in range(forks if workers.running else 0):
            report._add(number, run_in_child(child_check, deadline=deadline))
            if max_problems is not None and report.forks - report.ok >= max_problems:
                break
    report.seconds = time.monotonic() - started
    return report


def _check_stress_arguments(
    setup: object, child_check: object, threads: object, forks: object, max_problems: object
) -> None:
    for arg, number in (("threads", threads), ("forks", forks)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{arg} must be an int >= 0, not {number!r}")
    if max_problems is not None and (
        isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1
    ):
        raise ValueError(f"max_problems must be None or an int >= 1, not {max_problems!r}")
    if not callable(setup) or not callable(child_check):
        raise TypeError("setup and child_check must be callable")


class _Workers:
    """fork_stress's worker threads: started (and their setup done) on entry, stopped
    on exit; what they did goes into the report."""

    def __init__(
        self, setup: Callable[[int], Callable[[], object]], report: StressReport, wait: float
    ) -> None:
        self._setup = setup
        self._report = report
        self._wait = wait
        self._stop = threading.Event()
        self._ready = threading.Barrier(report.threads + 1)
        self._steps = [0] * report.threads
        self._lock = threading.Lock()  # guards report.worker_errors
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"fork_stress-{i}", daemon=True)
            for i in range(report.threads)
        ]
        self.running = False

    def _error(self) -> None:
        with self._lock:
            self._report.worker_errors.append(traceback.format_exc())

    def _work(self, index: int) -> None:
        try:
            step = self._setup(index)
        except BaseException:
            self._error()
            self._ready.abort()  # the storm does not start with a worker missing
            return
        try:
            self._ready.wait()
            while not self._stop.is_set():
                step()
                self._steps[index] += 1
        except threading.BrokenBarrierError:
            pass
        except BaseException:
            self._error()

    def __enter__(self) -> _Workers:
        for t in self._threads:
            t.start()
        try:
            self._ready.wait(self._wait)  # every setup() returned
            self.running = True
        except threading.BrokenBarrierError:
            if not self._report.worker_errors:
                self._report.worker_errors.append(
                    f"a setup() did not return within {self._wait:g} s"
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._ready.abort()
        give_up = time.monotonic() + self._wait  # for all of them together
        for t in self._threads:
            t.join(max(0.0, give_up - time.monotonic()))
        self._report.stuck_threads = sum(t.is_alive() for t in self._threads)
        self._report.steps = sum(self._steps)
