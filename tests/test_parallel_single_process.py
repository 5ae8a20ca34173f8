"""distprop.parallel in one process: the size-1 communicator, DataParallel without a
reducer, and the argument checks that come before any communication."""

import re

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import nn
from distprop.parallel import Communicator, DataParallel, SingleProcessCommunicator


@pytest.fixture
def single():
    return SingleProcessCommunicator()


def test_the_single_process_communicator_is_the_identity(single):
    a = np.array([1.0, 2.0])
    for op in ("sum", "mean", "max", "min"):
        assert single.allreduce_(a, op) is a and a.tolist() == [1.0, 2.0]
    assert single.bcast_(a, root=0) is a
    gathered = single.allgather(a)
    assert gathered.shape == (1, 2) and gathered.tolist() == [[1.0, 2.0]] and not np.shares_memory(gathered, a)
    assert single.bcast_object({"x": 1}) == {"x": 1} and single.allgather_object(5) == [5]
    assert single.allreduce(3) == 3 and isinstance(single.allreduce(3), int)
    assert single.allreduce(3, "mean") == 3.0 and isinstance(single.allreduce(3, "mean"), float)
    assert single.allreduce(np.array([1, 2]), "mean").dtype.kind == "f"
    single.barrier()
    assert single.dup() is single and (single.rank, single.size, single.local_rank, single.local_size) == (0, 1, 0, 1)
    assert repr(single) == "SingleProcessCommunicator(rank=0, size=1)"
    with pytest.raises(SystemExit) as stopped:
        single.abort(3)
    assert stopped.value.code == 3


def test_reductions_are_checked_before_anything_happens(single):
    with pytest.raises(ValueError, match=r"^reduction op must be one of \('sum', 'mean', 'max', 'min', 'bf16_sum'\), "
                                         r"got 'prod'$"):
        single.allreduce_(np.ones(2), "prod")
    with pytest.raises(ValueError, match="got 'prod'"):
        single.allreduce(1.0, "prod")
    with pytest.raises(TypeError, match=r"^an in-place 'mean' needs a floating-point array, got int64 "
                                        r"\(allreduce\(value, 'mean'\) returns a float copy\)$"):
        single.allreduce_(np.array([1, 2], np.int64), "mean")


def test_the_base_class_names_what_a_communicator_must_provide():
    base = Communicator()
    for call in (lambda: base.allreduce_(np.ones(1)), lambda: base.bcast_(np.ones(1)),
                 lambda: base.allgather(np.ones(1)), lambda: base.bcast_object(1), lambda: base.allgather_object(1),
                 base.barrier, base.dup):
        with pytest.raises(NotImplementedError):
            call()
    base.free()  # nothing to release


def test_data_parallel_on_one_process_is_the_module_itself(single):
    dp.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    before = [p.data.copy() for p in net.parameters()]
    model = DataParallel(net, single)
    assert model.reducer is None and all(np.array_equal(p.data, b) for p, b in zip(net.parameters(), before))
    x = dp.tensor(np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(model(x).data, net(x).data)
    model(x).sum().backward()
    np.testing.assert_allclose(net[0].bias.grad, [4.0, 4.0])
    with pytest.raises(ZeroDivisionError):
        with model.no_sync():
            assert model.require_sync is False
            1 / 0
    assert model.require_sync is True  # restored after an exception too
    model.check_replicas()
    model.close()


def test_reproducible_mode_is_used_through_reproducible_backward_only(single):
    dp.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    plain = DataParallel(nn.Sequential(nn.Linear(3, 2)), single)
    with pytest.raises(RuntimeError, match=r"^reproducible_backward needs DataParallel\(..., reproducible=True\)$"):
        plain.reproducible_backward(lambda m, x: m(x).sum(), np.ones((2, 3)))
    model = DataParallel(net, single, reproducible=True, micro_shards=2)
    with pytest.raises(RuntimeError, match=r"^DataParallel\(reproducible=True\): train with reproducible_backward"):
        model(dp.tensor(np.ones((2, 3), np.float32)))
    with dp.no_grad():
        assert model(dp.tensor(np.ones((2, 3), np.float32))).shape == (2, 2)
    x, y = np.arange(12.0).reshape(4, 3).astype(np.float32), np.array([0, 1, 1, 0])
    loss = model.reproducible_backward(lambda m, xb, yb: F.cross_entropy(m(dp.tensor(xb)), yb), x, y)
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        net.zero_grad()
        part_loss = F.cross_entropy(net(dp.tensor(x[part])), y[part])
        part_loss.backward()
        halves.append(([p.grad.copy() for p in net.parameters()], float(part_loss.data)))
    model.reproducible_backward(lambda m, xb, yb: F.cross_entropy(m(dp.tensor(xb)), yb), x, y)
    for p, first, second in zip(net.parameters(), halves[0][0], halves[1][0]):
        np.testing.assert_allclose(p.grad, (first + second) / 2, rtol=1e-6)  # the mean over micro-shards
    assert loss == pytest.approx((halves[0][1] + halves[1][1]) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"^reproducible mode needs micro_shards divisible by the number of ranks "
                                         r"\(1\), got -2$"):
        DataParallel(nn.Linear(2, 2), single, reproducible=True, micro_shards=-2)


def test_converting_to_sync_batchnorm_reaches_nested_modules_with_the_given_communicator(single):
    from distprop.parallel import SyncBatchNorm

    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4))))
    inner = net[1][1][0]
    inner.running_mean[...] = 7.0
    net = SyncBatchNorm.convert_sync_batchnorm(net, single)
    converted = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d) or isinstance(m, SyncBatchNorm)]
    assert len(converted) == 2 and all(isinstance(m, SyncBatchNorm) and m.comm is single for m in converted)
    assert np.array_equal(net[1][1][0].running_mean, np.full(4, 7.0))  # the same buffers, carried over


