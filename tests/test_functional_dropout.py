"""Inverted dropout: identity in evaluation, seedable masks, mask statistics."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import random
from distprop.backend import to_device, to_numpy


def _tensor(device, shape=(200, 300), requires_grad=True):
    return dp.tensor(to_device(np.ones(shape, np.float32), device), requires_grad=requires_grad)


def test_identity_when_not_training_or_p_is_zero(device):
    x = _tensor(device)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, training=True) is x


def test_same_seed_same_mask(device):
    x = _tensor(device)
    a = F.dropout(x, 0.3, generator=np.random.default_rng(7)).data
    b = F.dropout(x, 0.3, generator=np.random.default_rng(7)).data
    c = F.dropout(x, 0.3, generator=np.random.default_rng(8)).data
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert np.any(to_numpy(a) != to_numpy(c))
    random.manual_seed(3)
    d = F.dropout(x, 0.3).data
    random.manual_seed(3)
    np.testing.assert_array_equal(to_numpy(d), to_numpy(F.dropout(x, 0.3).data))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_statistics_and_scale(device, p):
    x = _tensor(device)
    y = to_numpy(F.dropout(x, p, generator=np.random.default_rng(0)).data)
    kept = y != 0
    n = kept.size
    # the kept fraction is binomial: 5 standard deviations is a generous bound
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
    assert abs(y.mean() - 1) < 5 * np.sqrt(p / (1 - p) / n)  # inverted dropout keeps the mean
    assert y.dtype == np.float32


def test_gradient_is_the_scaled_mask(device):
    x = _tensor(device, (50, 40))
    y = F.dropout(x * 3, 0.4, generator=np.random.default_rng(1))
    y.backward(to_device(np.ones(y.shape, np.float32), device))
    mask = to_numpy(y.data) != 0
    np.testing.assert_allclose(to_numpy(x.grad), mask * 3 / 0.6, rtol=1e-6)


def test_p_one_drops_everything(device):
    x = _tensor(device, (10, 10))
    y = F.dropout(x, 1.0)
    y.sum().backward()
    assert not np.any(to_numpy(y.data)) and not np.any(to_numpy(x.grad))


def test_rejects_probabilities_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.dropout(dp.tensor(np.ones(3)), 1.5)


class _Draws:
    """A generator that hands out given uniform draws, to test the mask's edges."""

    def __init__(self, draws):
        self.draws = np.asarray(draws, np.float64)

    def random(self, shape):
        return self.draws.reshape(shape).copy()


def test_an_element_is_kept_when_its_draw_is_at_least_p():
    p = 0.3
    draws = [p - 1e-12, p, p + 1e-12, 0.0, 0.999]  # compared in x's float64, not rounded to float32
    x = dp.tensor(np.arange(1.0, 6.0), requires_grad=True)
    y = F.dropout(x, p, generator=_Draws(draws))
    np.testing.assert_allclose(y.data, [0, 2, 3, 0, 5] / np.float64(0.7), rtol=1e-15)
    y.backward(np.ones(5))
    np.testing.assert_allclose(x.grad, [0, 1, 1, 0, 1] / np.float64(0.7), rtol=1e-15)
    assert F.dropout(dp.tensor(np.ones(3, np.float32)), p, generator=_Draws([0.5] * 3)).dtype == np.float32


def test_p_of_one_drops_everything():
    x = dp.tensor(np.arange(1.0, 5.0), requires_grad=True)
    y = F.dropout(x, 1.0, generator=_Draws([0.0, 0.5, 0.9, 0.999]))
    np.testing.assert_array_equal(y.data, np.zeros(4))
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.zeros(4))
    with pytest.raises(ValueError, match=r"^dropout probability must be in \[0, 1\], got 1.5$"):
        F.dropout(x, 1.5)


def test_the_default_probability_is_one_half():
    x = dp.tensor(np.ones(4))
    y = F.dropout(x, generator=_Draws([0.49, 0.5, 0.51, 0.1]))
    np.testing.assert_array_equal(y.data, [0, 2, 2, 0])
