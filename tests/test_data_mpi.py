"""The loader under real MPI ranks (pytest --with-mpi under mpiexec, 2 ranks or more).

Each rank writes its own copy of the dataset in its own temporary directory: the
fingerprint names files relative to the dataset root, so the copies agree.
"""

import pytest
from data_helpers import write_ids

from distprop.data import ArrowLoader
from distprop.errors import DataError

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def test_ranks_agree_and_split_the_epoch(comm, tmp_path):
    import distprop

    write_ids(tmp_path, 203, row_group_size=16, rows_per_file=70)
    loader = ArrowLoader(tmp_path, 9, rank=comm.rank, world_size=comm.size, seed=4)
    loader.check_consistent(comm)
    loader.check_consistent(distprop.init())  # distprop's communicator works as well
    mine = [int(i) for batch in loader for i in batch["id"]]
    everyone = comm.allgather(mine)
    assert len({len(ids) for ids in everyone}) == 1
    seen = [i for ids in everyone for i in ids]
    assert len(seen) == len(set(seen)) == 203 // (9 * comm.size) * 9 * comm.size


def test_a_disagreement_fails_on_every_rank(comm, tmp_path):
    write_ids(tmp_path, 100)
    loader = ArrowLoader(tmp_path, 5, rank=comm.rank, world_size=comm.size, seed=comm.rank)
    with pytest.raises(DataError, match="'seed'"):
        loader.check_consistent(comm)
