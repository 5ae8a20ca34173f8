"""distprop.parallel in one process: the size-1 communicator, DataParallel without a
reducer, and the argument checks that come before any communication."""

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