class TwoAlikeRanks(SingleProcessCommunicator):
    """Two ranks on one node that hold the same values, played by one process: a sum
    over the ranks is twice the local value, everything else is the local value. The
    mean of the gradients is then the local gradient."""

    size = local_size = 2

    def allreduce_(self, array, op="sum"):
        if op == "sum":
            array *= 2
        return array

    def allgather_object(self, obj):
        return [obj, obj]


class ThreeBigParameters(nn.Module):
    """Three parameters of 1.2 MB each; forward(c) = sum_i sum(p_i * c)."""

    def __init__(self):
        super().__init__()
        for i in range(3):
            setattr(self, f"p{i}", nn.Parameter(np.zeros(300_000, np.float32)))

    def forward(self, scale):
        return sum((p * scale).sum() for p in self.parameters())


def test_on_host_arrays_a_gradient_of_1_mb_or_more_is_a_bucket_of_its_own_by_default():
    model = DataParallel(ThreeBigParameters(), TwoAlikeRanks(), transport="thread")
    try:
        buckets = model.reducer.buckets
        # reverse registration order; 1.2 MB each: two of them would fit the 25 MB bucket
        assert [b.names for b in buckets] == [["p2"], ["p1"], ["p0"]]
        assert all(b.in_place for b in buckets)
        model(3.0).backward()
        assert all(np.array_equal(p.grad, np.full(300_000, 3.0, np.float32)) for p in model.module.parameters())
    finally:
        model.close()


def test_reducer_counts_synchronised_passes_and_the_seconds_they_cost(monkeypatch):
    from types import SimpleNamespace

    from distprop.parallel import reducer as reducer_module

    ticks = iter(range(1_000_000))  # a clock that advances one second per reading
    monkeypatch.setattr(reducer_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    dp.manual_seed(0)
    net = nn.Linear(3, 2)
    model = DataParallel(net, TwoAlikeRanks(), transport="thread")
    reducer = model.reducer
    try:
        x = dp.tensor(np.ones((4, 3), np.float32))
        net(x).sum().backward()  # not through the wrapper: nothing to synchronise
        assert reducer.steps == 0 and reducer.sync_seconds == 0.0
        with model.no_sync():
            model(x).sum().backward()
        assert reducer.steps == 0 and reducer.sync_seconds == 0.0
        for step in (1, 2):
            net.zero_grad()
            model(x).sum().backward()
            np.testing.assert_allclose(net.bias.grad, [4.0, 4.0])  # the mean of two alike ranks
            # one second in each of the two gradient hooks, one waiting at the end of the pass
            assert reducer.steps == step and reducer.sync_seconds == 3.0 * step
    finally:
        model.close()


def test_closing_the_wrapper_stops_offering_its_buffers_and_its_thread():
    import threading

    dp.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model = DataParallel(net, TwoAlikeRanks(), transport="thread")
    assert all(p.grad_buffer is not None for p in net.parameters())  # small gradients share a bucket
    thread = model.reducer.transport._thread
    assert thread.is_alive() and thread.name == "distprop-thread-allreduce"
    model.close()
    assert all(p.grad_buffer is None for p in net.parameters()) and not thread.is_alive()
    assert model.reducer is None


class OneNodeRank(TwoAlikeRanks):
    """This rank's view of a job whose nodes hold `node_sizes` ranks (this one the
    first), for the checks that choose the shared-memory transport."""

    mpi_comm = None  # what marks an MPI communicator

    def __init__(self, node_sizes):
        self.node_sizes = node_sizes
        self.local_size = node_sizes[0]

    def allreduce(self, value, op="sum"):
        if isinstance(value, np.ndarray) and op == "max":  # this rank's array, and the other nodes' ranks'
            return np.max([value] + [[n, -n] for n in self.node_sizes[1:]], axis=0)
        return value


def test_shared_memory_is_chosen_where_every_node_has_as_many_ranks_and_room(monkeypatch):
    import os
    from types import SimpleNamespace

    from distprop.parallel.compression import get_compression
    from distprop.parallel.transports import _shm_applies

    layouts = [(1000, np.float32), (10, np.float64)]
    per_rank = (1000 * 4 + 64) + (10 * 8 + 64)  # each bucket may start a cache line further on
    room = {"bytes": 1 << 30}
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=room["bytes"], f_frsize=1))
    none = get_compression(None)
    assert _shm_applies(OneNodeRank([2, 2]), layouts, none)
    assert _shm_applies(OneNodeRank([3, 3, 3]), layouts, none)
    assert not _shm_applies(OneNodeRank([2, 1]), layouts, none)  # chunks are matched across nodes
    assert not _shm_applies(OneNodeRank([2, 3]), layouts, none)
    assert not _shm_applies(OneNodeRank([1, 1]), layouts, none)  # no node to share
    assert not _shm_applies(OneNodeRank([2, 2]), layouts, get_compression("fp16"))
    assert not _shm_applies(TwoAlikeRanks(), layouts, none)  # not MPI
    # /dev/shm must hold twice the node's buffers
    room["bytes"] = 2 * 2 * per_rank
    assert not _shm_applies(OneNodeRank([2, 2]), layouts, none)
    room["bytes"] += 1
    assert _shm_applies(OneNodeRank([2, 2]), layouts, none)


