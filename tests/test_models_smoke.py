"""Ready models: shapes, finite gradients, a directional gradient check of every
parameter in float64, and PyTorch parity where the architecture is easy to rebuild."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import nn
from distprop.backend import to_device, to_numpy
from helpers import requires_torch, torch
from module_parity import compare_module

MODELS = {
    "mlp": (lambda: nn.MLP(64, [16, 12], 10, activation=nn.Tanh), lambda rng: rng.standard_normal((4, 8, 8))),
    "mlp-dropout": (lambda: nn.MLP(10, [8], 3, dropout=0.5), lambda rng: rng.standard_normal((4, 10))),
    "lenet-28x28": (lambda: nn.LeNet(10), lambda rng: rng.standard_normal((2, 1, 28, 28))),
    "lenet-8x8": (lambda: nn.LeNet(10, input_size=8, channels=(4, 6), hidden_sizes=(12,)),
                  lambda rng: rng.standard_normal((3, 1, 8, 8))),
    "lenet-rgb-rectangular": (lambda: nn.LeNet(5, in_channels=3, input_size=(16, 12)),
                              lambda rng: rng.standard_normal((2, 3, 16, 12))),
    "resnet": (lambda: nn.resnet_small(4, in_channels=3, widths=(4, 8), blocks_per_stage=(1, 2)),
               lambda rng: rng.standard_normal((3, 3, 8, 8))),
    "transformer-tokens": (lambda: nn.TransformerClassifier(3, d_model=8, nhead=2, num_layers=2, dim_feedforward=16,
                                                            max_len=6, dropout=0.0, vocab_size=11, padding_idx=0),
                           lambda rng: np.array([[4, 2, 7, 0, 0], [1, 3, 9, 10, 5], [6, 6, 0, 0, 0]])),
    "transformer-features": (lambda: nn.TransformerClassifier(4, d_model=8, nhead=2, num_layers=1, dim_feedforward=16,
                                                              max_len=8, dropout=0.0, input_dim=8),
                             lambda rng: rng.standard_normal((3, 8, 8))),
}


def _loss(model, x, targets):
    return F.cross_entropy(model(x), targets)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_shapes_and_finite_gradients(name, device, rng):
    dp.random.manual_seed(0)
    build, inputs = MODELS[name]
    model = build().to(device=device)
    x = inputs(rng)
    x = dp.tensor(to_device(x.astype(np.float32) if x.dtype.kind == "f" else x, device))
    logits = model(x)
    classes = logits.shape[1]
    assert logits.shape == (x.shape[0], classes) and logits.dtype == np.float32
    F.cross_entropy(logits, to_device(np.arange(x.shape[0]) % classes, device)).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.shape == param.shape, param_name
        assert np.isfinite(to_numpy(param.grad)).all(), param_name
    model.eval()
    with dp.no_grad():
        assert model(x).shape == logits.shape


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if "dropout" not in n])
def test_parameter_gradients_match_central_differences(name, rng):
    """<grad, v> against (L(theta + eps v) - L(theta - eps v)) / 2 eps along a random
    direction v over all parameters at once (batch norm in training mode included)."""
    dp.random.manual_seed(1)
    build, inputs = MODELS[name]
    model = build().to(dtype=np.float64)
    x = inputs(rng)
    targets = np.arange(x.shape[0]) % 3
    x = dp.tensor(x)
    buffers = {k: v.copy() for k, v in model.state_dict().items()}
    _loss(model, x, targets).backward()
    params = list(model.parameters())
    directions = [rng.standard_normal(p.shape) for p in params]
    analytic = sum(float(np.sum(p.grad * v)) for p, v in zip(params, directions))

    def loss_at(sign, eps=1e-6):
        model.load_state_dict(buffers)  # the same running statistics for every evaluation
        for p, v in zip(params, directions):
            p.data += sign * eps * v
        with dp.no_grad():
            value = float(_loss(model, x, targets).data)
        model.load_state_dict(buffers)
        return value

    numeric = (loss_at(1) - loss_at(-1)) / 2e-6
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@requires_torch
def test_mlp_matches_the_same_torch_sequential(rng):
    ours = nn.MLP(64, [16, 12], 10, activation=nn.Tanh)
    theirs = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                 torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10))
    compare_module(ours, theirs, rng.standard_normal((4, 8, 8)))


@requires_torch
@pytest.mark.parametrize("input_size", [28, 8])
def test_lenet_matches_the_same_torch_network(input_size, rng):
    class TorchLeNet(torch.nn.Module):
        def __init__(self, second_padding, features):
            super().__init__()
            t = torch.nn
            self.features = t.Sequential(t.Conv2d(1, 6, 5, padding=2), t.ReLU(), t.MaxPool2d(2),
                                         t.Conv2d(6, 16, 5, padding=second_padding), t.ReLU(), t.MaxPool2d(2))
            self.classifier = t.Sequential(t.Flatten(), t.Linear(features, 120), t.ReLU(), t.Linear(120, 84),
                                           t.ReLU(), t.Linear(84, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    theirs = TorchLeNet(0, 16 * 5 * 5) if input_size == 28 else TorchLeNet(2, 16 * 2 * 2)
    compare_module(nn.LeNet(10, input_size=input_size), theirs, rng.standard_normal((2, 1, input_size, input_size)))


def test_resnet_structure_and_zero_init_residual():
    model = nn.resnet_small(10, widths=(16, 32, 64), blocks_per_stage=3)  # ResNet-20
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 3 * 2 + 2  # stem, two per block, two projections
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "stages.1.0.downsample.0.weight" in names and "stages.0.0.downsample.0.weight" not in names
    zero = nn.resnet_small(10, zero_init_residual=True)
    blocks = [m for m in zero.modules() if isinstance(m, nn.models.BasicBlock)]
    assert all(not b.bn2.weight.data.any() for b in blocks) and all(b.bn1.weight.data.all() for b in blocks)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        nn.TransformerClassifier(3, vocab_size=5, input_dim=4)
    with pytest.raises(ValueError, match="too small"):
        nn.LeNet(10, input_size=3)
    model = nn.TransformerClassifier(3, d_model=8, nhead=2, max_len=4, input_dim=2)
    with pytest.raises(ValueError, match="max_len"):
        model(dp.tensor(np.zeros((1, 5, 2), np.float32)))
