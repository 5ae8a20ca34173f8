"""What holds for every test file, present and future.

- Hypothesis runs the derandomised "ci" profile unless told otherwise: the same
  examples on every run, whatever ran before, and no deadline (the machines are
  shared; timing never decides a test). `--hypothesis-profile=explore` draws fresh
  examples, for hunting bugs.
- Tests marked `mpi` run under mpiexec with `--with-mpi` (tests/run.sh: 2 and 3
  ranks). A plain run leaves them out as deselected and says how to run them.
- Tests marked `gpu` run with `--device gpu`; without it they skip, saying so.
- No silent skips. A skip is accepted only for what installing packages cannot
  change: its reason starts with "GPU:", "platform:" or "privileges:" (or is
  pytest-mpi's too-few-ranks skip). Any other skip -- PyTorch, scikit-learn or
  mpiexec missing -- fails the run, and its reason says what to install. The end of
  every run lists the skips, grouped by reason.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import Phase, settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", deadline=None)
# tests/mutation.sh: a failing example is enough to catch a mutant; shrinking it to
# the simplest one would re-run the test hundreds of times.
settings.register_profile("mutation", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("ci")

ACCEPTED_SKIPS = ("GPU:", "platform:", "privileges:")
TOO_FEW_RANKS = re.compile(r"Test requires \d+ MPI processes")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "gpu"),
                     help="array backend the tests run on: numpy (cpu) or cupy (gpu)")


def pytest_configure(config):
    if config.getoption("--device") == "gpu":
        from distprop import backend

        if not backend.gpu_available():
            raise pytest.UsageError("--device gpu: cupy is not installed or sees no GPU")
    config.pluginmanager.register(SuitePolicy(config), "distprop-suite-policy")


@pytest.fixture(scope="session")
def device(request):
    """'cpu' or 'gpu': where tests put their arrays (pytest --device gpu)."""
    return request.config.getoption("--device")


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed for each test: inputs never depend on
    which tests ran before."""
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _same_global_generators():
    """distprop's default generator (initialisers, dropout) and PyTorch's start every
    test from the same state: weights never depend on which tests ran before."""
    from distprop import random

    random.manual_seed(0)
    torch = sys.modules.get("torch")  # only where a test module imported it
    if torch is not None:
        torch.manual_seed(0)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and item.config.getoption("--device") != "gpu":
        pytest.skip("GPU: runs with --device gpu on a machine with a GPU")


def accepted(reason: str) -> bool:
    return reason.startswith(ACCEPTED_SKIPS) or bool(TOO_FEW_RANKS.match(reason))


class SuitePolicy:
    """Leaves MPI tests out of plain runs, counts skips by reason, fails the run on a
    skip that is not accepted, and says how to repeat a random order."""

    def __init__(self, config):
        self.config = config
        self.skips: Counter[str] = Counter()
        self.mpi_left_out = 0

    @pytest.hookimpl(tryfirst=True)  # before pytest-mpi marks them skipped
    def pytest_collection_modifyitems(self, items):
        if self.config.getoption("--with-mpi", False) or self.config.getoption("--only-mpi", False):
            return
        left_out = [item for item in items if item.get_closest_marker("mpi")]
        if left_out:
            items[:] = [item for item in items if not item.get_closest_marker("mpi")]
            self.config.hook.pytest_deselected(items=left_out)
            self.mpi_left_out = len(left_out)

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips[reason.removeprefix("Skipped: ")] += 1

    def refused(self) -> int:
        return sum(count for reason, count in self.skips.items() if not accepted(reason))

    def pytest_sessionfinish(self, session):
        if self.refused() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        if self.config.pluginmanager.hasplugin("random_order"):
            from random_order.config import Config as RandomOrder

            order = RandomOrder(self.config)
            if order.is_enabled:
                write(f"tests ran in a random order: --random-order-bucket={order.bucket_type} "
                      f"--random-order-seed={order.seed} repeats it")
        if self.mpi_left_out:
            write(f"{self.mpi_left_out} MPI tests left out: they run under mpiexec (bash tests/run.sh, or "
                  "mpiexec -n 2 python -m pytest --with-mpi -m mpi tests/)")
        if not self.skips:
            return
        terminalreporter.section("skipped tests, by reason")
        for reason, count in sorted(self.skips.items(), key=lambda item: (accepted(item[0]), -item[1])):
            ok = accepted(reason)
            write(f"{count:5}  {reason}" + ("" if ok else "   <- not accepted"), red=not ok)
        if self.refused():
            write(f"FAILED: {self.refused()} tests skipped for a reason an install fixes (above); only GPU, "
                  "platform and privilege skips are accepted", red=True, bold=True)