def test_compressed_gradients_are_reduced_with_the_thread_transport_when_none_is_named():
    from distprop.parallel.compression import get_compression
    from distprop.parallel.transports import make_transport

    for compression in ("fp16", "bf16"):
        transport = make_transport(None, TwoAlikeRanks(), False, [(10, np.float32)], get_compression(compression))
        try:
            assert transport.name == "thread"
        finally:
            transport.close()


def test_spare_cores_are_those_the_node_or_the_binding_leaves_beside_the_compute_threads(monkeypatch):
    import os

    from distprop.parallel.transports import shm as shm_transport

    comm = TwoAlikeRanks()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # not bound
    monkeypatch.setattr(shm_transport, "get_num_threads", lambda: 3)
    assert shm_transport.spare_cores(comm) == (8 - 2 * 3) / 2  # no threads set on the communicator
    comm.threads = 2
    assert shm_transport.spare_cores(comm) == (8 - 2 * 2) / 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # bound to 3 cores
    assert shm_transport.spare_cores(comm) == 3 - 2


def test_communicator_reductions_return_new_values_of_the_right_kind(single):
    a = np.array([1.5, 2.5], np.float32)
    total = single.allreduce(a)
    assert total is not a and total.tolist() == [1.5, 2.5]  # a new array: the input is left alone
    assert single.allreduce(a, "mean").dtype == np.float32  # floats keep their precision
    assert single.allreduce(2.5) == 2.5 and isinstance(single.allreduce(2.5, "max"), float)


def test_sync_batchnorm_keeps_its_options():
    from distprop.parallel import SyncBatchNorm

    plain = SyncBatchNorm(3, affine=False)
    assert plain.weight is None and plain.bias is None and plain.running_mean is not None
    untracked = SyncBatchNorm(3, track_running_stats=False)
    assert untracked.weight is not None and untracked.running_mean is None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_over_two_alike_ranks_is_batch_norm_over_both_batches(momentum):
    """The global batch of two ranks that hold x each is x twice: the same mean and
    variance, but running_var's unbiased estimate counts 2n values."""
    from distprop.parallel import SyncBatchNorm

    x = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float64) * 2 + 1
    sync = SyncBatchNorm(3, momentum=momentum, comm=TwoAlikeRanks()).to(dtype=np.float64)
    reference = nn.BatchNorm1d(3, momentum=momentum).to(dtype=np.float64)
    for step in range(2):
        y = sync(dp.tensor(x))
        y_ref = reference(dp.tensor(np.concatenate([x, x])))
        np.testing.assert_allclose(y.data, y_ref.data[:4], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.running_mean, reference.running_mean, rtol=1e-12)
    np.testing.assert_allclose(sync.running_var, reference.running_var, rtol=1e-12)
    assert int(sync.num_batches_tracked) == 2
    sync.eval(), reference.eval()
    np.testing.assert_allclose(sync(dp.tensor(x)).data, reference(dp.tensor(x)).data, rtol=1e-12)
    np.testing.assert_allclose(sync.running_mean, reference.running_mean, rtol=1e-12)  # evaluation leaves them
    sync.train()
    with pytest.raises(ValueError, match=r"^SyncBatchNorm: expected more than 1 value per channel over all ranks, "
                                         r"got 0$"):
        sync(dp.tensor(np.zeros((0, 3))))


