"""+ - * / ** @ and negation: gradients against finite differences and PyTorch."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

BROADCASTING = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
FAST = settings(max_examples=20, deadline=None)


def _operands(shapes, seed, positive_b=False):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes.input_shapes)
    if positive_b:  # keep divisors away from zero
        b = np.sign(b + 0.1) * (0.5 + np.abs(b))
    return a, b


BINARY = {
    "add": (lambda a, b: a + b, False),
    "sub": (lambda a, b: a - b, False),
    "mul": (lambda a, b: a * b, False),
    "div": (lambda a, b: a / b, True),
}


@pytest.mark.parametrize("name", BINARY)
@FAST
@given(shapes=BROADCASTING, seed=st.integers(0, 2**16))
def test_binary_op_gradients(device, name, shapes, seed):
    op, away_from_zero = BINARY[name]
    check_grad(op, *_operands(shapes, seed, away_from_zero), device=device)


@requires_torch
@pytest.mark.parametrize("name", BINARY)
@FAST
@given(shapes=BROADCASTING, seed=st.integers(0, 2**16))
def test_binary_op_matches_torch(device, name, shapes, seed):
    op, away_from_zero = BINARY[name]
    compare_with_torch(op, op, *_operands(shapes, seed, away_from_zero), device=device)


@requires_torch
def test_functional_names_match_operators(device):
    a, b = np.random.default_rng(0).standard_normal((2, 3, 4))
    for ours, theirs in [(F.add, torch.add), (F.sub, torch.sub), (F.mul, torch.mul), (F.div, torch.div)]:
        compare_with_torch(ours, theirs, a, b, device=device)
    compare_with_torch(F.neg, torch.neg, a, device=device)
    compare_with_torch(lambda x: -x, lambda x: -x, a, device=device)


@requires_torch
@pytest.mark.parametrize("expression", [
    lambda x: x + 2, lambda x: 2 + x, lambda x: 2 - x, lambda x: x - 2.5, lambda x: 3 * x,
    lambda x: x / 4, lambda x: 3 / x, lambda x: x ** 2, lambda x: x ** 3, lambda x: x ** -1,
    lambda x: x ** 0.5, lambda x: x ** 0, lambda x: 2 ** x, lambda x: 0.5 ** x,
])
def test_python_scalars_on_either_side(device, expression):
    x = np.random.default_rng(1).random((3, 4)) + 0.5
    compare_with_torch(expression, expression, x, device=device)


def test_python_scalar_keeps_float32():
    x = dp.tensor(np.ones(3, np.float32), requires_grad=True)
    for y in (x + 2, 2 * x, x / 3.0, x ** 2, 2 ** x, 1 - x):
        assert y.dtype == np.float32


@requires_torch
@FAST
@given(shapes=BROADCASTING, seed=st.integers(0, 2**16))
def test_pow_tensor_exponent_matches_torch(device, shapes, seed):
    a, b = _operands(shapes, seed)
    compare_with_torch(lambda x, y: x ** y, lambda x, y: x ** y, np.abs(a) + 0.5, b, device=device)


@FAST
@given(shapes=BROADCASTING, seed=st.integers(0, 2**16))
def test_pow_tensor_exponent_gradients(device, shapes, seed):
    a, b = _operands(shapes, seed)
    check_grad(lambda x, y: x ** y, np.abs(a) + 0.5, b, device=device)


@requires_torch
def test_pow_singular_points_follow_torch(device):
    # a == 0 or b == 0: d/da is 0 where b == 0 and d/db is 0 where a == 0.
    a = np.array([0.0, 0.0, 2.0, 3.0, 0.0])
    b = np.array([0.0, 2.0, 0.0, 1.5, 1.0])
    compare_with_torch(lambda x, y: x ** y, lambda x, y: x ** y, a, b, device=device)
    compare_with_torch(lambda x: x ** 0, lambda x: x ** 0, a, device=device)
    compare_with_torch(lambda x: x ** 2, lambda x: x ** 2, a, device=device)


MATMUL_SHAPES = [
    ((3,), (3,)), ((3,), (3, 4)), ((2, 3), (3,)), ((2, 3), (3, 4)), ((5, 2, 3), (3, 4)),
    ((2, 3), (5, 3, 4)), ((2, 1, 2, 3), (4, 3, 2)), ((3,), (2, 3, 4)), ((2, 3, 4), (4,)),
    ((1, 2, 3), (4, 3, 5)),
]


@requires_torch
@pytest.mark.parametrize("shapes", MATMUL_SHAPES)
def test_matmul_matches_torch(device, shapes):
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(s) for s in shapes)
    compare_with_torch(lambda x, y: x @ y, lambda x, y: x @ y, a, b, device=device)
    compare_with_torch(F.matmul, torch.matmul, a, b, device=device)


@pytest.mark.parametrize("shapes", MATMUL_SHAPES)
def test_matmul_gradients(device, shapes):
    rng = np.random.default_rng(3)
    check_grad(lambda x, y: x @ y, *(rng.standard_normal(s) for s in shapes), device=device)


def test_only_needed_gradients_are_computed(device):
    a = dp.tensor(to_device(np.ones((2, 3)), device), requires_grad=True)
    b = dp.tensor(to_device(np.full((3, 2), 2.0), device))  # a constant
    (a @ b).sum().backward()
    assert b.grad is None
    np.testing.assert_allclose(to_numpy(a.grad), np.full((2, 3), 4.0))


def test_zero_dimensional_operands(device):
    check_grad(lambda x, y: x * y + x / y - y ** 2, np.array(1.5), np.array(-0.7), device=device)
    check_grad(lambda x, y: x * y, np.array(2.0), np.ones((2, 3)), device=device)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "matmul"])
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_one_sided_gradients_are_those_of_the_two_sided_op(op, needs):
    """Where only one operand requires a gradient, it gets the same gradient as when
    both do (ops skip the other side's work: that must not change this side's)."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.5, 2.0, (3, 4)), rng.uniform(0.5, 2.0, (4,) if op != "matmul" else (4, 2))
    f = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
         "div": lambda x, y: x / y, "pow": lambda x, y: x ** y, "matmul": lambda x, y: x @ y}[op]
    both = [dp.tensor(a, requires_grad=True), dp.tensor(b, requires_grad=True)]
    f(*both).sum().backward()
    one = [dp.tensor(a, requires_grad=needs[0]), dp.tensor(b, requires_grad=needs[1])]
    f(*one).sum().backward()
    for t, reference, needed in zip(one, both, needs):
        if needed:
            np.testing.assert_allclose(t.grad, reference.grad, rtol=1e-14)
        else:
            assert t.grad is None
