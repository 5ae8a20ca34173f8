"""The default training job, end to end, as the README runs it (2 ranks)."""

import re
from pathlib import Path

import pytest

from helpers import INSTALL_SKLEARN
from mpi_launch import NO_MPIEXEC, mpiexec, run_job

pytest.importorskip("sklearn", reason=INSTALL_SKLEARN)
EXAMPLE = Path(__file__).parent.parent / "examples" / "train_digits.py"


@pytest.mark.slow
@pytest.mark.skipif(mpiexec() is None, reason=NO_MPIEXEC)
def test_train_digits_on_two_ranks_reaches_97_percent(tmp_path):
    result, seconds = run_job(2, [str(EXAMPLE), "--data", str(tmp_path / "digits")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"final test accuracy (\d\.\d+)", result.stdout).group(1))
    assert accuracy >= 0.97, result.stdout
    assert (tmp_path / "digits" / "train").is_dir() and (tmp_path / "digits" / "test").is_dir()
