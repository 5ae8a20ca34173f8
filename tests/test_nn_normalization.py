"""BatchNorm1d/2d (train, eval, running statistics) and LayerNorm against PyTorch."""

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from helpers import assert_close, requires_torch, torch
from module_parity import compare_module

def data(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5


def fill_uniform(tensor, low, high, seed):
    """Non-trivial values for a torch parameter or buffer, drawn by numpy (torch's own
    generator would make them depend on the tests that ran before)."""
    tensor.copy_(torch.tensor(np.random.default_rng(seed).uniform(low, high, tuple(tensor.shape))))


BATCH_NORMS = {
    "1d": (lambda m, **k: m.BatchNorm1d(4, **k), (8, 4)),
    "1d-sequence": (lambda m, **k: m.BatchNorm1d(4, **k), (8, 4, 5)),
    "2d": (lambda m, **k: m.BatchNorm2d(3, **k), (4, 3, 5, 5)),
}
OPTIONS = [dict(), dict(momentum=0.3, eps=1e-3), dict(affine=False), dict(track_running_stats=False),
           dict(momentum=None)]


@requires_torch
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("kind", sorted(BATCH_NORMS))
def test_batch_norm_matches_pytorch(kind, options, training, device):
    build, shape = BATCH_NORMS[kind]
    ours, theirs = build(nn, **options), build(torch.nn, **options)
    with torch.no_grad():  # non-trivial values everywhere
        if options.get("track_running_stats", True):
            fill_uniform(theirs.running_mean, -1, 1, seed=1)
            fill_uniform(theirs.running_var, 0.5, 2, seed=2)
        if options.get("affine", True):
            fill_uniform(theirs.weight, 0.5, 1.5, seed=3)
            fill_uniform(theirs.bias, -1, 1, seed=4)
    compare_module(ours, theirs, data(*shape), training=training, device=device)


@requires_torch
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_over_several_batches(momentum):
    ours, theirs = nn.BatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    ours.to(dtype=np.float64)
    theirs.double()
    for step in range(4):
        x = data(6, 3, 4, 4, seed=step)
        ours(dp.tensor(x))
        theirs(torch.tensor(x))
    for name, buffer in ours.named_buffers():
        assert_close(buffer, dict(theirs.named_buffers())[name].numpy(), what=name)
    assert int(ours.num_batches_tracked) == 4
    ours.eval()
    x = data(2, 3, 4, 4, seed=10)
    assert_close(ours(dp.tensor(x)).data, theirs.eval()(torch.tensor(x)).detach().numpy(), what="eval output")
    ours.reset_running_stats()
    assert not ours.running_mean.any() and (ours.running_var == 1).all() and int(ours.num_batches_tracked) == 0


def test_batch_norm_state_dict_keys_and_shape_checks():
    norm = nn.BatchNorm2d(5)
    assert list(norm.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(nn.BatchNorm1d(5, affine=False, track_running_stats=False).state_dict()) == []
    with pytest.raises(ValueError, match="4-d"):
        norm(dp.tensor(np.ones((2, 5))))
    with pytest.raises(ValueError, match="2-d or 3-d"):
        nn.BatchNorm1d(5)(dp.tensor(np.ones((2, 5, 1, 1))))


LAYER_NORMS = {
    "last-axis": (lambda m: m.LayerNorm(6), (3, 4, 6)),
    "two-axes": (lambda m: m.LayerNorm((4, 6), eps=1e-3), (3, 4, 6)),
    "no-affine": (lambda m: m.LayerNorm(6, elementwise_affine=False), (3, 6)),
    "no-bias": (lambda m: m.LayerNorm(6, bias=False), (3, 6)),
}


@requires_torch
@pytest.mark.parametrize("name", sorted(LAYER_NORMS))
def test_layer_norm_matches_pytorch(name, device):
    build, shape = LAYER_NORMS[name]
    ours, theirs = build(nn), build(torch.nn)
    if theirs.weight is not None:  # non-trivial affine parameters
        with torch.no_grad():
            fill_uniform(theirs.weight, 0.5, 1.5, seed=3)
            if theirs.bias is not None:
                fill_uniform(theirs.bias, -1, 1, seed=4)
    compare_module(ours, theirs, data(*shape), device=device)
