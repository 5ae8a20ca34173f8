"""What the transports promise beyond correct means (tests/test_parallel_mpi.py holds
those): reductions one at a time in submission order whichever thread runs them,
or all of a pass's at its end on the training thread; the shared-memory transport's
means in both modes, its choice agreed by all ranks; and node barriers that hold
every rank until all arrived and wait without spinning (pytest --with-mpi under
mpiexec for the MPI tests)."""

import threading
import time

import numpy as np
import pytest

from distprop.parallel.transports.base import BlockingTransport


class Recording(BlockingTransport):
    """Records the order of reductions and how many ran at once."""

    name = "recording"

    def __init__(self, background=True):
        self.order, self.running, self.most, self.idle, self.merged = [], 0, 0, [], []
        self.lock = threading.Lock()
        super().__init__(background=background)

    def reduce_all(self, buckets, idle):
        self.merged.append([b.index for b in buckets])
        super().reduce_all(buckets, idle)

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


def test_without_a_thread_nothing_runs_before_the_end_of_backward_and_then_all_at_once():
    transport = Recording(background=False)
    try:
        assert not transport.background
        for step in range(3):
            works = [transport.start(FakeBucket(i)) for i in range(5)]
            time.sleep(0.01)
            assert transport.order == [] and not any(w._done.is_set() for w in works)
            transport.finish()
            for work in works:
                work.wait()
            assert transport.order == list(range(5)) and transport.merged == [list(range(5))]
            assert transport.idle == [True] * 5 and transport.most == 1
            assert len({w.started for w in works}) == 1  # one run, stamped once
            transport.order.clear(), transport.merged.clear(), transport.idle.clear()
        transport.finish()  # a pass with no buckets
        assert transport.merged == []
    finally:
        transport.close()


def test_with_a_thread_the_training_thread_never_merges():
    """Which buckets the thread leaves to the end of backward depends on timing, so
    they must not become one run whose length differs between ranks."""
    transport = Recording(background=True)
    try:
        works = [transport.start(FakeBucket(i)) for i in range(6)]
        transport.finish()
        for work in works:
            work.wait()
        assert transport.merged == []
    finally:
        transport.close()


class Failing(BlockingTransport):
    name = "failing"

    def reduce(self, bucket, idle):
        raise FloatingPointError(f"deliberate, bucket {bucket.index}")


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_reduction_is_reported_by_its_work_on_either_thread(background):
    transport = Failing(background=background)
    try:
        works = [transport.start(FakeBucket(i)) for i in range(3)]
        transport.finish()
        for i, work in enumerate(works):
            expected = f"allreduce of bucket {i} failed: deliberate, bucket {0 if not background else i}"
            with pytest.raises(RuntimeError, match=expected):
                work.wait()
    finally:
        transport.close()


class Interrupted(BlockingTransport):
    name = "interrupted"

    def reduce(self, bucket, idle):
        raise KeyboardInterrupt


def test_an_interrupt_while_the_training_thread_reduces_is_raised_there():
    """Ctrl-C during the reductions at the end of backward stops training; the works
    still report the failure to whoever waits for them."""
    transport = Interrupted(background=False)
    try:
        works = [transport.start(FakeBucket(i)) for i in range(2)]
        with pytest.raises(KeyboardInterrupt):
            transport.finish()
        for work in works:
            with pytest.raises(RuntimeError, match=f"allreduce of bucket {work.bucket.index} failed"):
                work.wait()
    finally:
        transport.close()


class LargeNode:
    """Local rank 0 of a node communicator with `size` ranks, the others silent."""

    def __init__(self, size):
        self.size = size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj] * self.size


def test_a_node_barrier_refuses_more_ranks_than_a_one_byte_token_can_name():
    from distprop.parallel.shm import NodeBarrier

    with pytest.raises(OSError, match=r"^a node barrier serves at most 256 ranks, this node has 257$"):
        NodeBarrier(LargeNode(257))


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


class Bucket:
    """The part of the reducer's bucket a transport uses, over a transport buffer."""

    def __init__(self, index, buffer):
        self.index, self.buffer = index, buffer

    def describe(self):
        return f"bucket {self.index}"


