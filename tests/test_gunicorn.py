"""A real pre-fork server: gunicorn, the app preloaded in the master (tests/gunicorn_app.py)
and logging from a thread, workers recycled every few requests, real HTTP requests over
a unix socket.  Worker hangs are counted from gunicorn's own log ("WORKER TIMEOUT": the
master killed a worker that stopped answering).  Bare, workers hang; started through
``python -m forkguard run --protect``, every request is answered and none hangs.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn", reason="gunicorn is a test extra: pip install '.[test]'")

TESTS = Path(__file__).resolve().parent
REQUEST_QUOTA = 4  # each worker leaves after this many requests (then sys.exit)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def serve(tmp_path: Path, protect: bool, requests: int, stop_at_first_hang: bool) -> dict[str, Any]:
    sock, errors = str(tmp_path / "gunicorn.sock"), tmp_path / "error.log"
    cmd = [sys.executable]
    if protect:
        cmd += ["-m", "forkguard", "run", "--protect"]
    cmd += ["-m", "gunicorn", "--preload", "--workers", "2", "--timeout", "1"]
    cmd += ["--max-requests", str(REQUEST_QUOTA), "--graceful-timeout", "1"]
    cmd += ["--bind", f"unix:{sock}", "--error-logfile", str(errors), "--chdir", str(TESTS)]
    cmd += ["gunicorn_app:app"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    server = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    answered = 0
    failures: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.05)
        for i in range(requests):
            conn = UnixHTTPConnection(sock, timeout=5)
            try:
                conn.request("GET", f"/{i}")
                reply = conn.getresponse()
                answered += reply.status == 200 and reply.read().startswith(b"ok ")
            except OSError as exc:  # the worker was killed mid-request: not answered
                failures.append(repr(exc))
            finally:
                conn.close()
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
        assert server.stderr is not None
        server.stderr.close()
    log = errors.read_text()
    return {
        "requests": i + 1,
        "answered": answered,
        "hung_workers": log.count("WORKER TIMEOUT"),
        "workers_booted": log.count("Booting worker"),
        "failures": failures[:5],
        "log_tail": log[-1500:] if failures else "",
    }


def test_gunicorn_workers_hang_without_forkguard(tmp_path: Path) -> None:
    result = serve(tmp_path, protect=False, requests=60, stop_at_first_hang=True)
    assert result["hung_workers"] > 0, result


def test_gunicorn_under_forkguard_run_answers_every_request(tmp_path: Path) -> None:
    result = serve(tmp_path, protect=True, requests=120, stop_at_first_hang=False)
    assert result["hung_workers"] == 0, result
    assert result["answered"] == 120, result
    # The quota recycled workers all along: each new one was forked from a busy master.
    assert result["workers_booted"] >= 120 // REQUEST_QUOTA, result
