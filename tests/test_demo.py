"""``python -m forkguard demo`` (a shortened run; .ci/run runs the full one)."""

from __future__ import annotations

import io
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import forkguard
from forkguard import _demo


def test_demo_reports_every_run_with_its_record_counts_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its temporary files (the runs' and multiprocessing's pymp-* folders) go here,
    # and nothing is left here after it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    out = io.StringIO()
    assert _demo.run(out, protected_pools=20, timed_pools=2) == 0
    assert sorted(p.name for p in tmp.iterdir()) == []
    text = out.getvalue()
    assert "without forkguard: " in text
    assert (
        "register(log_queue): 20 pools clean; the workers' records that reached the log: 0 of 20"
        in text
    )
    assert (
        "register(listener): 20 pools clean; the workers' records that reached the log: 20 of 20"
        in text
    )
    for method in ("fork + forkguard", "forkserver", "spawn"):
        assert method in text


def test_cli_help_names_the_demo() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "forkguard", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "forkguard", "nope"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_cli_version_names_the_version_the_python_and_the_core() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "forkguard", "--version"], capture_output=True, text=True, check=True
    )
    version = platform.python_version()  # (3.15.0a1 on a pre-release)
    assert done.stdout.startswith(f"forkguard {forkguard.__version__} (CPython {version}, ")
    assert "C core built" in done.stdout
