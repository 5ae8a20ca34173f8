"""Failures in a real MPI job end the whole job promptly, with a clear message."""

import pytest

from mpi_launch import NO_MPIEXEC, mpiexec, run_program

pytestmark = [pytest.mark.slow, pytest.mark.skipif(mpiexec() is None, reason=NO_MPIEXEC)]


def test_an_exception_on_one_rank_ends_the_job_within_15s():
    result, seconds = run_program(3, "rank_raises.py", timeout=60)
    assert result.returncode != 0
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "rank 1 of 3: uncaught exception" in result.stderr
    assert "ValueError: deliberate failure on rank 1" in result.stderr
    assert result.stderr.count("ValueError: deliberate failure") == 1  # printed once, by the failing rank


def test_a_killed_rank_ends_the_job_within_60s():
    result, seconds = run_program(3, "rank_killed.py", timeout=120)
    assert result.returncode != 0
    assert seconds < 60, f"took {seconds:.1f} s"


def test_mismatched_models_fail_clearly_on_every_rank():
    result, seconds = run_program(2, "mismatched_model.py", timeout=60)
    assert result.returncode != 0
    assert "ModelMismatchError" in result.stderr
    assert "rank 1 has parameter '0.weight' of shape (5, 3) float32, rank 0 has (4, 3) float32" in result.stderr


def test_watchdog_names_the_stuck_collective_and_the_missing_rank():
    result, seconds = run_program(2, "stuck_rank.py", timeout=60)
    assert result.returncode != 0
    assert seconds < 30, f"took {seconds:.1f} s"
    assert "distprop watchdog: rank 0: collective 'allreduce(sum, 40 bytes)'" in result.stderr
    assert "rank 1: not in a collective; last completed 'allreduce(sum, 24 bytes)'" in result.stderr
