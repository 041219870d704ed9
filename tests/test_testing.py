"""forkguard.testing: run_in_child's verdicts, fork_stress's report, the pytest plugin,
and docs/testing.md's example test run against a stand-in extension."""

from __future__ import annotations

import mmap
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from forkguard.testing import ChildResult, StressReport, fork_stress, run_in_child

DOCS = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def test_run_in_child_verdicts() -> None:
    held = threading.Lock()
    held.acquire()

    def boom() -> None:
        raise KeyError("in the child")

    assert run_in_child(lambda: None) == ChildResult("ok")
    assert run_in_child(lambda: False) == ChildResult("failed", "the check returned False")
    failed = run_in_child(boom)
    assert failed.status == "failed" and "KeyError: 'in the child'" in failed.detail
    hung = run_in_child(held.acquire, deadline=0.5)
    assert (hung.status, hung.detail) == ("hung", "killed by SIGALRM after 0.5 s")
    crashed = run_in_child(lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert crashed.status == "crashed" and "SIGTERM" in crashed.detail
    assert not hung and not crashed and run_in_child(lambda: 1)
    held.release()


@pytest.mark.parametrize("deadline", [0, -1, float("nan"), float("inf"), "5", None])
def test_run_in_child_refuses_a_bad_deadline(deadline: Any) -> None:
    with pytest.raises(ValueError, match="deadline must be a finite number of seconds > 0"):
        run_in_child(lambda: None, deadline=deadline)


def test_fork_stress_counts_a_clean_storm() -> None:
    lock = threading.Lock()
    seen: list[int] = []

    def setup(index: int) -> Any:
        seen.append(index)
        return lambda: lock.acquire(timeout=1) and lock.release()

    report = fork_stress(setup, lambda: True, threads=3, forks=20)
    assert report.clean, str(report)
    assert (report.forks, report.ok, report.requested, report.threads) == (20, 20, 20, 3)
    assert sorted(seen) == [0, 1, 2] and report.steps > 0
    assert str(report).startswith("fork_stress: 20 of 20 forks, 20 ok, 0 hung")


def test_fork_stress_reports_what_went_wrong() -> None:
    held = threading.Lock()
    held.acquire()
    forks_seen = mmap.mmap(-1, 1)  # shared with the children: counts them

    def check() -> object:
        number = forks_seen[0]
        forks_seen[0] = number + 1
        if number == 2:
            held.acquire()  # hangs: the parent holds it
        return number == 0  # the first child passes, the second fails

    def setup(index: int) -> Any:
        def step() -> None:
            raise RuntimeError(f"worker {index} broke")

        return step

    report = fork_stress(setup, check, threads=1, forks=5, deadline=0.5, max_problems=2)
    assert not report.clean
    assert (report.forks, report.ok, report.failed, report.hung) == (3, 1, 1, 1)
    assert [(n, r.status) for n, r in report.problems] == [(1, "failed"), (2, "hung")]
    assert len(report.worker_errors) == 1 and "worker 0 broke" in report.worker_errors[0]
    text = str(report)
    assert "fork 2: hung: killed by SIGALRM" in text and "worker error" in text
    held.release()


def test_fork_stress_does_not_start_without_every_worker() -> None:
    def setup(index: int) -> Any:
        if index == 1:
            raise OSError("no resources")
        return lambda: None

    report = fork_stress(setup, lambda: True, threads=3, forks=10)
    assert report.forks == 0 and not report.clean
    assert any("OSError: no resources" in e for e in report.worker_errors), report


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threads": -1}, ValueError, "threads must be an int >= 0, not -1"),
        ({"forks": 2.5}, ValueError, "forks must be an int >= 0, not 2.5"),
        ({"forks": True}, ValueError, "forks must be an int >= 0, not True"),
        ({"max_problems": 0}, ValueError, "max_problems must be None or an int >= 1"),
        ({"child_check": None}, TypeError, "setup and child_check must be callable"),
        ({"deadline": 0}, ValueError, "deadline must be a finite number of seconds > 0"),
    ],
)
def test_fork_stress_refuses_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {"setup": lambda i: lambda: None, "child_check": lambda: True}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fork_stress(**args)


def test_fixture_defaults_to_the_option(request: pytest.FixtureRequest, fork_stress: Any) -> None:
    option = request.config.getoption("fork_storm_forks")
    report: StressReport = fork_stress(lambda i: lambda: None, lambda: True, threads=0)
    assert report.requested == (500 if option is None else option)
    assert fork_stress(lambda i: lambda: None, lambda: True, forks=3).requested == 3


def test_the_plugin_alone_imports_no_forkguard(tmp_path: Path) -> None:
    """Installed, forkguard's plugin loads in every pytest run; a run that does not use
    its fixture gets neither the forkguard package nor any of its fork hooks."""
    (tmp_path / "test_alone.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_alone():
                assert "forkguard_pytest" in sys.modules  # the plugin is loaded
                assert [m for m in sys.modules if m.split(".")[0] == "forkguard"] == []
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_alone.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


# A stand-in for "mylib", the extension in docs/testing.md: a C mutex that work() takes
# and releases (in C, GIL released), registered at import unless MYLIB_REGISTER=0.
MYLIB = """
import importlib.util, os
import forkguard

spec = importlib.util.spec_from_file_location("{name}", {path!r})
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
lib = ext.lib
_mutex = lib.mutex_new(lib.PTHREAD_MUTEX_NORMAL, 0, 0)
if os.environ.get("MYLIB_REGISTER") != "0":
    forkguard.register(_mutex, mutex_type="normal")


def work():
    lib.churn(lib.K_MUTEX, _mutex, 1, 50)
"""


def docs_example() -> str:
    text = DOCS.read_text()
    found = re.search(r"<!-- example: test_mylib_fork.py -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/testing.md lost its example"
    return found.group(1)


@pytest.mark.parametrize("registered", [True, False])
def test_docs_example_catches_an_unregistered_mutex(
    ext: ModuleType, tmp_path: Path, registered: bool
) -> None:
    (tmp_path / "test_mylib_fork.py").write_text(docs_example())
    path = str(ext.__file__)
    (tmp_path / "mylib.py").write_text(textwrap.dedent(MYLIB).format(name=ext.__name__, path=path))
    env = dict(os.environ, MYLIB_REGISTER="1" if registered else "0", PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
         "--fork-storm-forks", "100", "test_mylib_fork.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    if registered:
        assert done.returncode == 0, output
        assert "1 passed" in output
    else:
        assert done.returncode == 1, output
        assert re.search(r"fork_stress: \d+ of 100 forks, \d+ ok, 1 hung", output), output
