"""The backward engine: order, accumulation, hooks, memory, grad mode."""

import subprocess
import sys

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy


def make(array, device, requires_grad=True):
    return dp.tensor(to_device(np.asarray(array), device), requires_grad=requires_grad)


def test_tensor_wraps_without_copy_and_keeps_dtype():
    a = np.arange(6.0).reshape(2, 3)
    t = dp.tensor(a)
    assert t.data is a and t.dtype == np.float64 and t.shape == (2, 3) and t.ndim == 2
    assert dp.tensor([1.0, 2.0]).dtype == np.float32  # Python floats: float32 by default
    assert dp.tensor([1, 2]).dtype.kind == "i"
    assert (dp.tensor(np.ones(3, np.float32)) * 2).dtype == np.float32


def test_20000_op_chain_needs_no_recursion(device):
    x = make(np.ones(3), device)
    y = x
    for _ in range(20000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), np.full(3, 1.0001 ** 20000), rtol=1e-9)


def test_long_chain_can_be_deleted_after_retained_backward(device):
    x = make(np.ones(2), device)
    y = x
    for _ in range(50000):
        y = y + 1.0
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    del y
    np.testing.assert_allclose(to_numpy(x.grad), [2.0, 2.0])


def test_fan_out_gets_complete_gradient_before_propagating(device):
    x = make([1.0, 2.0, 3.0], device)
    h = x * x          # used three times below
    y = (h * 2 + h.exp() + h).sum()
    y.backward()
    xv = np.array([1.0, 2.0, 3.0])
    expected = (2 + np.exp(xv ** 2) + 1) * 2 * xv
    np.testing.assert_allclose(to_numpy(x.grad), expected, rtol=1e-12)


def test_diamond_graph_runs_each_op_once(device):
    calls = []

    class Spy(F.arithmetic.Neg):
        def backward(self, gy):
            calls.append(gy.copy())
            return super().backward(gy)

    x = make([1.0, 2.0], device)
    a = Spy()(x)
    (a * 3 + a * 4).sum().backward()
    assert len(calls) == 1
    np.testing.assert_allclose(to_numpy(calls[0]), [7.0, 7.0])
    np.testing.assert_allclose(to_numpy(x.grad), [-7.0, -7.0])


def test_gradients_accumulate_over_backward_calls(device):
    x = make([1.0, -2.0], device)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [3 + 2, 3 - 4])


def test_leaf_gradients_never_alias_each_other(device):
    a, b = make([1.0, 2.0], device), make([3.0, 4.0], device)
    (a + b).sum().backward()
    assert a.grad is not b.grad
    a.grad += 10
    np.testing.assert_allclose(to_numpy(b.grad), [1.0, 1.0])
    c = make(np.ones((2, 2)), device)
    c.reshape(4).sum().backward()  # a view of a read-only broadcast reaches the leaf
    c.grad *= 2
    np.testing.assert_allclose(to_numpy(c.grad), np.full((2, 2), 2.0))


def test_post_accumulate_hook_fires_once_with_final_gradient(device):
    w = make([1.0, 2.0], device)
    other = make([5.0, 5.0], device)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(to_numpy(t.grad).copy()))
    other.register_post_accumulate_grad_hook(lambda t: seen.append("other"))
    # w is used in two places, far apart in the graph: the hook must wait for both.
    y = ((w * 2).exp().sum() + (w * other).sum() * 3)
    y.backward()
    assert len(seen) == 2
    [w_grad] = [s for s in seen if not isinstance(s, str)]
    np.testing.assert_allclose(w_grad, 2 * np.exp(2 * np.array([1.0, 2.0])) + 15)


def test_hooks_fire_while_backward_continues(device):
    """A parameter near the output is final before the input-side ops run."""
    order = []

    class Marker(F.arithmetic.Neg):
        def backward(self, gy):
            order.append("input-side op")
            return super().backward(gy)

    x = make(np.ones(3), device)
    w1 = make(np.ones(3), device)
    w2 = make(np.ones(3), device)
    w1.register_post_accumulate_grad_hook(lambda t: order.append("w1"))
    w2.register_post_accumulate_grad_hook(lambda t: order.append("w2"))
    h = Marker()(x * w1)
    (h * w2).sum().backward()
    assert order.index("w2") < order.index("input-side op") < order.index("w1")


def test_hook_handle_removes_hook(device):
    w = make([1.0], device)
    calls = []
    handle = w.register_post_accumulate_grad_hook(lambda t: calls.append(1))
    (w * 2).sum().backward()
    handle.remove()
    (w * 2).sum().backward()
    assert calls == [1]


def test_unused_input_gets_no_gradient_and_no_hook(device):
    used, unused = make([1.0], device), make([1.0], device)
    fired = []
    unused.register_post_accumulate_grad_hook(lambda t: fired.append(1))
    (used * 2).sum().backward()
    assert unused.grad is None and not fired


