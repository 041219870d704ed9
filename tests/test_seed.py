"""The seed program (QueueHandler + fork Pool): deadlocks bare, 200 pools clean registered."""

from __future__ import annotations

from forkguard._seed import run_isolated


def test_seed_program_deadlocks_without_forkguard() -> None:
    result = run_isolated(protect=False, pools=100, deadline=3.0, limit=400)
    assert result["result"] == "deadlocked", result


def test_seed_program_runs_200_pools_with_forkguard() -> None:
    result = run_isolated(protect=True, pools=200, deadline=15.0, limit=600)
    assert result["result"] == "clean", result
    assert result["clean_pools"] == 200