def test_buffers_packed_for_one_broadcast_per_dtype_come_back_to_their_owners():
    """On two alike ranks rank 0's buffers are this rank's: unpacking the broadcast
    must give each buffer its own values back, whatever their sizes and dtypes."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    rng = np.random.default_rng(7)
    for module in (net[1], net[3]):
        module.running_mean[...] = rng.standard_normal(module.running_mean.shape)
        module.running_var[...] = rng.uniform(1, 2, module.running_var.shape)
        module.num_batches_tracked[...] = rng.integers(1, 100)
    before = {name: buffer.copy() for name, buffer in net.named_buffers()}
    model = DataParallel(net, TwoAlikeRanks(), transport="thread")
    try:
        for _ in range(2):  # at wrapping, then before each training forward
            assert all(np.array_equal(buffer, before[name]) for name, buffer in net.named_buffers())
            model(dp.tensor(np.ones((4, 3), np.float32)))
            before = {name: buffer.copy() for name, buffer in net.named_buffers()}
    finally:
        model.close()


class OtherRank1(TwoAlikeRanks):
    """Rank 1 describes its model as `change` makes it from this rank's description."""

    def __init__(self, change):
        self.change = change

    def allgather_object(self, obj):
        return [obj, self.change(obj)]


@pytest.mark.parametrize("change, problem", [
    (lambda s: s[:-1], "rank 1 has 1 parameters and buffers, rank 0 has 2 (first missing: 'bias')"),
    (lambda s: s + [("buffer", "extra", (1,), "float32", "cpu", None)],
     "rank 1 has 3 parameters and buffers, rank 0 has 2 (first extra: 'extra')"),
    (lambda s: [s[0], ("parameter", "bias", (2,), "float64", "cpu", True)],
     "rank 1 has parameter 'bias' of shape (2,) float64, rank 0 has (2,) float32"),
])
def test_a_model_that_differs_on_rank_1_is_described_in_full(change, problem):
    from distprop.parallel import ModelMismatchError

    message = f"DataParallel: the model differs between ranks (compared with rank 0): {problem}"
    with pytest.raises(ModelMismatchError, match=f"^{re.escape(message)}$"):
        DataParallel(nn.Linear(3, 2), OtherRank1(change))


def test_sums_take_distprops_ring_only_where_it_beats_mpis_choice(monkeypatch):
    """Large float sums on 3 (or 5, 6, ...) ranks go round the ring; small ones, other
    dtypes and powers of two stay with MPI_Allreduce."""
    from types import SimpleNamespace

    from distprop.parallel import ring

    taken = []
    monkeypatch.setattr(ring, "ring_allreduce_", lambda comm, array: taken.append(("ring", comm.Get_size())))
    mpi = SimpleNamespace(IN_PLACE=None)
    large = 6 * ring.MIN_CHUNK_BYTES // 4
    for size, array in ((3, np.zeros(large, np.float32)), (3, np.zeros(large // 4, np.float32)),
                        (3, np.zeros(large, np.int32)), (4, np.zeros(2 * large, np.float32)),
                        (6, np.zeros(large, np.float64)), (2, np.zeros(large, np.float32))):
        comm = SimpleNamespace(Get_size=lambda size=size: size,
                               Allreduce=lambda *args, size=size: taken.append(("mpi", size)))
        ring.sum_in_place(comm, array, mpi)
    assert taken == [("ring", 3), ("mpi", 3), ("mpi", 3), ("mpi", 4), ("ring", 6), ("mpi", 2)]


def test_the_ring_can_be_turned_off_and_a_bad_setting_is_named(monkeypatch):
    from distprop.parallel import ring

    for value, allowed in (("", True), ("1", True), (" 0 ", False)):
        monkeypatch.setenv(ring.VARIABLE, value)
        assert ring.ring_allowed() is allowed
    monkeypatch.setenv(ring.VARIABLE, "off")
    with pytest.raises(ValueError, match=r"^\$DISTPROP_ALLREDUCE_RING must be 1 .* or 0 .*, got 'off'$"):
        ring.ring_allowed()
