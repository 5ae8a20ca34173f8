"""What the transports promise beyond correct means (tests/test_parallel_mpi.py holds
those): reductions one at a time in submission order whichever thread runs them,
and node barriers that hold every rank until all arrived and wait without
spinning (pytest --with-mpi under mpiexec for the barrier tests)."""

import threading
import time

import numpy as np
import pytest

from distprop.parallel.transports.base import BackgroundTransport


class Recording(BackgroundTransport):
    """Records the order of reductions and how many ran at once."""

    name = "recording"

    def __init__(self):
        self.order, self.running, self.most, self.idle = [], 0, 0, []
        self.lock = threading.Lock()
        super().__init__()

    def reduce(self, bucket, idle):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.002)  # long enough for the two threads to meet
        with self.lock:
            self.running -= 1
            self.order.append(bucket.index)
            self.idle.append(idle)


class FakeBucket:
    def __init__(self, index):
        self.index = index

    def describe(self):
        return f"bucket {self.index}"


def test_reductions_run_one_at_a_time_in_order_when_the_training_thread_helps():
    transport = Recording()
    try:
        for step in range(20):
            works = [transport.start(FakeBucket(i)) for i in range(6)]
            if step % 2:
                time.sleep(0.003)  # let the background thread be mid-reduction
            transport.finish()
            for work in works:
                work.wait()
            assert transport.order == list(range(6)), f"step {step}: order {transport.order}"
            transport.order.clear()
        assert transport.most == 1
        assert True in transport.idle and False in transport.idle  # both threads took part
    finally:
        transport.close()


def test_a_failed_reduction_is_reported_by_its_work_on_either_thread():
    class Failing(BackgroundTransport):
        name = "failing"

        def reduce(self, bucket, idle):
            raise FloatingPointError(f"deliberate, bucket {bucket.index}")

    transport = Failing()
    try:
        works = [transport.start(FakeBucket(i)) for i in range(3)]
        transport.finish()
        for i, work in enumerate(works):
            with pytest.raises(RuntimeError, match=f"allreduce of bucket {i} failed: deliberate"):
                work.wait()
    finally:
        transport.close()


@pytest.fixture(scope="module")
def node():
    import distprop as dp

    comm = dp.init(threads=1)
    if comm.size == 1 or comm.local_size == 1:
        pytest.skip("needs ranks that share a node")
    from mpi4py import MPI

    node = comm.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    yield comm, node
    node.Free()


def _agree(comm, ok, message):
    verdicts = comm.allgather_object((bool(ok), message))
    failed = [f"rank {r}: {m}" for r, (good, m) in enumerate(verdicts) if not good]
    assert not failed, "; ".join(failed)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spin", [False, True])
def test_node_barrier_releases_no_rank_before_the_last_arrives(node, spin):
    from distprop.parallel.shm import NodeBarrier

    comm, node_comm = node
    barrier = NodeBarrier(node_comm)
    rng = np.random.default_rng(comm.rank)
    late = []
    try:
        for round_ in range(40):
            time.sleep(rng.uniform(0, 0.003))
            arrived = time.monotonic()  # one clock for the node's processes
            barrier.wait(spin=spin)
            left = time.monotonic()
            times = node_comm.allgather((arrived, left))
            if min(t[1] for t in times) < max(t[0] for t in times):
                late.append(round_)
    finally:
        barrier.close()
    _agree(comm, not late, f"a rank left before the last arrived in rounds {late}")


@pytest.mark.mpi(min_size=2)
def test_node_barrier_waiters_sleep_instead_of_spinning(node):
    from distprop.parallel.shm import NodeBarrier

    comm, node_comm = node
    barrier = NodeBarrier(node_comm)
    try:
        node_comm.Barrier()
        cpu, wall = time.thread_time(), time.monotonic()
        if node_comm.Get_rank() == 0:
            time.sleep(0.5)  # everyone else waits half a second for local rank 0
        barrier.wait()
        cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    finally:
        barrier.close()
    if node_comm.Get_rank() != 0:  # a spinning waiter would burn about `wall` seconds of CPU
        _agree(comm, wall > 0.4 and cpu < 0.1 * wall, f"waited {wall:.3f} s using {cpu:.3f} s of CPU")
    else:
        _agree(comm, True, "")
