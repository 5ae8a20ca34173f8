"""Layers against PyTorch: forward, input and parameter gradients in float64; init."""

import math

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from distprop.backend import to_device, to_numpy
from helpers import requires_torch, torch
from module_parity import compare_module

def images(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# (our layer, the same torch layer, input shape): built lazily so that the module
# imports without torch.
LAYERS = {
    "linear": (lambda m: m.Linear(5, 4), (3, 5)),
    "linear-3d-input": (lambda m: m.Linear(5, 4), (2, 3, 5)),
    "linear-no-bias": (lambda m: m.Linear(5, 4, bias=False), (3, 5)),
    "conv": (lambda m: m.Conv2d(3, 4, 3), (2, 3, 7, 6)),
    "conv-stride-padding": (lambda m: m.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6)),
    "conv-rectangular": (lambda m: m.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 2, 6, 5)),
    "conv-dilation-groups": (lambda m: m.Conv2d(4, 6, 3, dilation=2, groups=2, bias=False), (2, 4, 8, 8)),
    "conv-same": (lambda m: m.Conv2d(3, 2, 4, padding="same"), (2, 3, 6, 6)),
    "maxpool": (lambda m: m.MaxPool2d(2), (2, 3, 6, 6)),
    "maxpool-overlap-padding": (lambda m: m.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6)),
    "avgpool": (lambda m: m.AvgPool2d(2), (2, 3, 6, 6)),
    "avgpool-padding": (lambda m: m.AvgPool2d(3, stride=2, padding=1), (2, 3, 7, 6)),
    "avgpool-exclude-padding": (lambda m: m.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                                (2, 3, 7, 6)),
    "adaptive-avgpool": (lambda m: m.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 8)),
    "adaptive-avgpool-global": (lambda m: m.AdaptiveAvgPool2d(1), (2, 3, 5, 5)),
    "relu": (lambda m: m.ReLU(), (4, 5)),
    "leaky-relu": (lambda m: m.LeakyReLU(0.2), (4, 5)),
    "gelu": (lambda m: m.GELU(), (4, 5)),
    "gelu-tanh": (lambda m: m.GELU(approximate="tanh"), (4, 5)),
    "tanh": (lambda m: m.Tanh(), (4, 5)),
    "sigmoid": (lambda m: m.Sigmoid(), (4, 5)),
    "softmax": (lambda m: m.Softmax(dim=1), (3, 4, 5)),
    "log-softmax": (lambda m: m.LogSoftmax(dim=-1), (3, 4, 5)),
    "flatten": (lambda m: m.Flatten(), (2, 3, 4, 5)),
    "flatten-range": (lambda m: m.Flatten(0, 2), (2, 3, 4, 5)),
    "identity": (lambda m: m.Identity(), (2, 3)),
    "sequential": (lambda m: m.Sequential(m.Conv2d(2, 3, 3, padding=1), m.ReLU(), m.MaxPool2d(2),
                                          m.Flatten(), m.Linear(12, 4)), (2, 2, 4, 4)),
}


@requires_torch
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_pytorch(name, device):
    build, shape = LAYERS[name]
    compare_module(build(nn), build(torch.nn), images(*shape), device=device)


@requires_torch
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_embedding_matches_pytorch(padding_idx, device):
    indices = np.array([[0, 3, 9, 3], [9, 9, 1, 0]])  # repeats accumulate; padding rows get nothing
    compare_module(nn.Embedding(10, 4, padding_idx=padding_idx), torch.nn.Embedding(10, 4, padding_idx=padding_idx),
                   indices, device=device)


def test_embedding_init_is_standard_normal_with_a_zero_padding_row():
    layer = nn.Embedding(20_000, 8, padding_idx=-2)
    weights = np.delete(layer.weight.data, 19_998, axis=0).astype(np.float64)
    assert layer.padding_idx == 19_998 and not layer.weight.data[19_998].any() and np.all(weights != 0)
    # N(0, 1): 160k draws put the sample mean within 0.0125 and the std within 1% (both about 5 sigma)
    assert abs(weights.mean()) < 0.0125 and abs(weights.std() - 1) < 0.01
    assert abs(np.mean(np.abs(weights) < 1) - 0.6827) < 0.006  # the share within one sigma, as a normal's
    with pytest.raises(ValueError, match="padding_idx"):
        nn.Embedding(5, 2, padding_idx=5)


def test_dropout_eval_and_p0_are_the_identity(device):
    x = dp.tensor(to_device(images(4, 5), device))
    layer = nn.Dropout(0.5)
    assert layer.eval()(x) is x
    assert nn.Dropout(0.0)(x) is x
    with pytest.raises(ValueError, match="probability"):
        nn.Dropout(1.5)


def test_dropout_in_training_drops_and_rescales(device):
    dp.random.manual_seed(0)
    p = 0.3
    x = dp.tensor(to_device(np.ones((200, 500)), device), requires_grad=True)
    y = nn.Dropout(p)(x)
    values = to_numpy(y.data)
    assert abs((values == 0).mean() - p) < 0.01
    np.testing.assert_allclose(values[values != 0], 1 / (1 - p))
    y.backward(to_device(np.ones(values.shape), device))
    np.testing.assert_array_equal(to_numpy(x.grad), values)  # the same mask, the same scale


def test_default_init_matches_pytorchs_distributions():
    dp.random.manual_seed(0)
    linear = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for array in (linear.weight.data, linear.bias.data):
        assert array.dtype == np.float32
        assert -bound <= array.min() < -0.95 * bound and 0.95 * bound < array.max() <= bound
    np.testing.assert_allclose(linear.weight.data.std(), bound / math.sqrt(3), rtol=0.02)
    conv = nn.Conv2d(8, 16, 3)
    bound = 1 / math.sqrt(8 * 9)
    assert -bound <= conv.weight.data.min() and conv.weight.data.max() <= bound
    np.testing.assert_allclose(conv.weight.data.std(), bound / math.sqrt(3), rtol=0.05)
    norm = nn.BatchNorm2d(4)
    assert (norm.weight.data == 1).all() and (norm.bias.data == 0).all()


def test_initialisers():
    dp.random.manual_seed(1)
    w = nn.Parameter(np.zeros((256, 128, 3, 3)))
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    np.testing.assert_allclose(w.data.std(), math.sqrt(2 / (256 * 9)), rtol=0.01)
    nn.init.kaiming_normal_(w)  # fan_in, leaky_relu with a=0
    np.testing.assert_allclose(w.data.std(), math.sqrt(2 / (128 * 9)), rtol=0.01)
    nn.init.xavier_uniform_(w, gain=2.0)
    bound = 2.0 * math.sqrt(6 / (128 * 9 + 256 * 9))
    assert -bound <= w.data.min() < -0.99 * bound and 0.99 * bound < w.data.max() <= bound
    assert nn.init.zeros_(w) is w and not w.data.any()
    nn.init.ones_(w)
    assert (w.data == 1).all()
    assert nn.init.calculate_gain("tanh") == 5 / 3
    assert nn.init.calculate_gain("leaky_relu", 0.2) == math.sqrt(2 / 1.04)
    with pytest.raises(ValueError, match="2 dimensions"):
        nn.init.xavier_uniform_(nn.Parameter(np.zeros(3)))
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.init.calculate_gain("swish")


def test_layers_keep_float32_and_a_given_dtype():
    x = dp.tensor(images(2, 3, 5, 5).astype(np.float32))
    assert nn.Conv2d(3, 2, 3)(x).dtype == np.float32
    layer = nn.Conv2d(3, 2, 3, dtype=np.float64)
    assert layer.weight.dtype == layer.bias.dtype == np.float64
