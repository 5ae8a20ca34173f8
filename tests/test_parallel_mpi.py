"""Data-parallel correctness under mpiexec (pytest --with-mpi; CI runs 1, 2 and 3 ranks).

Every assertion that depends on one rank's values is agreed by all ranks first
(`agree`), so a failure on one rank fails the test everywhere instead of leaving
the others waiting in the next collective.
"""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import nn, optim
from distprop.backend import to_device, to_numpy
from distprop.parallel import (DataParallel, ModelMismatchError, average_metrics, broadcast_state,
                               clip_grad_norm_, sum_metrics)

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm(device):
    return dp.init(threads=1, device=device)


def agree(comm, ok: bool, message: str) -> None:
    """Assert on every rank that `ok` held on every rank."""
    verdicts = comm.allgather_object((bool(ok), message))
    failed = [(rank, msg) for rank, (good, msg) in enumerate(verdicts) if not good]
    assert not failed, "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)


class ParamBag(nn.Module):
    """Parameters of given shapes; forward(c) = sum_i sum(p_i * c), so grad = c."""

    def __init__(self, shapes, dtype):
        super().__init__()
        for i, shape in enumerate(shapes):
            setattr(self, f"p{i}", nn.Parameter(np.zeros(shape, dtype)))

    def forward(self, scale, use=None):
        total = None
        for i, p in enumerate(self.parameters()):
            if use is not None and i not in use:
                continue
            term = (p * scale).sum()
            total = term if total is None else total + term
        return total


BUCKET_CASES = {
    # name: (shapes, bucket_mb, first_bucket_mb, inplace_mb)
    "one tensor larger than a bucket": ([(5,), (4000,), (7,)], 0.001, 0.001, 100),
    "many tiny tensors": ([(1,)] * 40 + [(3,)] * 10, 0.0001, 0.00005, 100),
    "a bucket exactly full": ([(250,), (250,), (100,)], 500 * 8 / 2**20, 100 * 8 / 2**20, 100),
    "in-place large gradients": ([(3, 5), (300, 300), (10,), (50_000,)], 25, 1, 0.1),
}


def _transport_or_skip(transport, device):
    if transport in ("shm", "iallreduce") and device == "gpu":
        pytest.skip(f"transport {transport!r} is for host arrays")
    return transport


