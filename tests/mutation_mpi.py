"""The MPI tests inside a mutation run (tests/mutation.sh): each file of MPI tests is
one test here that runs it on 2 ranks, so mutants that only real ranks exercise
(reducer, transports, collectives) are tried against those tests too.

mutmut learns which tests cover which function by recording calls in its own
process; calls made by the ranks would be lost. So the ranks load this module as a
plugin (`-p mutation_mpi`) and write the functions they called to a file, which
the test here hands to mutmut as if they had been called in-process. The mutant
under test reaches the ranks through the environment (MUTANT_UNDER_TEST), and they
import the mutated package through PYTHONPATH.

Not collected by a plain pytest run (the name does not start with test_);
tests/mutation.sh passes this file explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distprop.launcher import job_environment, mpiexec_command

MPI_TEST_FILES = ["tests/test_parallel_mpi.py", "tests/test_scaling_transports.py", "tests/test_data_mpi.py"]
HITS_VARIABLE = "DISTPROP_MUTATION_HITS"
RANKS = 2
TIMEOUT_SECONDS = 240  # a mutant that hangs a collective is killed here (the watchdog usually ends it sooner)


@pytest.mark.timeout(TIMEOUT_SECONDS + 60)  # its own limit, not the one for single tests
@pytest.mark.parametrize("path", MPI_TEST_FILES)
def test_mpi_tests_on_two_ranks(path, tmp_path):
    hits = tmp_path / "hits"
    hits.mkdir()
    here = os.getcwd()  # mutmut's copy of the project, holding the mutated package
    pytest_args = ["-m", "pytest", "-x", "-q", "--with-mpi", "-m", "mpi", "-p", "no:cacheprovider",
                   "-p", "mutation_mpi", path]
    # coreutils' timeout, not only subprocess's: mutmut may kill this process, and the
    # job must not outlive it.
    command = ["timeout", "-k", "5", str(TIMEOUT_SECONDS), *mpiexec_command(RANKS, [sys.executable, *pytest_args])]
    env = job_environment(PYTHONPATH=os.pathsep.join([here, os.path.join(here, "tests")]),
                          DISTPROP_WATCHDOG_TIMEOUT=30, **{HITS_VARIABLE: hits})
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS + 30, env=env)
    _report_hits(hits)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _report_hits(directory: Path) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return
    from mutmut.state import state

    for file in directory.glob("*.json"):
        state()._stats.update(json.loads(file.read_text()))


def pytest_sessionfinish(session):
    """On each rank: what the mutated functions recorded during the stats run."""
    directory = os.environ.get(HITS_VARIABLE)
    if not directory or os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return
    from mutmut.state import state

    Path(directory, f"{os.getpid()}.json").write_text(json.dumps(sorted(state()._stats)))
