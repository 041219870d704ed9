"""``python -m forkguard doctor``: run a program, catch its hung children, name the cause.

The doctor runs the program in a child process of its own (in a session of its
own), so that whatever the program does (``os._exit()``, a crash, a hang of its
own) the doctor still ends it and sums up.  In the program's process:

- ``watch(timeout, action="exit")`` is on from its first line: a child stuck on a
  lock held at its fork writes its report to stderr and ends with
  ``HANG_EXIT_STATUS``, so the program goes on as it would after a crashed child;
- an ``audit()`` runs at every fork; its report is printed when it names a held
  lock a child would hang on that no earlier report named.

Both leave their findings as files in a folder the doctor reads at the end.  Once a
child has hung, the program has ``2 * timeout`` seconds to end by itself; then the
doctor stops it (and anything else left in its session).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

_ENV = "FORKGUARD_DOCTOR"  # {"events": folder, "timeout": seconds, "doctor": pid}
_FORKS = "forks.jsonl"
_PROGRAM = "import sys; from forkguard._doctor import program; sys.exit(program())"


def run(
    module: str | None,
    target: list[str],
    *,
    timeout: float,
    json_file: str | None,
    parser: argparse.ArgumentParser,
) -> int:
    if not timeout > 0 or timeout == float("inf"):
        parser.error(f"--timeout must be a number of seconds > 0, not {timeout}")
    if module is None and not target:
        parser.error("give a script to run, or -m module")
    if module is None and not os.path.exists(target[0]):
        parser.error(f"can't open file {target[0]!r}: no such file")
    with tempfile.TemporaryDirectory(prefix="forkguard-doctor-") as events:
        env = dict(os.environ)
        env[_ENV] = json.dumps({"events": events, "timeout": timeout, "doctor": os.getpid()})
        argv = ["-m", module, *target] if module is not None else target
        status, stopped = _supervise([sys.executable, "-c", _PROGRAM, *argv], env, events, timeout)
        summary = _summary(events, status, stopped)
    _write(_summary_text(summary, timeout))
    if json_file is not None:
        with open(json_file, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    if summary["hung_children"]:
        return 1
    return status if status >= 0 else 128 - status


def _supervise(
    cmd: list[str], env: dict[str, str], events: str, timeout: float
) -> tuple[int, bool]:
    """Run the program to its end, or stop it 2 * timeout seconds after its first hung
    child: (its exit status, negative for a signal; True if the doctor stopped it)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    first_hang: float | None = None
    stopped = False
    # The program has a session of its own: what would end the doctor (Ctrl-C, a
    # SIGTERM from a CI runner, a closed terminal) is passed on, then it is stopped.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _: caught.append(n)) for sig in _PASSED_ON}
    try:
        while True:
            try:
                status = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if caught:
                _signal_group(proc.pid, caught[0])
                stopped = True
                status = _stop(proc, grace=2.0)
                break
            if first_hang is None and _hang_files(events):
                first_hang = time.monotonic()
            if first_hang is not None and time.monotonic() - first_hang > 2 * timeout:
                stopped = True
                status = _stop(proc)
                break
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # what the program left in its session
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, stopped


_PASSED_ON = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop(proc: subprocess.Popen[bytes], grace: float = 0.0) -> int:
    """End the program: `grace` seconds to end by itself, 2 more after SIGTERM, then
    SIGKILL."""
    for sig, wait in ((None, grace), (signal.SIGTERM, 2.0)):
        if sig is not None:
            _signal_group(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=wait)
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _hang_files(events: str) -> list[str]:
    return sorted(n for n in os.listdir(events) if n.startswith("hang-") and n.endswith(".json"))


# ------------------------------------------------------------ in the program


def program() -> int:
    """The program's side: watch() and an audit() at each fork, then the program."""
    import forkguard
    from forkguard import _run, _watch

    settings = json.loads(os.environ.pop(_ENV))
    events, timeout = settings["events"], float(settings["timeout"])
    _end_with_the_doctor(int(settings["doctor"]))
    seen: set[tuple[str, str]] = set()

    def on_fork() -> None:
        report = forkguard.audit()
        causes = [(h.what, str(h.holder.name if h.holder else None)) for h in report.would_hang]
        record = {"pid": os.getpid(), "would_hang": [h.as_dict() for h in report.would_hang]}
        _append(os.path.join(events, _FORKS), json.dumps(record))
        if any(c not in seen for c in causes):
            seen.update(causes)
            _write(f"forkguard doctor: at a fork in process {os.getpid()}, {report}\n")

    def on_hang(finding: _watch.Finding) -> None:
        # Whole or not at all: the doctor may stop the program while a child writes.
        path = os.path.join(events, f"hang-{finding.pid}.json")
        with open(path + ".part", "w") as f:
            json.dump(finding.as_dict(), f)
        os.replace(path + ".part", path)

    _watch.watch(timeout, "exit", on_fork=on_fork, on_hang=on_hang, every_child=True)
    parser = argparse.ArgumentParser(prog="python -m forkguard doctor")
    argv = sys.argv[1:]
    module, target = (argv[1], argv[2:]) if argv[:1] == ["-m"] else (None, argv)
    return _run.run(module, target, parser=parser, setup=lambda: None)