# float32 buckets around a float64 one: two runs of one dtype in the merged reduction
LAYOUTS = [(1000, np.float32), (70_001, np.float32), (33, np.float64), (5, np.float32), (200_000, np.float32)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", [True, False])
def test_shm_transport_averages_every_bucket_alike_with_and_without_its_thread(node, overlap):
    from distprop.parallel.transports.shm import ShmTransport

    comm, _ = node
    transport = ShmTransport(comm, LAYOUTS, overlap=overlap)
    try:
        _agree(comm, transport.background == overlap, f"background {transport.background}, asked {overlap}")
        for step in range(3):
            values = [np.random.default_rng((step, comm.rank, i)).standard_normal(count).astype(dtype)
                      for i, (count, dtype) in enumerate(LAYOUTS)]
            buckets = [Bucket(i, transport.buffer(i)) for i in range(len(LAYOUTS))]
            works = []
            for bucket, value in zip(buckets, values):
                bucket.buffer[...] = value
                works.append(transport.start(bucket))
            transport.finish()
            for work in works:
                work.wait()
            for i, (bucket, value) in enumerate(zip(buckets, values)):
                total = comm.allreduce(value.astype(np.float64), "sum")
                mean = total / comm.size
                tolerance = 1e-5 if value.dtype == np.float32 else 1e-12
                _agree(comm, np.allclose(bucket.buffer, mean, rtol=tolerance, atol=tolerance),
                       f"step {step} bucket {i}: off by {np.abs(bucket.buffer - mean).max()}")
                rank0 = comm.mpi_comm.bcast(bucket.buffer.copy(), root=0)
                _agree(comm, np.array_equal(bucket.buffer, rank0), f"step {step} bucket {i} differs from rank 0's")
    finally:
        transport.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", [True, False])
def test_shm_reductions_tell_the_watchdog_which_buckets_they_reduce(node, monkeypatch, overlap):
    """What a hung reduction is reported as: its bucket, or the run of buckets reduced
    at once at the end of backward."""
    import contextlib

    from distprop.parallel.transports.shm import ShmTransport

    comm, _ = node
    named = []
    monkeypatch.setattr(comm, "_guard", lambda what: named.append(what) or contextlib.nullcontext())
    transport = ShmTransport(comm, LAYOUTS, overlap=overlap)
    named.clear()  # the collectives that set it up
    try:
        works = [transport.start(Bucket(i, transport.buffer(i))) for i in range(len(LAYOUTS))]
        transport.finish()
        for work in works:
            work.wait()
    finally:
        transport.close()
        monkeypatch.undo()
    if overlap:
        expected = [f"shared-memory allreduce of bucket {i}" for i in range(len(LAYOUTS))]
    else:
        expected = [f"shared-memory allreduce of buckets 0-{len(LAYOUTS) - 1}"]
    _agree(comm, named == expected, f"tracked as {named}")


@pytest.mark.mpi(min_size=2)
def test_shm_transport_runs_without_its_thread_unless_every_rank_asks_for_it(node):
    from distprop.parallel.transports.shm import ShmTransport

    comm, _ = node
    transport = ShmTransport(comm, LAYOUTS[:1], overlap=comm.rank != 1)  # rank 1 alone says no
    try:
        _agree(comm, not transport.background, "rank 1 asked for no thread, yet this rank has one")
    finally:
        transport.close()


def test_a_span_is_reduced_in_disjoint_cache_sized_blocks_in_order():
    from distprop.parallel.transports.shm import BLOCK_ELEMENTS, _blocks

    assert list(_blocks(0)) == [] and list(_blocks(5)) == [slice(0, 5)]
    count = 2 * BLOCK_ELEMENTS + 3
    blocks = list(_blocks(count))
    assert [(b.start, b.stop) for b in blocks] == [(0, BLOCK_ELEMENTS), (BLOCK_ELEMENTS, 2 * BLOCK_ELEMENTS),
                                                  (2 * BLOCK_ELEMENTS, count)]


@pytest.mark.mpi(min_size=2)
def test_every_local_rank_reads_the_others_buffers_in_the_segment(node):
    from distprop.parallel.transports.shm import ShmTransport

    comm, node_comm = node
    transport = ShmTransport(comm, LAYOUTS[:2], overlap=False)
    try:
        for i in range(2):
            transport.buffer(i)[...] = 10 * node_comm.Get_rank() + i
        node_comm.Barrier()
        seen = [[np.unique(transport.buffer(i, k)).tolist() for i in range(2)] for k in range(node_comm.Get_size())]
        node_comm.Barrier()  # nobody writes again while another reads
        expected = [[[10.0 * k + i] for i in range(2)] for k in range(node_comm.Get_size())]
        _agree(comm, seen == expected, f"buffers of the local ranks: {seen}")
    finally:
        transport.close()


def test_with_several_nodes_a_rank_sums_its_node_before_the_allreduce_between_nodes():
    """Two nodes of two ranks each, played in one process by stand-ins for the segment,
    the barrier and the communicator between nodes: local rank 0 adds the node's two
    buffers over its chunk, the allreduce between nodes adds the other node's sum, and
    the mean over all four ranks is written into both local buffers."""
    from types import SimpleNamespace

    from distprop.parallel.transports.shm import ShmTransport

    count = 10
    values = [np.arange(1, count + 1, dtype=np.float32), 10 * np.arange(1, count + 1, dtype=np.float32)]
    slabs = [v.copy().view(np.uint8) for v in values]  # each local rank's slab holds its gradients
    other_node = np.float32(1000)  # the other node's sum, at every element

    def allreduce(_, buffer):
        buffer += other_node

    transport = ShmTransport.__new__(ShmTransport)
    transport.comm = SimpleNamespace(local_rank=0, size=4, ring=True)
    transport.segment = SimpleNamespace(local_size=2, slab=lambda k: slabs[k])
    transport.barrier = SimpleNamespace(wait=lambda spin=False: None)
    transport.cross = SimpleNamespace(Get_size=lambda: 2, Allreduce=allreduce)
    transport.MPI = SimpleNamespace(IN_PLACE=None)
    transport.may_spin = False
    transport._reduce_span(0, count, np.dtype(np.float32), idle=False)
    mine = slice(0, count // 2)  # local rank 0's chunk
    expected = (values[0][mine] + values[1][mine] + other_node) / 4
    for slab in slabs:
        np.testing.assert_array_equal(slab.view(np.float32)[mine], expected)
    np.testing.assert_array_equal(slabs[1].view(np.float32)[count // 2:], values[1][count // 2:])  # rank 1's


def test_merged_runs_join_consecutive_buckets_of_one_dtype():
    from distprop.parallel.transports.shm import _runs

    assert _runs([0, 1, 2, 3, 4], LAYOUTS) == [(0, 1), (2, 2), (3, 4)]
    assert _runs([1, 3, 4], LAYOUTS) == [(1, 1), (3, 4)]
    assert _runs([], LAYOUTS) == []


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("value", ["1", "0"])
def test_shm_transport_mode_can_be_chosen_by_environment(node, monkeypatch, value):
    from distprop.parallel.transports.shm import ShmTransport

    comm, _ = node
    monkeypatch.setenv("DISTPROP_SHM_OVERLAP", value)
    transport = ShmTransport(comm, LAYOUTS[:1])
    try:
        _agree(comm, transport.background == (value == "1"), f"background {transport.background} for {value}")
    finally:
        transport.close()


def test_shm_transport_mode_from_environment_is_checked(monkeypatch):
    from distprop.parallel.transports.shm import _overlap_from_environment

    for text, expected in (("", None), ("1", True), (" 0 ", False)):
        monkeypatch.setenv("DISTPROP_SHM_OVERLAP", text)
        assert _overlap_from_environment() is expected
    monkeypatch.setenv("DISTPROP_SHM_OVERLAP", "yes")
    with pytest.raises(ValueError, match=r"\$DISTPROP_SHM_OVERLAP must be 1 .* or 0 .*, got 'yes'"):
        _overlap_from_environment()
