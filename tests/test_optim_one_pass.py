"""The compiled one-pass updates of SGD, Adam and AdamW (`distprop.optim.update_kernels`)
give bit for bit what the numpy path gives, parameters and state alike, for every
option in float32 and float64; arrays the kernels do not take (non-contiguous, or
small) go the numpy way. The rest of the optimizer tests hold the numpy path to the
published rules and to PyTorch, so both paths are held to the same references."""

import itertools

import numpy as np
import pytest

from distprop import nn, optim
from distprop.optim import optimizer

SHAPES = [(33, 17), (17,), (5,)]

SGD_CONFIGS = [dict(lr=0.1, momentum=m, dampening=d, weight_decay=wd, nesterov=nesterov)
               for m, d, wd, nesterov in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 1e-2), (False, True))
               if not (nesterov and (m == 0 or d != 0))]
ADAM_CONFIGS = [dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad)
                for lr, betas, eps, wd, amsgrad in itertools.product(
                    (1e-3, 0.1), ((0.9, 0.999), (0.5, 0.9)), (1e-8, 0.0), (0.0, 0.1), (False, True))]
CONFIGS = ([("SGD", c) for c in SGD_CONFIGS] + [("Adam", c) for c in ADAM_CONFIGS]
           + [("AdamW", c) for c in ADAM_CONFIGS])


@pytest.fixture(autouse=True)
def _small_parameters_too(monkeypatch):
    monkeypatch.setattr(optimizer, "ONE_PASS_MIN_ELEMENTS", 0)


KERNELS = optimizer.compiled_kernels()


def _use_kernels(monkeypatch, use: bool):
    compiled = KERNELS if use else None
    monkeypatch.setattr(optimizer, "compiled_kernels", lambda: compiled)


def _trajectory(name, kwargs, dtype, grad_view=lambda g: g, steps=5):
    """Parameters and every state array after `steps` steps on gradients of varied
    magnitude (some exactly zero: with eps=0 Adam divides 0 by 0, as numpy does)."""
    rng = np.random.default_rng(1)
    params = [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]
    opt = getattr(optim, name)(params, **kwargs)
    for step in range(steps):
        for p in params:
            grad = (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
            grad[..., :2] = 0 if step == 0 else grad[..., :2]
            p.grad = grad_view(grad)
        opt.step()
    state = [v for entry in opt.state.values() for v in entry.values() if isinstance(v, np.ndarray)]
    return [p.data for p in params] + state


def _bits(arrays):
    return [a.view(np.uint64 if a.dtype == np.float64 else np.uint32) for a in arrays]


def test_the_compiled_kernels_are_used_here(monkeypatch):
    compiled = KERNELS
    assert compiled is not None  # numba is among the test dependencies
    calls = []
    for kernel in ("sgd_update", "adam_update"):
        original = getattr(compiled, kernel)
        monkeypatch.setattr(compiled, kernel, lambda *a, _k=kernel, _f=original: (calls.append(_k), _f(*a)))
    _trajectory("SGD", dict(lr=0.1, momentum=0.9), np.float32, steps=1)
    _trajectory("Adam", dict(lr=0.1), np.float32, steps=1)
    assert calls == ["sgd_update"] * len(SHAPES) + ["adam_update"] * len(SHAPES)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # 0 / 0 with eps=0, as intended
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{sorted(k.items())}" for n, k in CONFIGS])
def test_one_pass_equals_the_numpy_path_bit_for_bit(monkeypatch, name, kwargs, dtype):
    _use_kernels(monkeypatch, False)
    expected = _trajectory(name, kwargs, dtype)
    _use_kernels(monkeypatch, True)
    got = _trajectory(name, kwargs, dtype)
    assert [a.shape for a in got] == [a.shape for a in expected]
    for g, e in zip(_bits(got), _bits(expected)):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.1))])
def test_arrays_the_kernels_do_not_take_go_the_numpy_way(monkeypatch, name, kwargs):
    def strided(grad):  # the same values, not contiguous
        wide = np.zeros(grad.shape + (2,), grad.dtype)
        wide[..., 0] = grad
        return wide[..., 0]

    _use_kernels(monkeypatch, False)
    expected = _trajectory(name, kwargs, np.float32)
    _use_kernels(monkeypatch, True)
    compiled = KERNELS
    for kernel in ("sgd_update", "adam_update"):
        monkeypatch.setattr(compiled, kernel, lambda *a: pytest.fail("a kernel got a non-contiguous gradient"))
    got = _trajectory(name, kwargs, np.float32, grad_view=strided)
    for g, e in zip(_bits(got), _bits(expected)):
        np.testing.assert_array_equal(g, e)


def test_small_parameters_go_the_numpy_way(monkeypatch):
    monkeypatch.setattr(optimizer, "ONE_PASS_MIN_ELEMENTS", 33 * 17)
    compiled = KERNELS
    sizes = []
    monkeypatch.setattr(compiled, "sgd_update", lambda param, *rest, _f=compiled.sgd_update: (
        sizes.append(param.size), _f(param, *rest)))
    _trajectory("SGD", dict(lr=0.1, momentum=0.9), np.float32, steps=1)
    assert sizes == [33 * 17]


def test_a_read_only_parameter_gets_numpys_error(monkeypatch):
    param = nn.Parameter(np.ones((4, 4), np.float32))
    param.data.flags.writeable = False
    param.grad = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="read-only"):
        optim.SGD([param], lr=0.1, momentum=0.9).step()
