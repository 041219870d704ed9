"""python -m forkguard doctor on whole programs (tests/doctor_programs/): each names
the lock its hung children were stuck on and the parent's thread that held it.
Every run is bounded: the doctor ends hung children and, after them, the program;
the test's own deadline backs that up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import forkguard

PROGRAMS = Path(__file__).parent / "doctor_programs"
DEADLINE = 60
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def doctor(*args: str, slow_reader: bool = False) -> tuple[int, str, str]:
    """Run ``python -m forkguard doctor args``: (exit status, stdout, stderr).  With
    `slow_reader`, the program's stdout is read a little at a time (a stalled
    consumer), and what it says is not kept."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, "-m", "forkguard", "doctor", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out: list[bytes] = []
    err: list[bytes] = []

    def read(stream: Any, into: list[bytes], slow: bool) -> None:
        while chunk := stream.read1(65536):
            if slow:
                time.sleep(0.05)
            else:
                into.append(chunk)

    readers = [
        threading.Thread(target=read, args=(proc.stdout, out, slow_reader), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err, False), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout=DEADLINE)
    finally:
        proc.kill()
    for r in readers:
        r.join(10)
    return (
        proc.returncode,
        b"".join(out).decode(errors="replace"),
        b"".join(err).decode(errors="replace"),
    )


def test_the_seed_program_names_the_queue_lock_its_holder_and_queue_put(tmp_path: Path) -> None:
    started = time.monotonic()
    summary_file = tmp_path / "summary.json"
    status, _, err = doctor(
        "--timeout", "2", "--json", str(summary_file), str(PROGRAMS / "seed.py")
    )
    assert status == 1, err[-3000:]
    report = err[: err.index("forkguard doctor: ") if "forkguard doctor: " in err else None]
    first = err.index("forkguard.watch: child process")
    # the watch report of the first hung child: the lock, the thread, queue.put
    child = err[first:]
    assert "waiting for: the mutex of <queue.Queue at" in child
    assert re.search(r"in queue\.(Queue\.)?put\b", child)
    assert "log_forever" in err  # by the child's report or the audit at the fork
    assert report is not None
    summary = json.loads(summary_file.read_text())
    assert summary["hung_children"] and summary["forks"] >= 1
    (cause,) = summary["causes"]
    assert cause["lock"].startswith("the mutex of <queue.Queue at")
    assert "forkguard.register(<queue.Queue at" in cause["fix"]
    assert time.monotonic() - started < 15 + 2 * 2 + 5  # named within 15 s, then stopped


def test_without_the_doctor_the_seed_program_hangs() -> None:
    proc = subprocess.Popen([sys.executable, str(PROGRAMS / "seed.py")], start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=15)  # it never ends (a hung worker, or the endless loop)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_print_while_forking_names_stdouts_buffer_lock_and_the_printing_thread() -> None:
    program = str(PROGRAMS / "print_while_forking.py")
    status, _, err = doctor("--timeout", "1", program, "20", slow_reader=True)
    assert status == 1, err[-3000:]
    assert "waiting for: sys.stdout's buffer (the file's C buffer lock)" in err
    assert "thread 'printer'" in err
    # where the child is stuck: its print() (or its flush(), if print() went through)
    assert re.search(
        r'print_while_forking.py", line \d+, in __main__.<module>\n\s+(print|sys)', err
    )
    assert "fix: forkguard.register(sys.stdout)" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_an_unregistered_c_mutex_names_the_native_thread_that_held_it(ext: ModuleType) -> None:
    if forkguard._REGISTRY.backend.mutex_fields() is None:
        pytest.skip("this C library's mutex layout is not known to forkguard")
    folder = os.path.dirname(ext.__file__ or "")
    status, _, err = doctor("--timeout", "1", str(PROGRAMS / "c_mutexes.py"), folder)
    assert status == 1, err[-3000:]
    assert "that forkguard does not know (pthread_mutex_t)" in err
    assert "native thread 'ext-worker'" in err
    # the registered one was held too, but the child got it back free and went on
    assert "lib.pthread_mutex_lock(unregistered)" in err
    assert "1 child hung" in err


def test_a_program_that_does_not_hang_keeps_its_exit_status_and_output(tmp_path: Path) -> None:
    script = tmp_path / "fine.py"
    script.write_text(
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    print('child'); sys.stdout.flush(); os._exit(0)\n"
        "os.waitpid(pid, 0)\nprint('parent', sys.argv[1:])\nsys.exit(3)\n"
    )
    status, out, err = doctor(str(script), "--an-option", "x")
    assert status == 3 and out == "child\nparent ['--an-option', 'x']\n"
    assert "1 fork seen, 0 children hung" in err and "exited with status 3" in err


def test_bad_command_lines_are_refused() -> None:
    for args, message in (
        ((), "give a script to run"),
        (("no-such-script.py",), "can't open file 'no-such-script.py'"),
        (("--timeout", "0", "x.py"), "--timeout must be a number of seconds > 0"),
        (("--timeout", "soon", "x.py"), "invalid float value"),
    ):
        status, _, err = doctor(*args)
        assert status == 2 and message in err, (args, err)


def test_a_doctor_killed_outright_takes_its_program_with_it(tmp_path: Path) -> None:
    """The program runs in a session of its own: a doctor killed with SIGKILL (a test's
    timeout, say) must not leave it running for ever."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "pid"
    program = tmp_path / "sleeper.py"
    program.write_text(
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "forkguard", "doctor", str(program)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the program did not start"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.05)
    except ProcessLookupError:
        return
    os.kill(pid, 9)  # (not left behind by this test either)
    pytest.fail("the program outlived its doctor")


def test_a_program_whose_doctor_is_already_gone_ends_at_once() -> None:
    """The doctor can go before its program asks the kernel to follow it: the program
    then has another parent already, and must see that from the doctor's own pid."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = "import os, sys\nfrom forkguard._doctor import _end_with_the_doctor as end\n"
    code += "end(int(sys.argv[1]))\nprint('still here')\n"
    # Its parent is this test (it stays), or pid 0, no process's (the doctor has gone).
    for doctor, status, out in ((os.getpid(), 0, b"still here\n"), (0, -9, b"")):
        args = [sys.executable, "-c", code, str(doctor)]
        ran = subprocess.run(args, check=False, capture_output=True, timeout=60)
        assert (ran.returncode, ran.stdout) == (status, out), (doctor, ran)