@pytest.mark.parametrize("transport", ["shm", "thread", "iallreduce"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(BUCKET_CASES))
def test_gradient_of_rank_averages_to_mean_rank_twice(comm, device, case, dtype, transport):
    shapes, bucket_mb, first_mb, inplace_mb = BUCKET_CASES[case]
    bag = ParamBag(shapes, dtype).to(device=device)
    model = DataParallel(bag, comm, bucket_mb=bucket_mb, first_bucket_mb=first_mb, inplace_mb=inplace_mb,
                         transport=_transport_or_skip(transport, device))
    try:
        if model.reducer is not None and case == "a bucket exactly full" and dtype == np.float64:
            agree(comm, model.reducer.transport.name == transport, f"transport {model.reducer.transport.name}")
            groups = [b.names for b in model.reducer.buckets]
            agree(comm, groups == [["p2"], ["p1", "p0"]], f"bucket assignment {groups}")
        for _ in range(2):  # twice: catches state left over from the first pass
            bag.zero_grad()
            model(float(comm.rank)).backward()
            expected = (comm.size - 1) / 2
            grads = [to_numpy(p.grad) for p in bag.parameters()]
            ok = all(g.dtype == dtype and np.all(g == expected) for g in grads)
            agree(comm, ok, f"gradients {[np.unique(g) for g in grads]} != {expected}")
    finally:
        model.close()


@pytest.mark.parametrize("compression, tolerance", [("fp16", 1e-3), ("bf16", 1e-2)])
def test_compressed_allreduce_is_close_to_the_mean(comm, compression, tolerance):
    bag = ParamBag([(1000,), (300, 300)], np.float32)
    model = DataParallel(bag, comm, compression=compression, transport="thread")
    try:
        scale = 1000.0 * (comm.rank + 1)  # large: a sum of fp16 values would lose more
        model(scale).backward()
        expected = 1000.0 * (comm.size + 1) / 2
        worst = max(float(np.max(np.abs(p.grad - expected))) / expected for p in bag.parameters())
        agree(comm, worst <= tolerance, f"relative error {worst} with {compression}")
    finally:
        model.close()


@pytest.mark.parametrize("transport", ["shm", "thread"])
def test_parameters_without_gradient_are_reduced_as_zeros(comm, transport):
    bag = ParamBag([(4,), (4,), (4,)], np.float64)
    model = DataParallel(bag, comm, bucket_mb=1e-5, first_bucket_mb=1e-5, transport=transport)
    try:
        # Only rank 0 uses p1; p2 is used by nobody; p0 by everyone.
        use = {0, 1} if comm.rank == 0 else {0}
        model(1.0, use=use).backward()
        p0, p1, p2 = bag.parameters()
        unused_ok = p2.grad is None if comm.size == 1 else np.all(p2.grad == 0.0)  # one rank: no reduction
        ok = np.all(p0.grad == 1.0) and np.all(p1.grad == 1.0 / comm.size) and unused_ok
        agree(comm, ok, f"grads {p0.grad}, {p1.grad}, {p2.grad}")
    finally:
        model.close()


@pytest.mark.parametrize("transport", ["shm", "thread"])
def test_no_sync_accumulates_locally_then_averages_the_sum(comm, transport):
    bag = ParamBag([(6,), (2, 3)], np.float64)
    model = DataParallel(bag, comm, transport=transport)
    try:
        with model.no_sync():
            model(float(comm.rank)).backward()
            local = [p.grad.copy() for p in bag.parameters()]
        agree(comm, all(np.all(g == comm.rank) for g in local), "no_sync reduced anyway")
        model(1.0).backward()  # synchronised: averages (rank + 1)
        expected = (comm.size - 1) / 2 + 1
        agree(comm, all(np.all(p.grad == expected) for p in bag.parameters()), "accumulated mean")
    finally:
        model.close()


def _mlp(seed):
    dp.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4)).to(dtype=np.float64)


def _relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _check_equivalence(comm, make_model, make_batch, global_batch, steps=5, make_optimizer=None, device="cpu"):
    """Each rank trains on its slice of a global batch; after every step the
    parameters must equal those of one process trained on the whole batch."""
    make_optimizer = make_optimizer or (lambda params: optim.SGD(params, lr=0.1, momentum=0.9))
    replica, reference = make_model().to(device=device), make_model().to(device=device)
    model = DataParallel(replica, comm)
    try:
        opt, ref_opt = make_optimizer(replica.parameters()), make_optimizer(reference.parameters())
        rng = np.random.default_rng(7)  # the same global batches on every rank
        share = global_batch // comm.size
        mine = slice(comm.rank * share, (comm.rank + 1) * share)
        worst = 0.0
        for step in range(steps):
            x, y = (to_device(a, device) for a in make_batch(rng, global_batch))
            opt.zero_grad()
            F.cross_entropy(model(dp.tensor(x[mine])), y[mine]).backward()
            opt.step()
            ref_opt.zero_grad()
            F.cross_entropy(reference(dp.tensor(x)), y).backward()
            ref_opt.step()
            for (name, p), q in zip(replica.named_parameters(), reference.parameters()):
                error = _relative_error(to_numpy(p.data), to_numpy(q.data))
                worst = max(worst, error)
                if error > 1e-10:
                    break
        agree(comm, worst <= 1e-10, f"largest relative error against one process: {worst:.3g}")
    finally:
        model.close()


@pytest.mark.mpi(min_size=2)
def test_mlp_on_rank_slices_equals_one_process_on_global_batch(comm, device):
    def batch(rng, n):
        return rng.standard_normal((n, 10)), rng.integers(0, 4, n)

    _check_equivalence(comm, lambda: _mlp(3), batch, global_batch=12, device=device)
    _check_equivalence(comm, lambda: _mlp(4), batch, global_batch=24,
                       make_optimizer=lambda params: optim.Adam(params, lr=0.01), device=device)


