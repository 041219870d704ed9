"""A real pre-fork server: gunicorn, the app preloaded in the master (tests/gunicorn_app.py)
and logging from a thread, workers recycled every few requests, real HTTP requests over
a unix socket.  Worker hangs are counted from gunicorn's own log ("WORKER TIMEOUT": the
master killed a worker that stopped answering).  Bare, workers hang; started through
``python -m forkguard run --protect``, every request is answered, none hangs, and each
request's record, logged in a worker, reaches the master's QueueListener once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn", reason="gunicorn is a test extra: pip install '.[test]'")

TESTS = Path(__file__).resolve().parent
REQUEST_QUOTA = 4  # each worker leaves after this many requests (then sys.exit)
# A worker that stops answering for this long is killed and logged as "WORKER TIMEOUT".
# A hang is forever, so this only sets how fast one is seen; a loaded machine can
# pause a healthy worker for a second.
WORKER_TIMEOUT = 3


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def ask(sock: str, path: str, server: subprocess.Popen[bytes]) -> str | None:
    """One request: None if answered, else what happened instead."""
    conn = UnixHTTPConnection(sock, timeout=5)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
        if reply.status == 200 and body.startswith(b"ok "):
            return None
        return f"{path}: {reply.status} {body[:200]!r}"
    except OSError as exc:  # the worker was killed mid-request: not answered
        state = "running" if server.poll() is None else f"ended ({server.returncode})"
        return f"{path}: {exc!r}, server {state}"
    finally:
        conn.close()


def wait_until_listening(sock: str, server: subprocess.Popen[bytes], stderr: Path) -> None:
    """Until a connection is taken.  The socket's file appears at bind(), before listen():
    a loaded machine can pause the master in between, and every connect() then is refused."""
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, stderr.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "gunicorn did not start listening in 30 s"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(sock)
                return  # listening: a worker accepts this probe, or it closes unread
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)


def serve(tmp_path: Path, protect: bool, requests: int, stop_at_first_hang: bool) -> dict[str, Any]:
    sock, errors = str(tmp_path / "gunicorn.sock"), tmp_path / "error.log"
    stderr = tmp_path / "stderr.txt"  # a file: a pipe nobody reads could block the server
    records, stacks = tmp_path / "records.json", tmp_path / "stacks.txt"
    cmd = [sys.executable]
    if protect:
        cmd += ["-m", "forkguard", "run", "--protect"]
    cmd += ["-m", "gunicorn", "--preload", "--workers", "2", "--timeout", str(WORKER_TIMEOUT)]
    cmd += ["--max-requests", str(REQUEST_QUOTA), "--graceful-timeout", "1"]
    cmd += ["--bind", f"unix:{sock}", "--error-logfile", str(errors), "--chdir", str(TESTS)]
    cmd += ["--config", str(TESTS / "gunicorn_conf.py"), "gunicorn_app:app"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(FORKGUARD_TEST_RECORDS=str(records), FORKGUARD_TEST_STACKS=str(stacks))
    with stderr.open("wb") as err:
        server = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err
        )
    answered: list[str] = []
    failures: list[str] = []
    try:
        wait_until_listening(sock, server, stderr)
        deadline = time.monotonic() + 90  # workers that never answer end the test too
        for i in range(requests):
            if time.monotonic() > deadline:
                failures.append(f"stopped at request {i}: 90 s passed")
                break
            failure = ask(sock, f"/{i}", server)
            if failure is None:
                answered.append(f"/{i}")
            else:
                failures.append(failure)
            if stop_at_first_hang and "WORKER TIMEOUT" in errors.read_text():
                break
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    log = errors.read_text() if errors.exists() else ""
    logged = Counter(json.loads(records.read_text()) if records.exists() else [])
    return {
        "requests": i + 1,
        "answered": len(answered),
        # Each answered request's record, as often as it reached the master's listener.
        "records_once": sum(logged[path] == 1 for path in answered),
        "records_twice": sum(logged[path] > 1 for path in answered),
        "hung_workers": log.count("WORKER TIMEOUT"),
        "workers_booted": log.count("Booting worker"),
        "failures": failures[:3] + failures[-3:] if len(failures) > 6 else failures,
        "failed": len(failures),
        "log_tail": log[-1500:] if failures or "WORKER TIMEOUT" in log else "",
        # The server's own stderr (a failed boot, a traceback), when not all was well.
        "stderr_tail": stderr.read_text(errors="replace")[-2000:] if failures else "",
        "stacks": stacks.read_text()[-4000:] if stacks.exists() else "",
    }


def explain(result: dict[str, Any]) -> str:
    """The whole result, one field per line: pytest would cut the dict short."""
    return "\n".join(f"{key}: {value}" for key, value in result.items())


def test_gunicorn_workers_hang_without_forkguard(tmp_path: Path) -> None:
    result = serve(tmp_path, protect=False, requests=60, stop_at_first_hang=True)
    assert result["hung_workers"] > 0, explain(result)
    # And no record a worker logged reached the master's listener (each went into
    # the worker's own copy of the queue), for the requests answered before the hang.
    assert result["records_once"] == result["records_twice"] == 0, explain(result)


def test_gunicorn_under_forkguard_run_answers_every_request(tmp_path: Path) -> None:
    result = serve(tmp_path, protect=True, requests=120, stop_at_first_hang=False)
    assert result["hung_workers"] == 0, explain(result)
    assert result["answered"] == 120, explain(result)
    assert (result["records_once"], result["records_twice"]) == (120, 0), explain(result)
    # The quota recycled workers all along: each new one was forked from a busy master.
    assert result["workers_booted"] >= 120 // REQUEST_QUOTA, explain(result)