def test_graph_is_released_after_backward(device):
    x = make([1.0, 2.0], device)
    y = (x.exp() * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_no_grad_records_nothing(device):
    x = make([1.0], device)
    with dp.no_grad():
        y = x * 2
    assert not y.requires_grad and y.creator is None

    @dp.no_grad()
    def double(t):
        return t * 2

    assert not double(x).requires_grad
    assert (x * 2).requires_grad and dp.is_grad_enabled()


def test_backward_errors_are_clear(device):
    x = make(np.ones(3), device)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        make(np.ones(1), device, requires_grad=False).backward()


def test_cpu_path_never_imports_cupy():
    code = ("import sys, numpy as np, distprop as dp, distprop.functional as F\n"
            "x = dp.tensor(np.ones((2, 3)), requires_grad=True)\n"
            "F.cross_entropy(F.linear(x, dp.tensor(np.ones((4, 3)), requires_grad=True)), np.array([0, 1])).backward()\n"
            "import distprop.nn, distprop.optim\n"
            "assert 'cupy' not in sys.modules, 'cupy imported on the CPU path'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_gradient_lands_in_the_leaf_grad_buffer_when_it_has_one(device):
    rng = np.random.default_rng(0)
    x = make(rng.standard_normal((4, 3)), device, requires_grad=False)
    w = make(rng.standard_normal((2, 3)), device)
    expected_w = make(to_numpy(w.data).copy(), device)
    buffer = dp.tensor(to_device(np.full((2, 3), np.nan), device)).data
    w.grad_buffer = buffer
    F.linear(x, w).sum().backward()
    assert w.grad is buffer  # written in place by the op, not copied
    F.linear(x, expected_w).sum().backward()
    np.testing.assert_allclose(to_numpy(w.grad), to_numpy(expected_w.grad), rtol=1e-12)
    # A second pass accumulates into it as into any gradient.
    F.linear(x, w).sum().backward()
    np.testing.assert_allclose(to_numpy(buffer), 2 * to_numpy(expected_w.grad), rtol=1e-12)


def test_grad_buffer_is_ignored_when_several_ops_contribute(device):
    rng = np.random.default_rng(1)
    x = make(rng.standard_normal((4, 3)), device, requires_grad=False)
    w = make(rng.standard_normal((2, 3)), device)
    w.grad_buffer = dp.tensor(to_device(np.full((2, 3), np.nan), device)).data
    (F.linear(x, w).sum() + (w * 2).sum()).backward()  # two sources: no single writer
    reference = make(to_numpy(w.data).copy(), device)
    (F.linear(x, reference).sum() + (reference * 2).sum()).backward()
    np.testing.assert_allclose(to_numpy(w.grad), to_numpy(reference.grad), rtol=1e-12)


def test_retained_graph_walked_again_accumulates_despite_the_grad_buffer(device):
    x = make(np.ones((4, 3)), device, requires_grad=False)
    w = make(np.ones((2, 3)), device)
    w.grad_buffer = dp.tensor(to_device(np.zeros((2, 3)), device)).data
    y = F.linear(x, w).sum()
    y.backward(retain_graph=True)  # written into the buffer: 4 everywhere
    y.backward(to_device(np.array(3.0), device))  # no buffer offered now: must not write there
    np.testing.assert_array_equal(to_numpy(w.grad), np.full((2, 3), 4.0 + 12.0))


def test_a_grad_buffer_that_no_longer_fits_the_leaf_is_ignored(device):
    x = make(np.ones((4, 3)), device, requires_grad=False)
    w = make(np.ones((2, 3)), device)
    w.grad_buffer = dp.tensor(to_device(np.zeros((2, 3), np.float32), device)).data  # w is float64
    F.linear(x, w).sum().backward()
    assert w.grad.dtype == np.float64 and w.grad is not w.grad_buffer
    np.testing.assert_array_equal(to_numpy(w.grad), np.full((2, 3), 4.0))


def test_each_input_gets_a_gradient_of_its_own_dtype(device):
    a = dp.tensor(to_device(np.ones(3, np.float32), device), requires_grad=True)
    b = make(np.ones(3), device)  # float64
    (a + b).sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64


def test_a_pass_that_raises_calls_on_failure_instead_of_the_callback(device):
    from distprop.autograd import Function, queue_callback

    calls = []

    class Fails(Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            queue_callback(lambda: calls.append("done"), on_failure=lambda: calls.append("failed"))
            raise FloatingPointError("deliberate")

    with pytest.raises(FloatingPointError):
        Fails()(make(np.ones(2), device)).sum().backward()
    assert calls == ["failed"]
