"""Data-parallel correctness under mpiexec (pytest --with-mpi; tests/run.sh runs 2 and 3
ranks -- one rank has no reducer, so nothing here would be tested there).

Every rank builds its model from a seed of its own before wrapping it, as separate
processes would: wrapping must give them all rank 0's parameters and buffers, and
after every step they must hold what one process trained on the whole batch holds.

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

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm(device):
    return dp.init(threads=1, device=device)


@pytest.fixture
def wrap(comm):
    """DataParallel(module, comm, **options), closed after the test whatever happened."""
    made = []

    def make(module, **options):
        made.append(DataParallel(module, comm, **options))
        return made[-1]

    yield make
    for model in made:
        model.close()


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
TRANSPORTS = ["shm", "thread", "iallreduce"]


def _transport_or_skip(transport, device):
    if transport in ("shm", "iallreduce") and device == "gpu":
        pytest.skip(f"GPU: transport {transport!r} is for host arrays")
    return transport


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(BUCKET_CASES))
def test_gradient_of_rank_averages_to_mean_rank_twice(comm, wrap, device, case, dtype, transport):
    shapes, bucket_mb, first_mb, inplace_mb = BUCKET_CASES[case]
    bag = ParamBag(shapes, dtype).to(device=device)
    model = wrap(bag, bucket_mb=bucket_mb, first_bucket_mb=first_mb, inplace_mb=inplace_mb,
                 transport=_transport_or_skip(transport, device))
    if case == "a bucket exactly full" and dtype == np.float64:
        agree(comm, model.reducer.transport.name == transport, f"transport {model.reducer.transport.name}")
        groups = [b.names for b in model.reducer.buckets]
        agree(comm, groups == [["p2"], ["p1", "p0"]], f"bucket assignment {groups}")
    for _ in range(2):  # twice: catches state left over from the first pass
        bag.zero_grad()
        model(float(comm.rank)).backward()
        expected = (comm.size - 1) / 2  # the mean of the ranks; their sum would be size times that
        grads = [to_numpy(p.grad) for p in bag.parameters()]
        ok = all(g.dtype == dtype and np.all(g == expected) for g in grads)
        agree(comm, ok, f"gradients {[np.unique(g) for g in grads]} != {expected}")


@pytest.mark.parametrize("transport", ["thread", "iallreduce"])
@pytest.mark.parametrize("compression, tolerance", [("fp16", 1e-3), ("bf16", 1e-2)])
def test_compressed_allreduce_is_close_to_the_mean(comm, wrap, compression, tolerance, transport):
    bag = ParamBag([(1000,), (300, 300)], np.float32)
    model = wrap(bag, compression=compression, transport=transport)
    scale = 1000.0 * (comm.rank + 1)  # large: a sum of fp16 values would lose more
    model(scale).backward()
    expected = 1000.0 * (comm.size + 1) / 2
    worst = max(float(np.max(np.abs(p.grad - expected))) / expected for p in bag.parameters())
    agree(comm, worst <= tolerance, f"relative error {worst} with {compression}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_parameters_without_gradient_are_reduced_as_zeros(comm, wrap, transport):
    bag = ParamBag([(4,), (4,), (4,)], np.float64)
    model = wrap(bag, bucket_mb=1e-5, first_bucket_mb=1e-5, transport=transport)
    for _ in range(2):
        bag.zero_grad()
        # Only rank 0 uses p1; p2 is used by nobody; p0 by everyone.
        use = {0, 1} if comm.rank == 0 else {0}
        model(1.0, use=use).backward()
        p0, p1, p2 = bag.parameters()
        ok = np.all(p0.grad == 1.0) and np.all(p1.grad == 1.0 / comm.size) and np.all(p2.grad == 0.0)
        agree(comm, ok, f"grads {p0.grad}, {p1.grad}, {p2.grad}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_sync_accumulates_locally_then_averages_the_sum(comm, wrap, transport):
    bag = ParamBag([(6,), (2, 3)], np.float64)
    model = wrap(bag, transport=transport)
    with model.no_sync():
        model(float(comm.rank)).backward()
        model(float(comm.rank)).backward()
        local = [p.grad.copy() for p in bag.parameters()]
    agree(comm, all(np.all(g == 2 * comm.rank) for g in local), "no_sync reduced anyway")
    agree(comm, model.require_sync, "no_sync left synchronisation off")
    model(1.0).backward()  # synchronised: averages (2 rank + 1)
    expected = (comm.size - 1) + 1
    agree(comm, all(np.all(p.grad == expected) for p in bag.parameters()), "accumulated mean")


def _mlp(seed):
    dp.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4)).to(dtype=np.float64)


def _relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _perturb_buffers(module, amount):
    """Make this rank's buffers its own (batch-norm statistics differ between processes
    that ran different batches before wrapping)."""
    for buffer in module.buffers():
        buffer += amount


def _check_equivalence(comm, wrap, make_model, seed, make_batch, global_batch, steps=5, make_optimizer=None,
                       device="cpu", make_reference=None, **options):
    """Each rank builds its model from its own seed and trains on its slice of a global
    batch; right after wrapping, and after every step, the parameters and buffers must
    equal those of one process that built rank 0's model (with `make_reference`, if
    given) and trained on the whole batch."""
    make_optimizer = make_optimizer or (lambda params: optim.SGD(params, lr=0.1, momentum=0.9))
    replica = make_model(seed + 1000 * comm.rank).to(device=device)
    _perturb_buffers(replica, comm.rank)
    reference = (make_reference or make_model)(seed).to(device=device)  # rank 0's model
    model = wrap(replica, **options)
    rng = np.random.default_rng(7)  # the same global batches on every rank
    share = global_batch // comm.size
    mine = slice(comm.rank * share, (comm.rank + 1) * share)

    def worst_error():
        pairs = [(p.data, q.data) for p, q in zip(replica.parameters(), reference.parameters())]
        pairs += list(zip(replica.buffers(), reference.buffers()))
        return max(_relative_error(to_numpy(a), to_numpy(b)) for a, b in pairs)

    agree(comm, worst_error() == 0.0, "right after wrapping, the replica differs from rank 0's model")
    x, _ = (to_device(a, device) for a in make_batch(rng, global_batch))
    with dp.no_grad():  # in eval mode nothing is broadcast on the way: wrapping did it all
        ours, theirs = model.eval()(dp.tensor(x[mine])), reference.eval()(dp.tensor(x))
    model.train()
    reference.train()
    worst = _relative_error(to_numpy(ours.data), to_numpy(theirs.data[mine]))
    agree(comm, worst <= 1e-12, f"evaluated right after wrapping, the replica differs by {worst:.3g}")

    opt, ref_opt = make_optimizer(replica.parameters()), make_optimizer(reference.parameters())
    for step in range(steps):
        x, y = (to_device(a, device) for a in make_batch(rng, global_batch))
        opt.zero_grad()
        F.cross_entropy(model(dp.tensor(x[mine])), y[mine]).backward()
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(reference(dp.tensor(x)), y).backward()
        ref_opt.step()
        worst = worst_error()
        agree(comm, worst <= 1e-10, f"after step {step + 1}, largest relative error against one process: {worst:.3g}")


def _mlp_batch(rng, n):
    return rng.standard_normal((n, 10)), rng.integers(0, 4, n)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mlp_on_rank_slices_equals_one_process_on_global_batch(comm, wrap, device, transport):
    _check_equivalence(comm, wrap, _mlp, 3, _mlp_batch, global_batch=12, device=device,
                       transport=_transport_or_skip(transport, device), bucket_mb=0.001, first_bucket_mb=0.0005)


def test_adam_on_rank_slices_equals_one_process_on_global_batch(comm, wrap, device):
    _check_equivalence(comm, wrap, _mlp, 4, _mlp_batch, global_batch=24, device=device,
                       make_optimizer=lambda params: optim.Adam(params, lr=0.01))


def test_wrapping_gives_every_rank_rank_0s_parameters_and_buffers(comm, wrap):
    dp.manual_seed(50 + comm.rank)  # every rank its own initial weights ...
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    _perturb_buffers(net, comm.rank + 1)  # ... and statistics
    before = {name: to_numpy(value).copy() for name, value in net.state_dict().items()}
    rank0 = comm.bcast_object(before, root=0)
    differ = comm.rank == 0 or any(not np.array_equal(before[k], rank0[k]) for k in before)
    agree(comm, differ, "the ranks built identical models: the test would prove nothing")
    arrays = [p.data for p in net.parameters()]
    wrap(net)
    after = {name: to_numpy(value) for name, value in net.state_dict().items()}
    same = sorted(after) == sorted(rank0) and all(np.array_equal(after[k], rank0[k]) and after[k].dtype == rank0[k].dtype
                                                  for k in rank0)
    agree(comm, same and all(p.data is a for p, a in zip(net.parameters(), arrays)),
          "after wrapping, parameters or buffers differ from rank 0's (or were replaced, not overwritten)")


def test_replicas_stay_bitwise_identical_for_50_steps(comm, wrap):
    dp.manual_seed(100 + comm.rank)  # different initial weights: rank 0's are broadcast
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    model = wrap(net)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(comm.rank)  # different data on every rank
    for _ in range(50):
        x = rng.standard_normal((16, 8)).astype(np.float32)
        y = rng.integers(0, 3, 16)
        opt.zero_grad()
        F.cross_entropy(model(dp.tensor(x)), y).backward()
        opt.step()
    model.check_replicas()


def test_check_replicas_names_the_ranks_that_diverged(comm, wrap):
    net = nn.Sequential(nn.Linear(3, 2))
    model = wrap(net)
    model.check_replicas()  # identical right after wrapping
    if comm.rank == comm.size - 1:
        net[0].bias.data[0] += 1e-7
    with pytest.raises(ModelMismatchError, match=rf"ranks \[{comm.size - 1}\] hold parameters or buffers"):
        model.check_replicas()


def test_mismatched_models_raise_on_every_rank(comm):
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

    net = _mlp(5 + comm.rank)  # rank 0's weights are broadcast
    model = DataParallel(net, comm, reproducible=True, micro_shards=micro_shards)
    share = 24 // comm.size
    mine = slice(comm.rank * share, (comm.rank + 1) * share)
    loss = model.reproducible_backward(loss_fn, x[mine], y[mine])
    identical = all(np.array_equal(p.grad, q.grad) for p, q in zip(net.parameters(), single_net.parameters()))
    agree(comm, identical and loss == single_loss, "reproducible gradients differ from one rank's")


def test_reproducible_backward_first_gives_every_rank_rank_0s_buffers(comm):
    from distprop.parallel import SingleProcessCommunicator

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.register_buffer("shift", np.zeros(2))

        def forward(self, x):
            return self.linear(x) + dp.tensor(self.shift)

    def loss_fn(module, xb):
        return (module(dp.tensor(xb)) ** 2).mean()

    x = np.random.default_rng(3).standard_normal((12, 3))
    dp.manual_seed(0)
    reference = Shifted()
    reference.shift[...] = 1.0
    expected = DataParallel(reference, SingleProcessCommunicator(), reproducible=True, micro_shards=12
                            ).reproducible_backward(loss_fn, x)
    dp.manual_seed(comm.rank)
    net = Shifted()
    model = DataParallel(net, comm, reproducible=True, micro_shards=12)
    net.shift[...] = comm.rank + 1  # replicas drift apart between steps ...
    share = 12 // comm.size
    loss = model.reproducible_backward(loss_fn, x[comm.rank * share:(comm.rank + 1) * share])
    agree(comm, np.all(net.shift == 1.0) and loss == expected, f"shift {net.shift}, loss {loss} != {expected}")


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


def _cnn(seed, sync=True):
    from distprop.parallel import SyncBatchNorm

    dp.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net = SyncBatchNorm.convert_sync_batchnorm(net) if sync else net
    return net.to(dtype=np.float64)


def test_cnn_with_sync_batchnorm_on_rank_slices_equals_one_process(comm, wrap, device):
    def batch(rng, n):
        return rng.standard_normal((n, 2, 8, 8)) * 3 + 1, rng.integers(0, 3, n)

    # The reference's batch norm is the plain one: it sees the whole batch by itself.
    _check_equivalence(comm, wrap, _cnn, 9, batch, global_batch=12, device=device,
                       make_reference=lambda seed: _cnn(seed, sync=False))


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
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].weight.requires_grad = comm.rank == 0  # the buckets would differ: a hang or wrong means
    with pytest.raises(ModelMismatchError, match="'0.weight' with requires_grad=False, rank 0 with True"):
        DataParallel(net, comm)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_frozen_zero_size_and_mixed_dtype_parameters(comm, wrap, transport):
    bag = ParamBag([(3,), (0,), (4,), (2, 0), (5,)], np.float64)
    bag.p2.data = bag.p2.data.astype(np.float32)
    bag.p4.requires_grad = False
    model = wrap(bag, bucket_mb=1, transport=transport)
    for _ in range(2):
        bag.zero_grad()
        model(float(comm.rank)).backward()
        p0, p1, p2, p3, p4 = bag.parameters()
        expected = (comm.size - 1) / 2
        ok = (p4.grad is None and p2.grad.dtype == np.float32 and p1.grad.shape == (0,)
              and p3.grad.shape == (2, 0) and np.all(p0.grad == expected) and np.all(p2.grad == expected))
        agree(comm, ok, f"grads {[None if p.grad is None else (p.grad.dtype, p.grad) for p in bag.parameters()]}")


def test_a_model_cast_after_wrapping_fails_clearly(comm, wrap):
    net = nn.Sequential(nn.Linear(4, 3))
    model = wrap(net, transport="thread")
    net.to(np.float64)  # its gradient buffers were laid out for float32
    with pytest.raises(RuntimeError, match=r"^DataParallel: parameter '0.(weight|bias)' is now float64 \(\d+(, 4)?\) on "
                                           r"cpu, but was float32 \(\d+(, 4)?\) on cpu when the model was wrapped; "
                                           r"move or cast the model before wrapping it$"):
        model(dp.tensor(np.ones((2, 4)))).sum().backward()


def test_namedtuple_outputs_keep_their_type(comm, wrap):
    import collections

    Out = collections.namedtuple("Out", "logits doubled")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return Out(y, y * 2)

    model = wrap(Two())
    out = model(dp.tensor(np.ones((2, 3), np.float32)))
    agree(comm, isinstance(out, Out), f"got {type(out).__name__}")
    (out.logits.sum() + out.doubled.sum()).backward()


def test_iallreduce_keeps_no_completed_requests_between_steps(comm, wrap):
    bag = ParamBag([(3,)] * 4, np.float64)
    model = wrap(bag, bucket_mb=1e-5, first_bucket_mb=1e-5, transport="iallreduce")
    for _ in range(10):
        model(1.0).backward()
    pending = len(model.reducer.transport._pending)
    agree(comm, pending <= len(model.reducer.buckets), f"{pending} requests kept after 10 steps")


def test_closing_one_of_two_wrappers_leaves_the_other_working(comm, wrap):
    bag = ParamBag([(3,), (4,)], np.float64)
    first, second = wrap(bag, transport="thread"), wrap(bag, transport="thread")
    first.close()
    bag.zero_grad()
    second(float(comm.rank)).backward()
    expected = (comm.size - 1) / 2
    ok = all(np.all(p.grad == expected) for p in bag.parameters())
    ok = ok and all(p.grad_buffer is not None for p in bag.parameters())  # its buckets still receive them
    agree(comm, ok, f"grads {[p.grad for p in bag.parameters()]}")


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


def test_shared_memory_that_cannot_be_had_fails_everywhere_or_falls_back(comm, wrap, monkeypatch, capfd):
    if comm.local_size == 1:
        pytest.skip("platform: needs ranks that share a node")
    from distprop.parallel import shm

    monkeypatch.setattr(shm, "_reserve", lambda path, nbytes: f"cannot reserve {nbytes} bytes: simulated")
    bag = ParamBag([(3,), (4,)], np.float64)
    with pytest.raises(OSError, match="shared-memory transport: rank 0: cannot reserve .* simulated"):
        DataParallel(bag, comm, transport="shm")
    capfd.readouterr()
    model = wrap(bag)  # chosen automatically: every rank falls back alike, and rank 0 says so
    agree(comm, model.reducer.transport.name == "thread", model.reducer.transport.name)
    said = capfd.readouterr().err
    expected = ("distprop: shared-memory transport: rank 0: cannot reserve " if comm.rank == 0 else "")
    agree(comm, said.startswith(expected) and ("gradients are reduced with transport='thread'" in said) == (comm.rank == 0),
          said)
    model(float(comm.rank)).backward()
    agree(comm, all(np.all(p.grad == (comm.size - 1) / 2) for p in bag.parameters()), "mean")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_backward_that_raised_everywhere_leaves_the_next_step_averaged(comm, wrap, transport):
    from distprop.autograd import Function

    class Fails(Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            raise FloatingPointError("deliberate, on every rank")

    bag = ParamBag([(3,), (4,), (5,)], np.float64)
    model = wrap(bag, bucket_mb=1e-5, first_bucket_mb=1e-5, transport=transport)
    p0, p1, p2 = bag.parameters()
    started = []
    reducing = model.reducer.transport
    start = reducing.start
    reducing.start = lambda bucket: started.append(bucket.index) or start(bucket)
    out = model(1.0, use={1, 2})
    with pytest.raises(FloatingPointError):
        # The walk goes depth first from the last input: the model's branch runs
        # first, so the buckets of p2 and p1 start before the failure on p0's path.
        (Fails()((p0 * 1.0).sum()) + out).backward()
    agree(comm, started == [0, 1], f"buckets started before the failure: {started}")
    bag.zero_grad()
    model(float(comm.rank)).backward()
    expected = (comm.size - 1) / 2
    agree(comm, all(np.all(p.grad == expected) for p in bag.parameters()),
          f"grads after a failed pass {[p.grad for p in bag.parameters()]}")


def test_training_forward_gives_every_rank_rank_0s_buffers(comm, wrap):
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.register_buffer("scale", np.zeros(4))
            self.register_buffer("steps", np.zeros((), np.int64))

        def forward(self, x):
            return self.linear(x)

    net = WithBuffers()
    model = wrap(net)
    net.scale[...] = comm.rank + 1  # replicas drift apart between steps ...
    net.steps[...] = 10 * comm.rank
    model(dp.tensor(np.ones((2, 3), np.float32))).sum().backward()  # ... and a training forward realigns them
    ok = np.all(net.scale == 1.0) and int(net.steps) == 0 and net.steps.dtype == np.int64
    agree(comm, ok, f"buffers after forward: {net.scale}, {net.steps}")
    net.scale[...] = comm.rank + 1
    with dp.no_grad():
        model.eval()(dp.tensor(np.ones((2, 3), np.float32)))  # evaluation leaves them alone
    agree(comm, np.all(net.scale == comm.rank + 1), f"an eval forward broadcast the buffers: {net.scale}")


def test_broadcast_buffers_off_leaves_each_rank_its_own(comm, wrap):
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model = wrap(net, broadcast_buffers=False)
    net[1].running_mean[...] = comm.rank
    model(dp.tensor(np.zeros((4, 3), np.float32))).sum().backward()  # zero inputs: the batch mean is the bias
    expected = 0.9 * comm.rank + 0.1 * to_numpy(net[0].bias.data)
    agree(comm, np.allclose(net[1].running_mean, expected, rtol=1e-6), f"running mean {net[1].running_mean}")


def test_collectives_give_what_their_names_say(comm):
    r, n = comm.rank, comm.size
    values = np.array([r, -r, 2 * r + 1], np.float64)
    for op, expected in (("sum", [n * (n - 1) / 2, -n * (n - 1) / 2, n * n]), ("max", [n - 1, 0, 2 * n - 1]),
                         ("min", [0, -(n - 1), 1]), ("mean", [(n - 1) / 2, -(n - 1) / 2, n])):
        reduced = values.copy()
        assert comm.allreduce_(reduced, op) is reduced
        agree(comm, reduced.tolist() == expected, f"allreduce_ {op}: {reduced} != {expected}")
    total = comm.allreduce(10 ** 12 + r)  # Python ints stay exact integers
    agree(comm, total == n * 10 ** 12 + n * (n - 1) // 2 and isinstance(total, int), f"int sum {total!r}")
    agree(comm, comm.allreduce(float(r), "max") == n - 1.0, "float max")
    gathered = comm.allgather(np.array([[r, r * r]], np.int32))
    agree(comm, gathered.shape == (n, 1, 2) and gathered[:, 0, 1].tolist() == [k * k for k in range(n)],
          f"allgather {gathered.tolist()}")
    root = n - 1
    array = np.full(3, float(r))
    comm.bcast_(array, root=root)
    agree(comm, array.tolist() == [root] * 3, f"bcast_ from {root}: {array}")
    agree(comm, comm.bcast_object({"from": r}, root=root) == {"from": root}, "bcast_object")
    agree(comm, comm.allgather_object(r * 10) == [k * 10 for k in range(n)], "allgather_object")
    comm.barrier()


@pytest.mark.parametrize("shape", [(1,), (2, 3), (100_003,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_ring_allreduce_sums_and_leaves_every_rank_the_same_bits(comm, shape, dtype):
    """On any rank count (whether allreduce_ would choose it or not), and on buffers
    shorter than the ranks or not divisible by them."""
    from distprop.parallel.ring import ring_allreduce_

    mine = np.random.default_rng(comm.rank).standard_normal(shape).astype(dtype)
    everyone = comm.allgather(mine)
    reduced = mine.copy()
    assert ring_allreduce_(comm.mpi_comm, reduced) is reduced
    agree(comm, np.allclose(reduced, everyone.sum(axis=0), rtol=1e-5, atol=1e-5), f"ring sum {reduced.ravel()[:4]}")
    copies = comm.allgather(reduced)
    agree(comm, all(np.array_equal(copy, copies[0]) for copy in copies), "ranks hold different bits")


def test_large_sums_take_the_ring_on_rank_counts_that_are_not_powers_of_two(comm, monkeypatch):
    from distprop.parallel import communicator, ring

    taken = []
    ring_allreduce_ = ring.ring_allreduce_
    monkeypatch.setattr(ring, "ring_allreduce_",
                        lambda mpi_comm, array: taken.append(array.nbytes) or ring_allreduce_(mpi_comm, array))
    large = np.full(comm.size * ring.MIN_CHUNK_BYTES // 4, float(comm.rank + 1), np.float32)
    comm.allreduce_(large, "mean")
    comm.allreduce_(np.ones(10, np.float32), "sum")
    comm.allreduce_(np.ones(len(large), np.int32), "sum")
    expected = [large.nbytes] if comm.size >= 3 and comm.size & (comm.size - 1) else []
    agree(comm, taken == expected and np.all(large == (comm.size + 1) / 2), f"ring taken for {taken} bytes")
    monkeypatch.setenv(ring.VARIABLE, "0")  # a communicator made now keeps every sum with MPI
    with_mpi_only = communicator.MPICommunicator(comm.mpi_comm)
    taken.clear()
    with_mpi_only.allreduce_(large, "sum")
    agree(comm, taken == [] and not with_mpi_only.ring and np.all(large == comm.size * (comm.size + 1) / 2),
          f"ring taken for {taken} bytes with ${ring.VARIABLE}=0")


def test_collective_errors_say_what_and_happen_before_any_communication(comm):
    with pytest.raises(ValueError, match=r"^reduction op must be one of \('sum', 'mean', 'max', 'min', 'bf16_sum'\), "
                                         r"got 'avg'$"):
        comm.allreduce_(np.zeros(2), "avg")
    with pytest.raises(ValueError, match=r"^allreduce_ needs a C-contiguous array \(a reduction into a copy "
                                         r"would be lost\)$"):
        comm.allreduce_(np.zeros((3, 4))[:, ::2], "sum")
    with pytest.raises(ValueError, match=r"^bcast_ needs a C-contiguous array$"):
        comm.bcast_(np.zeros((3, 4)).T)
    with pytest.raises(TypeError, match=r"^an in-place 'mean' needs a floating-point array, got int64 "):
        comm.allreduce_(np.array([1, 2]), "mean")
    comm.barrier()  # every rank raised before communicating: nobody is left waiting


def test_a_duplicate_communicator_is_separate_and_freed(comm):
    from mpi4py import MPI

    twin = comm.dup()
    assert (twin.rank, twin.size) == (comm.rank, comm.size) and twin.mpi_comm is not comm.mpi_comm
    value = np.array([1.0])
    twin.allreduce_(value, "sum")
    twin.free()
    twin.free()  # once only
    comm.free()  # the job's own communicator is never freed
    freed = twin.mpi_comm == MPI.COMM_NULL and comm.mpi_comm != MPI.COMM_NULL
    agree(comm, freed and value[0] == comm.size and comm.allreduce(1) == comm.size, "dup/free")
    assert repr(comm) == (f"MPICommunicator(rank={comm.rank}, size={comm.size}, local_rank={comm.local_rank}, "
                          f"local_size={comm.local_size})")


def test_read_only_buffers_are_replaced_by_rank_0s(comm, wrap):
    # e.g. a buffer loaded with np.frombuffer: it cannot be overwritten in place
    bag = ParamBag([(2,)], np.float64)
    table = np.full(3, comm.rank + 1.0)
    table.flags.writeable = False
    bag.register_buffer("table", table)
    wrap(bag)
    agree(comm, np.array_equal(bag.table, [1, 1, 1]) and bag.table is not table, f"{bag.table}")


def test_outputs_in_tuples_lists_and_dicts_are_averaged(comm, wrap):
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return (y, [y * 2], {"z": y * 3})

    net = Nested()
    model = wrap(net)
    y, (doubled,), rest = model(dp.tensor(np.full((2, 3), comm.rank + 1.0, np.float32)))
    (y.sum() + doubled.sum() + rest["z"].sum()).backward()
    # d/dW of 6 * sum(W x + b) over 2 rows of x = rank + 1, averaged over the ranks
    mean = 6 * 2 * (comm.size + 1) / 2
    agree(comm, np.allclose(net.fc.weight.grad, mean) and np.allclose(net.fc.bias.grad, 12),
          f"{net.fc.weight.grad} {net.fc.bias.grad}")


def test_a_reserved_segment_is_its_owners_alone_and_never_reused():
    import os
    import stat
    import tempfile

    from distprop.parallel import shm

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "segment")
        assert shm._reserve(path, 1 << 16) is None
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 1 << 16
        assert shm._reserve(path, 1).startswith(f"cannot create {path}: ")


def test_buffers_that_differ_between_ranks_are_named_as_buffers(comm):
    bag = ParamBag([(2,)], np.float64)
    bag.register_buffer("table", np.zeros(3 if comm.rank == 0 else 4))
    with pytest.raises(ModelMismatchError, match=r"rank 1 has buffer 'table' of shape \(4,\) float64, "
                                                 r"rank 0 has \(3,\) float64"):
        DataParallel(bag, comm)


def test_shared_memory_is_unusable_where_its_size_cannot_be_read(comm, monkeypatch):
    import os

    from distprop.parallel import shm

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    if comm.rank == comm.size - 1:  # one rank alone is enough to rule it out everywhere
        monkeypatch.setattr(os, "statvfs", refused)
    agree(comm, shm.shared_memory_usable(comm, 1) is False, "usable")


def _node_failure(comm, monkeypatch, rank, module, name, error):
    """`module.name` raises `error` on local rank `rank` (a platform skip without ranks that share a node)."""
    if comm.local_size == 1:
        pytest.skip("platform: needs ranks that share a node")

    def refused(*args, **kwargs):
        raise error

    if comm.local_rank == rank:
        monkeypatch.setattr(module, name, refused)


def test_a_rank_that_cannot_map_the_segment_fails_the_shared_memory_transport_everywhere(comm, monkeypatch):
    import mmap
    import re

    from distprop.parallel import shm

    last = comm.local_size - 1
    _node_failure(comm, monkeypatch, last, mmap, "mmap", PermissionError(13, "Permission denied"))
    where = re.escape(shm.SHM_DIR)
    with pytest.raises(OSError, match=rf"^shared-memory transport: rank 0: local rank {last} cannot map "
                                      rf"{where}/distprop-[0-9a-f]+: \[Errno 13\] Permission denied"):
        DataParallel(ParamBag([(3,)], np.float64), comm, transport="shm")


def test_a_node_barrier_that_cannot_be_made_fails_the_shared_memory_transport_everywhere(comm, monkeypatch):
    import os
    import re

    from distprop.parallel import shm

    _node_failure(comm, monkeypatch, 0, os, "mkfifo", OSError(28, "No space left on device"))
    where = re.escape(shm.SHM_DIR)
    with pytest.raises(OSError, match=rf"^shared-memory transport: rank 0: cannot create the node barrier's FIFOs "
                                      rf"in {where}: \[Errno 28\] No space left on device(;|$)"):
        DataParallel(ParamBag([(3,)], np.float64), comm, transport="shm")


def test_compression_with_the_shared_memory_transport_is_refused(comm):
    with pytest.raises(ValueError, match=r"^compression does not apply to transport='shm' \(no wire to narrow\)$"):
        DataParallel(ParamBag([(3,)], np.float32), comm, transport="shm", compression="fp16")
