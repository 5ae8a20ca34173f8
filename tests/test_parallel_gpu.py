"""The GPU paths of distprop.parallel in one process: NCCL collectives and the
reducer's NCCL transport (pytest --device gpu)."""

import numpy as np
import pytest

import distprop as dp
from distprop import backend, nn
from distprop.parallel.communicator import MPICommunicator
from distprop.parallel.compression import get_compression
from distprop.parallel.reducer import Reducer

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_comm():
    from mpi4py import MPI

    from distprop.parallel.nccl import NcclCommunicator, nccl_available

    if not nccl_available():
        pytest.skip("GPU: cupy has no NCCL")
    comm = MPICommunicator(MPI.COMM_SELF)
    comm.nccl = NcclCommunicator(MPI.COMM_SELF)
    return comm


def test_nccl_collectives_on_one_rank(gpu_comm):
    cp = backend.cupy_module()
    a = cp.arange(10, dtype=cp.float32)
    gpu_comm.allreduce_(a, "sum")
    gpu_comm.allreduce_(a, "mean")
    gpu_comm.bcast_(a, root=0)
    gathered = gpu_comm.allgather(a)
    assert gathered.shape == (1, 10)
    np.testing.assert_array_equal(backend.to_numpy(gathered[0]), np.arange(10, dtype=np.float32))


@pytest.mark.parametrize("compression", [None, "fp16", "bf16"])
def test_reducer_over_nccl_stream(gpu_comm, compression):
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(np.zeros((300, 300), np.float32))
            self.b = nn.Parameter(np.zeros(7, np.float32))

        def forward(self, c):
            return (self.a * c).sum() + (self.b * c).sum()

    bag = Bag().to(device="gpu")
    reducer = Reducer(list(bag.named_parameters()), gpu_comm, bucket_bytes=2**20, first_bucket_bytes=2**10,
                      inplace_bytes=2**19, compression=get_compression(compression))
    assert reducer.transport.name == "nccl"
    for _ in range(2):
        bag.zero_grad()
        reducer.expecting_sync = True
        bag(3.0).backward()
        for p in bag.parameters():
            np.testing.assert_allclose(backend.to_numpy(p.grad), 3.0, rtol=1e-2)
    reducer.close()
