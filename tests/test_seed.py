"""The seed program (QueueHandler + fork Pool): deadlocks bare; with the queue registered,
clean but the workers' records are lost; with the listener registered, clean and every
record there once."""

from __future__ import annotations

from forkguard._seed import run_isolated


def test_seed_program_deadlocks_without_forkguard() -> None:
    result = run_isolated(register="none", pools=100, deadline=3.0, limit=400)
    assert result["result"] == "deadlocked", result


def test_seed_program_loses_the_workers_records_with_only_the_queue_registered() -> None:
    result = run_isolated(register="queue", pools=20, deadline=15.0, limit=120)
    assert result["result"] == "clean", result
    assert (result["child_records"], result["child_expected"]) == (0, 20), result


def test_seed_program_runs_200_pools_with_the_listener_registered_and_keeps_every_record() -> None:
    result = run_isolated(register="listener", pools=200, deadline=15.0, limit=600)
    assert result["result"] == "clean", result
    assert result["clean_pools"] == 200
    assert result["child_records"] == result["child_expected"] == 200, result
    assert result["parent_handled"] == result["parent_sent"], result