def test_replicas_stay_bitwise_identical_for_50_steps(comm):
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    dp.manual_seed(100 + comm.rank)  # different initial weights: rank 0's are broadcast
    model = DataParallel(net, comm)
    try:
        opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        rng = np.random.default_rng(comm.rank)  # different data on every rank
        for _ in range(50):
            x = rng.standard_normal((16, 8)).astype(np.float32)
            y = rng.integers(0, 3, 16)
            opt.zero_grad()
            F.cross_entropy(model(dp.tensor(x)), y).backward()
            opt.step()
        model.check_replicas()
    finally:
        model.close()


def test_mismatched_models_raise_on_every_rank(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks")
    width = 5 if comm.rank == 0 else 6
    net = nn.Sequential(nn.Linear(3, width))
    with pytest.raises(ModelMismatchError, match="rank 1 has parameter '0.weight' of shape"):
        DataParallel(net, comm)


@pytest.mark.parametrize("micro_shards", [12, 24])
def test_reproducible_mode_is_bitwise_independent_of_rank_count(comm, micro_shards):
    """Each rank count computes the same bits; compare with a single-rank
    computation of the same micro-shards done on every rank."""
    from distprop.parallel import SingleProcessCommunicator

    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((24, 10)), rng.integers(0, 4, 24)

    def loss_fn(module, xb, yb):
        return F.cross_entropy(module(dp.tensor(xb)), yb)

    single_net = _mlp(5)
    single = DataParallel(single_net, SingleProcessCommunicator(), reproducible=True, micro_shards=micro_shards)
    single_loss = single.reproducible_backward(loss_fn, x, y)

    net = _mlp(5)
    model = DataParallel(net, comm, reproducible=True, micro_shards=micro_shards)
    share = 24 // comm.size
    mine = slice(comm.rank * share, (comm.rank + 1) * share)
    loss = model.reproducible_backward(loss_fn, x[mine], y[mine])
    identical = all(np.array_equal(p.grad, q.grad) for p, q in zip(net.parameters(), single_net.parameters()))
    agree(comm, identical and loss == single_loss, "reproducible gradients differ from one rank's")


def test_metrics_are_averaged_and_summed(comm):
    averaged = average_metrics({"loss": float(comm.rank), "acc": np.float32(1.0)}, comm)
    summed = sum_metrics({"correct": comm.rank + 1, "total": 10}, comm)
    ok = (averaged == {"acc": 1.0, "loss": (comm.size - 1) / 2}
          and summed == {"correct": comm.size * (comm.size + 1) / 2, "total": 10.0 * comm.size})
    agree(comm, ok, f"{averaged} {summed}")


def test_broadcast_state_gives_everyone_root_state(comm):
    state = None
    if comm.rank == 0:
        state = {"state": {0: {"momentum_buffer": np.arange(6.0).reshape(2, 3)}},
                 "param_groups": [{"lr": 0.5, "params": [0]}], "step": 3}
    received = broadcast_state(state, comm)
    ok = (np.array_equal(received["state"][0]["momentum_buffer"], np.arange(6.0).reshape(2, 3))
          and received["param_groups"] == [{"lr": 0.5, "params": [0]}] and received["step"] == 3)
    agree(comm, ok, f"received {received}")


def test_global_norm_clip_is_identical_everywhere(comm):
    p = nn.Parameter(np.zeros(4))
    p.grad = np.array([3.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm_([p], 1.0, comm)
    everywhere = comm.allgather_object(p.grad.tobytes())
    agree(comm, abs(norm - 5.0) < 1e-12 and len(set(everywhere)) == 1 and
          abs(np.linalg.norm(p.grad) - 1.0) < 1e-5, f"norm {norm}, grad {p.grad}")


def _cnn(seed):
    from distprop.parallel import SyncBatchNorm

    dp.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return SyncBatchNorm.convert_sync_batchnorm(net).to(dtype=np.float64)


@pytest.mark.mpi(min_size=2)
def test_cnn_with_sync_batchnorm_on_rank_slices_equals_one_process(comm, device):
    def batch(rng, n):
        return rng.standard_normal((n, 2, 8, 8)) * 3 + 1, rng.integers(0, 3, n)

    _check_equivalence(comm, lambda: _cnn(9), batch, global_batch=12, device=device)


def test_sync_batchnorm_running_statistics_are_those_of_the_global_batch(comm):
    from distprop.parallel import SyncBatchNorm

    rng = np.random.default_rng(3)
    x = rng.standard_normal((6 * comm.size, 5, 3, 3)) * 2 + 0.5
    ours = SyncBatchNorm(5).to(dtype=np.float64)
    reference = nn.BatchNorm2d(5).to(dtype=np.float64)
    share = x.shape[0] // comm.size
    y = ours(dp.tensor(x[comm.rank * share:(comm.rank + 1) * share]))
    y_ref = reference(dp.tensor(x))
    ok = (np.allclose(ours.running_mean, reference.running_mean, rtol=1e-12, atol=1e-14)
          and np.allclose(ours.running_var, reference.running_var, rtol=1e-12)
          and np.allclose(y.data, y_ref.data[comm.rank * share:(comm.rank + 1) * share], rtol=1e-10, atol=1e-12))
    agree(comm, ok, "SyncBatchNorm statistics differ from one process on the whole batch")


def test_ranks_that_differ_only_in_requires_grad_raise_on_every_rank(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks")
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].weight.requires_grad = comm.rank == 0  # the buckets would differ: a hang or wrong means
    with pytest.raises(ModelMismatchError, match="'0.weight' with requires_grad=False, rank 0 with True"):
        DataParallel(net, comm)


@pytest.mark.parametrize("transport", ["shm", "thread", "iallreduce"])
def test_frozen_zero_size_and_mixed_dtype_parameters(comm, transport):
    bag = ParamBag([(3,), (0,), (4,), (2, 0), (5,)], np.float64)
    bag.p2.data = bag.p2.data.astype(np.float32)
    bag.p4.requires_grad = False
    model = DataParallel(bag, comm, bucket_mb=1, transport=transport)
    try:
        for _ in range(2):
            bag.zero_grad()
            model(float(comm.rank)).backward()
            p0, p1, p2, p3, p4 = bag.parameters()
            expected = (comm.size - 1) / 2
            ok = (p4.grad is None and p2.grad.dtype == np.float32 and p1.grad.shape == (0,)
                  and p3.grad.shape == (2, 0) and np.all(p0.grad == expected) and np.all(p2.grad == expected))
            agree(comm, ok, f"grads {[None if p.grad is None else (p.grad.dtype, p.grad) for p in bag.parameters()]}")
    finally:
        model.close()


def test_a_model_cast_after_wrapping_fails_clearly(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks (one rank has no reducer)")
    net = nn.Sequential(nn.Linear(4, 3))
    model = DataParallel(net, comm, transport="thread")
    try:
        net.to(np.float64)  # its gradient buffers were laid out for float32
        with pytest.raises(RuntimeError, match="parameter '0.(weight|bias)' is now float64"):
            model(dp.tensor(np.ones((2, 4)))).sum().backward()
    finally:
        model.close()


def test_namedtuple_outputs_keep_their_type(comm):
    import collections

    Out = collections.namedtuple("Out", "logits doubled")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return Out(y, y * 2)

    model = DataParallel(Two(), comm)
    try:
        out = model(dp.tensor(np.ones((2, 3), np.float32)))
        agree(comm, isinstance(out, Out), f"got {type(out).__name__}")
        (out.logits.sum() + out.doubled.sum()).backward()
    finally:
        model.close()


def test_iallreduce_keeps_no_completed_requests_between_steps(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks (one rank has no reducer)")
    bag = ParamBag([(3,)] * 4, np.float64)
    model = DataParallel(bag, comm, bucket_mb=1e-5, first_bucket_mb=1e-5, transport="iallreduce")
    try:
        for _ in range(10):
            model(1.0).backward()
        pending = len(model.reducer.transport._pending)
        agree(comm, pending <= len(model.reducer.buckets), f"{pending} requests kept after 10 steps")
    finally:
        model.close()


def test_closing_one_of_two_wrappers_leaves_the_other_working(comm):
    bag = ParamBag([(3,), (4,)], np.float64)
    first, second = DataParallel(bag, comm, transport="thread"), DataParallel(bag, comm, transport="thread")
    try:
        first.close()
        bag.zero_grad()
        second(float(comm.rank)).backward()
        expected = (comm.size - 1) / 2
        ok = all(np.all(p.grad == expected) for p in bag.parameters())
        if second.reducer is not None:  # its buckets still receive the gradients directly
            ok = ok and all(p.grad_buffer is not None for p in bag.parameters())
        agree(comm, ok, f"grads {[p.grad for p in bag.parameters()]}")
    finally:
        second.close()


def test_mean_of_integers_is_a_float(comm):
    mean = comm.allreduce(comm.rank, "mean")
    array = comm.allreduce(np.array([comm.rank, 1]), "mean")
    with pytest.raises(TypeError, match="floating-point"):
        comm.allreduce_(np.array([1, 2]), "mean")
    agree(comm, mean == (comm.size - 1) / 2 and array.tolist() == [(comm.size - 1) / 2, 1.0], f"{mean} {array}")


def test_a_failed_shared_memory_reservation_leaves_no_file(monkeypatch):
    import errno
    import os
    import tempfile

    from distprop.parallel import shm

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with tempfile.TemporaryDirectory() as directory:  # not tmp_path: ranks would race over its cleanup
        path = os.path.join(directory, "segment")
        error = shm._reserve(path, 1 << 20)
        assert "cannot reserve 1048576 bytes" in error and "No space left" in error
        assert not os.path.exists(path)


def test_shared_memory_that_cannot_be_had_fails_everywhere_or_falls_back(comm, monkeypatch):
    if comm.size == 1 or comm.local_size == 1:
        pytest.skip("needs ranks that share a node")
    from distprop.parallel import shm

    monkeypatch.setattr(shm, "_reserve", lambda path, nbytes: f"cannot reserve {nbytes} bytes: simulated")
    bag = ParamBag([(3,), (4,)], np.float64)
    with pytest.raises(OSError, match="shared-memory transport: rank 0: cannot reserve .* simulated"):
        DataParallel(bag, comm, transport="shm")
    model = DataParallel(bag, comm)  # chosen automatically: every rank falls back alike
    try:
        agree(comm, model.reducer.transport.name == "thread", model.reducer.transport.name)
        model(float(comm.rank)).backward()
        agree(comm, all(np.all(p.grad == (comm.size - 1) / 2) for p in bag.parameters()), "mean")
    finally:
        model.close()


@pytest.mark.parametrize("transport", ["shm", "thread", "iallreduce"])
def test_a_backward_that_raised_everywhere_leaves_the_next_step_averaged(comm, transport):
    from distprop.autograd import Function

    class Fails(Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            raise FloatingPointError("deliberate, on every rank")

    bag = ParamBag([(3,), (4,), (5,)], np.float64)
    model = DataParallel(bag, comm, bucket_mb=1e-5, first_bucket_mb=1e-5, transport=transport)
    try:
        p0, p1, p2 = bag.parameters()
        started = []
        if model.reducer is not None:
            transport = model.reducer.transport
            start = transport.start
            transport.start = lambda bucket: started.append(bucket.index) or start(bucket)
        out = model(1.0, use={1, 2})
        with pytest.raises(FloatingPointError):
            # The walk goes depth first from the last input: the model's branch runs
            # first, so the buckets of p2 and p1 start before the failure on p0's path.
            (Fails()((p0 * 1.0).sum()) + out).backward()
        agree(comm, model.reducer is None or started == [0, 1], f"buckets started before the failure: {started}")
        bag.zero_grad()
        model(float(comm.rank)).backward()
        expected = (comm.size - 1) / 2
        agree(comm, all(np.all(p.grad == expected) for p in bag.parameters()),
              f"grads after a failed pass {[p.grad for p in bag.parameters()]}")
    finally:
        model.close()


def test_training_forward_gives_every_rank_rank_0s_buffers(comm):
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.register_buffer("scale", np.zeros(4))
            self.register_buffer("steps", np.zeros((), np.int64))

        def forward(self, x):
            return self.linear(x)

    net = WithBuffers()
    model = DataParallel(net, comm)
    try:
        net.scale[...] = comm.rank + 1  # replicas drift apart between steps ...
        net.steps[...] = 10 * comm.rank
        model(dp.tensor(np.ones((2, 3), np.float32))).sum().backward()  # ... and a training forward realigns them
        ok = np.all(net.scale == 1.0) and int(net.steps) == 0 and net.steps.dtype == np.int64
        agree(comm, ok, f"buffers after forward: {net.scale}, {net.steps}")
    finally:
        model.close()
