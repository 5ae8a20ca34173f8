"""Operands that cannot be multiplied: PyTorch's message (the two shapes), not numpy's
gufunc signature, for nn.Linear, F.linear and matmul."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import nn
from helpers import requires_torch, torch


def message(call):
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("shape", [(2, 9), (3, 2, 9), (9,)])
def test_linear_names_both_shapes(shape):
    layer = nn.Linear(8, 4)
    text = message(lambda: layer(dp.tensor(np.zeros(shape, np.float32))))
    rows = int(np.prod(shape[:-1]))
    assert text.startswith(f"mat1 and mat2 shapes cannot be multiplied ({rows}x9 and 8x4)")
    assert f"input of shape {shape}" in text and "weight of shape (4, 8)" in text and "gufunc" not in text


@requires_torch
@pytest.mark.parametrize("shape", [(2, 9), (3, 2, 9), (9,)])
def test_linear_message_starts_as_pytorchs(shape):
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.Linear(8, 4)(torch.zeros(shape))
    ours = message(lambda: F.linear(dp.tensor(np.zeros(shape, np.float32)), np.zeros((4, 8), np.float32)))
    assert ours.startswith(str(theirs.value))


@pytest.mark.parametrize("a, b, expected", [
    ((2, 9), (8, 4), "mat1 and mat2 shapes cannot be multiplied (2x9 and 8x4)"),
    ((3, 2, 9), (3, 8, 4), "mat1 and mat2 shapes cannot be multiplied (3x2x9 and 3x8x4)"),
    ((2, 9), (8,), "mat1 and mat2 shapes cannot be multiplied (2x9 and 8)"),
    ((9,), (8,), "mat1 and mat2 shapes cannot be multiplied (9 and 8)"),
    ((3, 2, 9), (2, 9, 4), "matmul: batch dimensions (3,) and (2,) cannot be broadcast together"),
    ((), (8,), "matmul: both arguments need at least one dimension"),
])
def test_matmul_names_both_shapes(a, b, expected):
    text = message(lambda: F.matmul(dp.tensor(np.zeros(a)), dp.tensor(np.zeros(b))))
    assert text.startswith(expected) and "gufunc" not in text
    assert message(lambda: dp.tensor(np.zeros(a)) @ dp.tensor(np.zeros(b))) == text


@pytest.mark.parametrize("a, b", [((2, 9), (9, 4)), ((3, 2, 9), (9, 4)), ((9,), (9,)), ((1, 2, 9), (3, 9, 4))])
def test_matmul_of_fitting_shapes_still_works(a, b):
    assert F.matmul(dp.tensor(np.ones(a)), dp.tensor(np.ones(b))).shape == np.matmul(np.ones(a), np.ones(b)).shape