def _end_with_the_doctor(doctor: int) -> None:
    """The program runs in a session of its own, so a doctor killed outright (SIGKILL,
    a test's timeout) would leave it running for ever: on Linux the kernel ends it
    when the doctor goes (PR_SET_PDEATHSIG).  Its children stuck on a lock are ended
    by their watchdogs; the others end when their parent does."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    # The doctor's pid comes from the doctor: one that went before this process got
    # here would already have handed it to another parent, and getppid() tells no more.
    if os.getppid() != doctor:
        os.kill(os.getpid(), signal.SIGKILL)


def _append(path: str, line: str) -> None:
    """One whole line (O_APPEND: lines from several processes do not mix)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _write(text: str) -> None:
    from forkguard._watch import _write as write

    write(text)


# ------------------------------------------------------------ the summary


def _summary(events: str, status: int, stopped: bool) -> dict[str, Any]:
    forks = []
    path = os.path.join(events, _FORKS)
    if os.path.exists(path):
        with open(path) as f:
            forks = [_json(line) for line in f if line.strip()]
        forks = [fork for fork in forks if fork is not None]
    hung = []
    for name in _hang_files(events):
        with open(os.path.join(events, name)) as f:
            finding = _json(f.read())
        if finding is not None:
            hung.append(finding)
    causes: dict[tuple[str, str], dict[str, Any]] = {}
    for h in hung:
        names = ", ".join(str(t["name"]) for t in h["holders"]) or "?"
        cause = causes.setdefault(
            (h["lock"]["what"], names),
            {
                "lock": h["lock"]["what"],
                "lock_type": h["lock"]["type"],
                "held_by": names,
                "holder_known": h["holder_known"],
                "stuck_in": _innermost(h["stuck_at"]),
                "fix": h["fix"],
                "children": [],
            },
        )
        cause["children"].append(h["pid"])
    audit_causes: dict[tuple[str, str], Any] = {}
    for fork in forks:
        for held in fork["would_hang"]:
            holder = (held.get("holder") or {}).get("name")
            audit_causes.setdefault((held["what"], str(holder)), held)
    return {
        "forks": len(forks),
        "hung_children": hung,
        "causes": list(causes.values()),
        "held_at_forks": list(audit_causes.values()),
        "program": {"exit_status": status, "stopped_by_doctor": stopped},
    }


def _json(text: str) -> Any:
    """A finding or a fork's line, or None if its writer was stopped in the middle."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _innermost(lines: list[str]) -> str:
    calls = [line for line in lines if line.startswith("File ")]
    return calls[-1] if calls else "?"


def _summary_text(summary: dict[str, Any], timeout: float) -> str:
    hung = summary["hung_children"]
    out = [
        "",
        f"forkguard doctor: {_count(summary['forks'], 'fork')} seen, "
        f"{_count(len(hung), 'child', 'children')} hung"
        + (f" (each ended with exit status 86 after {timeout:g} s and its report)" if hung else ""),
    ]
    for i, cause in enumerate(summary["causes"], 1):
        out += [
            f"  {i}. {cause['lock']} ({cause['lock_type']})",
            f"     held at the fork by: {cause['held_by']} ({cause['holder_known']})",
            f"     children stuck on it: {len(cause['children'])} (pids "
            f"{_pids(cause['children'])}), in {cause['stuck_in']}",
            f"     fix: {cause['fix']}",
        ]
    if not hung and summary["held_at_forks"]:
        out.append(
            f"  no child hung, but audit() found {_count(len(summary['held_at_forks']), 'lock')} "
            "held at a fork that a child would hang on if it took it (printed above)"
        )
    program = summary["program"]
    if program["stopped_by_doctor"]:
        out.append(
            f"  the program was stopped by the doctor {2 * timeout:g} s after its first hung "
            "child (or by Ctrl-C)"
        )
    else:
        out.append(f"  the program exited with status {program['exit_status']}")
    return "\n".join(out) + "\n"


def _pids(pids: list[int]) -> str:
    text = ", ".join(map(str, pids[:5]))
    return text + f" and {len(pids) - 5} more" if len(pids) > 5 else text


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
