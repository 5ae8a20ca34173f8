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


def test_a_grad_buffer_of_another_shape_or_array_type_is_ignored():
    x = dp.tensor(np.ones((4, 3)))

    class Marked(np.ndarray):
        pass

    for buffer in (np.zeros((3, 2)), np.zeros((2, 3)).view(Marked)):
        w = dp.tensor(np.ones((2, 3)), requires_grad=True)
        w.grad_buffer = buffer
        F.linear(x, w).sum().backward()
        assert w.grad is not buffer and type(w.grad) is np.ndarray and w.grad.shape == (2, 3)
        np.testing.assert_array_equal(w.grad, np.full((2, 3), 4.0))
        assert not buffer.any()


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


# ---- the Tensor's own surface -------------------------------------------------------

def test_array_conversion_rules():
    assert dp.tensor(2.5).dtype == np.float32 and dp.tensor([[1.5], [2.0]]).dtype == np.float32
    assert dp.tensor(np.float64(2.5)).dtype == np.float64  # numpy scalars keep their type
    assert dp.tensor([1, 2], dtype=np.float64).dtype == np.float64
    a = np.arange(3.0)
    assert dp.tensor(a, dtype=np.float64).data is a  # no copy when nothing changes
    assert dp.tensor(a, dtype=np.float32).dtype == np.float32
    t = dp.tensor(a, requires_grad=True)
    wrapped = dp.Tensor(t)
    assert wrapped.data is a and not wrapped.requires_grad and wrapped.grad is None and wrapped.is_leaf
    assert dp.tensor(a, requires_grad=1).requires_grad is True


def test_tensor_facts_and_conversions():
    t = dp.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert t.numel() == 6 and isinstance(t.numel(), int) and len(t) == 2 and t.device == "cpu"
    assert dp.tensor(np.array([7.5])).item() == 7.5
    assert t.numpy() is t.data
    d = (t * 2).detach()
    assert d.is_leaf and not d.requires_grad and np.array_equal(d.data, 2 * t.data)
    u = dp.tensor(np.ones(2))
    assert u.requires_grad_() is u and u.requires_grad and u.requires_grad_(False) is u and not u.requires_grad
    assert repr(dp.tensor(np.array([1.0, 2.0]))) == "tensor(array([1., 2.]))"
    assert repr(dp.tensor(np.array([1.0]), requires_grad=True)) == "tensor(array([1.]), requires_grad=True)"
    assert bool(dp.tensor(np.array([2.0]))) and not bool(dp.tensor(np.array([0.0])))
    assert t.to(dtype=np.float32).dtype == np.float32 and t.to() is t


def test_operators_put_operands_in_order():
    x = dp.tensor(np.array([2.0, 4.0]), requires_grad=True)
    cases = {
        "x + 1": (x + 1, [3, 5]), "1 + x": (1 + x, [3, 5]),
        "x - 1": (x - 1, [1, 3]), "1 - x": (1 - x, [-1, -3]),
        "x * 3": (x * 3, [6, 12]), "3 * x": (3 * x, [6, 12]),
        "x / 2": (x / 2, [1, 2]), "8 / x": (8 / x, [4, 2]),
        "x ** 2": (x ** 2, [4, 16]), "2 ** x": (2 ** x, [4, 16]),
        "-x": (-x, [-2, -4]),
        "x[1]": (x[1], 4), "x.exp().log()": (x.exp().log(), [2, 4]), "x.sqrt()": (x.sqrt(), np.sqrt([2, 4])),
        "x.tanh()": (x.tanh(), np.tanh([2, 4])), "x.sigmoid()": (x.sigmoid(), 1 / (1 + np.exp([-2, -4]))),
        "(x - 3).relu()": ((x - 3).relu(), [0, 1]),
    }
    for name, (got, expected) in cases.items():
        np.testing.assert_allclose(got.data, expected, rtol=1e-15, err_msg=name)
        assert got.requires_grad, name
    m = dp.tensor(np.array([[1.0, 2.0], [3.0, 4.0]]))
    v = np.array([1.0, -1.0])
    np.testing.assert_array_equal((m @ v).data, [-1, -1])
    np.testing.assert_array_equal((v @ m).data, [-2, -2])  # numpy defers to Tensor.__rmatmul__
    assert isinstance(v @ m, dp.Tensor) and isinstance(v * m, dp.Tensor)
    assert np.array_equal(x < 3, [True, False]) and np.array_equal(x <= 2, [True, False])
    assert np.array_equal(x > dp.tensor(np.array([1.0, 5.0])), [True, False]) and np.array_equal(x >= 4, [False, True])
    assert isinstance(x < 3, np.ndarray)


def test_shape_methods_take_either_spelling():
    t = dp.tensor(np.arange(24.0).reshape(2, 3, 4))
    assert t.T.shape == (4, 3, 2) and t.transpose().shape == (4, 3, 2)
    assert t.transpose(1, 0, 2).shape == (3, 2, 4) and t.transpose((2, 0, 1)).shape == (4, 2, 3)
    assert t.transpose([2, 0, 1]).shape == (4, 2, 3)
    assert t.reshape(6, 4).shape == (6, 4) and t.reshape((4, 6)).shape == (4, 6) and t.reshape([24]).shape == (24,)
    assert t.flatten().shape == (24,) and t.flatten(1).shape == (2, 12) and t.flatten(0, 1).shape == (6, 4)
    assert t.sum().item() == 276 and t.sum(axis=1).shape == (2, 4) and t.sum(axis=1, keepdims=True).shape == (2, 1, 4)
    assert t.mean().item() == 11.5 and t.mean(axis=0, keepdims=True).shape == (1, 3, 4)
    assert t.max().item() == 23 and t.max(axis=2).shape == (2, 3) and t.max(axis=2, keepdims=True).shape == (2, 3, 1)


def test_as_tensor_gives_numbers_the_dtype_and_device_of_their_partner():
    from distprop.autograd import as_tensor

    f32 = dp.tensor(np.ones(2, np.float32))
    i32 = dp.tensor(np.ones(2, np.int32))
    assert as_tensor(f32) is f32
    assert as_tensor(2, f32).dtype == np.float32 and as_tensor(2.5, f32).dtype == np.float32
    assert as_tensor(True, f32).dtype == np.float32
    assert as_tensor(3, i32).dtype == np.int32  # an int stays in the integer type
    assert as_tensor(2.5, i32).dtype == np.float64 and as_tensor(2.5, i32).item() == 2.5  # a float does not
    assert as_tensor(2.5).dtype == np.float32 and as_tensor([1, 2], f32).dtype.kind == "i"
    assert (i32 * 2).dtype == np.int32 and (f32 * 2).dtype == np.float32


def test_grad_mode_nests_and_decorates():
    x = dp.tensor(np.ones(2), requires_grad=True)
    with dp.no_grad():
        assert dp.is_grad_enabled() is False and (x * 2).requires_grad is False
        with dp.enable_grad():
            assert dp.is_grad_enabled() is True and (x * 2).requires_grad
        assert not dp.is_grad_enabled()
    assert dp.is_grad_enabled()

    @dp.no_grad()
    def frozen(t, scale=1):
        return t * scale, dp.is_grad_enabled()

    y, enabled = frozen(x, scale=3)
    assert not enabled and not y.requires_grad and np.array_equal(y.data, [3, 3]) and frozen.__name__ == "frozen"
    assert dp.is_grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with dp.no_grad():
            1 / 0
    assert dp.is_grad_enabled()  # restored after an exception too


def test_grad_mode_is_per_thread():
    import threading

    seen = []
    with dp.no_grad():
        thread = threading.Thread(target=lambda: seen.append(dp.is_grad_enabled()))
        thread.start()
        thread.join()
    assert seen == [True]


def test_zero_grads_drops_or_zeroes_in_place():
    from distprop.autograd import zero_grads

    a, b, c, d = (dp.tensor(np.ones(2), requires_grad=True) for _ in range(4))
    a.grad, b.grad, d.grad = np.ones(2), np.full(2, 5.0), np.ones(2)
    kept = b.grad
    zero_grads([c, a])  # dropped by default; one without a gradient does not stop the rest
    zero_grads([c, b], set_to_none=False)
    assert a.grad is None and c.grad is None and b.grad is kept and not kept.any()
    assert d.grad is not None


def test_hook_registration_rules():
    x = dp.tensor(np.ones(2), requires_grad=True)
    with pytest.raises(RuntimeError, match="^post-accumulate-grad hooks can only be registered on leaf tensors$"):
        (x * 2).register_post_accumulate_grad_hook(lambda t: None)
    calls = []
    first = x.register_post_accumulate_grad_hook(lambda t: calls.append(("first", t)))
    x.register_post_accumulate_grad_hook(lambda t: calls.append(("second", t)))
    (x * 3).sum().backward()
    assert [name for name, _ in calls] == ["first", "second"] and all(t is x for _, t in calls)
    first.remove()
    first.remove()  # a second remove is harmless
    (x * 3).sum().backward()
    assert [name for name, _ in calls] == ["first", "second", "second"]


def test_backward_on_a_leaf_copies_the_gradient_and_fires_its_hooks():
    x = dp.tensor(np.ones(3), requires_grad=True)
    fired = []
    x.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad.copy()))
    grad = np.array([1.0, 2.0, 3.0])
    x.backward(grad)
    assert x.grad is not grad and np.array_equal(x.grad, grad) and len(fired) == 1
    grad[0] = 100.0
    assert x.grad[0] == 1.0


def test_backward_checks_the_gradient_it_is_given():
    x = dp.tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = x * 2
    with pytest.raises(ValueError, match=r"^gradient of shape \(3, 2\) for a tensor of shape \(2, 3\)$"):
        y.backward(np.ones((3, 2)))
    with pytest.raises(RuntimeError, match=r"^backward\(\) without a gradient needs a one-element tensor, "
                                           r"got shape \(2, 3\)$"):
        y.backward()
    with pytest.raises(RuntimeError, match=r"^backward\(\) called on a tensor that does not require grad "
                                           r"\(no input had requires_grad=True, or it was computed under no_grad\)$"):
        dp.tensor(np.ones(1)).backward()
    y.backward([[1, 2, 3], [4, 5, 6]])  # a list becomes an array of the root's dtype
    assert x.grad.dtype == np.float32 and np.array_equal(x.grad, [[2, 4, 6], [8, 10, 12]])
    (x.sum() * 1).backward()  # one element: 1 is implied
    assert np.array_equal(x.grad, [[3, 5, 7], [9, 11, 13]])


def test_walking_a_freed_graph_says_how_to_keep_it():
    x = dp.tensor(np.ones(2), requires_grad=True)
    y = (x * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match=r"^backward\(\) through a graph that was already freed; pass "
                                           r"retain_graph=True to the first backward\(\) to walk it twice$"):
        y.backward()


def test_a_backward_that_returns_the_wrong_shape_is_named():
    from distprop.autograd import Function

    class Broken(Function):
        def forward(self, x):
            return x.sum()

        def backward(self, gy):
            return (gy,)  # shape () for an input of shape (3,)

    with pytest.raises(RuntimeError, match=r"^Broken.backward returned a gradient of shape \(\) for input 0 of "
                                           r"shape \(3,\)$"):
        Broken()(dp.tensor(np.ones(3), requires_grad=True)).backward()


def test_function_records_only_when_a_gradient_is_wanted():
    from distprop.autograd import Function

    class Twice(Function):
        def forward(self, a, b):
            self.seen = self.needs_input_grad
            return np.sum(a * 2 + b)  # a numpy scalar: kept as a 0-d array

        def backward(self, gy):
            return gy * 2 * np.ones(3), None

    x, c = dp.tensor(np.ones(3), requires_grad=True), dp.tensor(np.ones(3))
    op = Twice()
    y = op(x, c)
    assert op.seen == (True, False) and y.creator is op and op.inputs[0] is x and y.requires_grad
    assert isinstance(y.data, np.ndarray) and y.shape == ()
    y.backward()
    assert np.array_equal(x.grad, [2, 2, 2]) and c.grad is None
    op = Twice()
    z = op(c, c)
    assert op.seen == (False, False) and z.creator is None and not hasattr(op, "inputs") and not z.requires_grad
    with dp.no_grad():
        op = Twice()
        assert op(x, c).creator is None and op.seen == (False, False)
    assert repr(Twice()) == "<Twice>"
    with pytest.raises(NotImplementedError):
        Function().forward(np.ones(1))
    with pytest.raises(NotImplementedError):
        Function().backward(np.ones(1))


def test_an_input_whose_op_gives_no_gradient_gets_none_and_no_hook():
    from distprop.autograd import Function

    class FirstOnly(Function):
        def forward(self, a, b):
            return a + b

        def backward(self, gy):
            return gy, None

    a, b = dp.tensor(np.ones(2), requires_grad=True), dp.tensor(np.ones(2), requires_grad=True)
    fired = []
    b.register_post_accumulate_grad_hook(lambda t: fired.append(t))
    FirstOnly()(a, b * 1).sum().backward()  # b's path ends at an op that gives it nothing
    assert np.array_equal(a.grad, [1, 1]) and b.grad is None and fired == []
    FirstOnly()(a, b).sum().backward()  # and straight from the op
    assert np.array_equal(a.grad, [2, 2]) and b.grad is None and fired == []


def test_hooks_below_a_diamond_fire_once_with_the_complete_gradient():
    x = dp.tensor(np.array([1.0, 2.0]), requires_grad=True)
    seen = []
    x.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))
    shared = x * 3  # reached from the root along two paths
    left, right = shared * 2, shared.exp()
    (left.sum() + right.sum()).backward()
    expected = 6 + 3 * np.exp(3 * np.array([1.0, 2.0]))
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], expected, rtol=1e-14)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-14)


def test_one_array_returned_for_two_inputs_is_not_shared_between_their_gradients():
    from distprop.autograd import Function

    class Both(Function):
        def forward(self, a, b):
            return a + b

        def backward(self, gy):
            g = gy * 1.0  # a fresh array, handed to both inputs
            return g, g

    a, b = dp.tensor(np.ones(2), requires_grad=True), dp.tensor(np.ones(2), requires_grad=True)
    Both()(a, b).sum().backward()
    assert a.grad is not b.grad
    a.grad += 1
    assert np.array_equal(b.grad, [1, 1])
    # the same through intermediate ops: accumulation in one path must not leak into the other
    c = dp.tensor(np.ones(2), requires_grad=True)
    x, y = c * 1, c * 1
    (Both()(x, y) + x).sum().backward()
    assert np.array_equal(c.grad, [3, 3])


class Identity(dp.autograd.Function):
    """Hands its output's gradient back as the very same array."""

    def forward(self, a):
        return a

    def backward(self, gy):
        return (gy,)


def test_a_gradient_passed_through_unchanged_is_never_added_into_in_place():
    x = dp.tensor(np.ones(3), requires_grad=True)
    given = np.array([1.0, 2.0, 3.0])
    y = Identity()(x)
    (Identity()(y) + Identity()(y)).backward(given)  # y's two gradients: the same array twice
    assert np.array_equal(x.grad, [2, 4, 6]) and np.array_equal(given, [1, 2, 3])


def test_callbacks_run_in_order_and_may_queue_more():
    from distprop.autograd import Function, queue_callback

    order = []

    class Queues(Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            queue_callback(lambda: (order.append("first"), queue_callback(lambda: order.append("third"))))
            queue_callback(lambda: order.append("second"))
            return (gy,)

    Queues()(dp.tensor(np.ones(2), requires_grad=True)).sum().backward()
    assert order == ["first", "second", "third"]
    with pytest.raises(RuntimeError, match=r"^queue_callback\(\) called outside of a backward pass$"):
        queue_callback(lambda: None)
    import threading

    errors = []  # also in a thread that never ran a backward pass

    def outside():
        try:
            queue_callback(lambda: None)
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=outside)
    thread.start()
    thread.join()
    assert [type(e) for e in errors] == [RuntimeError]


def test_a_backward_inside_a_callback_keeps_the_outer_pass_callbacks():
    from distprop.autograd import Function, queue_callback

    order = []
    inner = dp.tensor(np.ones(1), requires_grad=True)

    class Outer(Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            def nested():
                (inner * 2).sum().backward()  # a pass of its own, inside the outer one's callback
                order.append("nested done")
                queue_callback(lambda: order.append("queued after it"))  # still the outer pass
            queue_callback(nested)
            queue_callback(lambda: order.append("outer second"))
            return (gy,)

    Outer()(dp.tensor(np.ones(2), requires_grad=True)).sum().backward()
    assert order == ["nested done", "outer second", "queued after it"] and inner.grad[0] == 2.0


def test_comparisons_of_equal_elements():
    x, y = dp.tensor(np.array([1.0, 2.0])), dp.tensor(np.array([1.0, 1.0]))
    assert np.array_equal(x > y, [False, True]) and np.array_equal(x >= y, [True, True])
    assert np.array_equal(y < x, [False, True]) and np.array_equal(y <= x, [True, True])


def test_to_names_the_device_it_does_not_know():
    with pytest.raises(ValueError, match=r"^unknown device 'tpu': expected 'cpu' or 'gpu'$"):
        dp.tensor(np.ones(2)).to("tpu")


def test_the_module_level_backward_frees_the_graph_by_default():
    from distprop.autograd import backward

    loss = (dp.tensor(np.ones(2), requires_grad=True) * 2).sum()
    backward(loss)
    with pytest.raises(RuntimeError, match="already freed"):
        backward(loss)


def test_a_gradient_given_to_a_leaf_takes_the_leaf_dtype():
    x = dp.tensor(np.ones(3, np.float32), requires_grad=True)
    x.backward(np.array([1.0, 2.0, 3.0]))  # float64
    assert x.grad.dtype == np.float32 and np.array_equal(x.grad, [1, 2, 3])


def test_the_given_gradient_is_never_a_leaf_gradient_nor_added_into():
    x = dp.tensor(np.ones(3), requires_grad=True)
    given = np.array([1.0, 2.0, 3.0])
    for _ in range(2):  # passed through as is
        Identity()(x).backward(given)
        assert not np.shares_memory(x.grad, given)
    assert np.array_equal(x.grad, [2, 4, 6]) and np.array_equal(given, [1, 2, 3])
    x = dp.tensor(np.ones(3), requires_grad=True)
    for _ in range(2):  # as a view of it
        x.reshape(3, 1).backward(given.reshape(3, 1))
        assert not np.shares_memory(x.grad, given)
    assert np.array_equal(x.grad, [2, 4, 6]) and np.array_equal(given, [1, 2, 3])


def test_read_only_gradients_are_copied_before_anything_is_added_into_them():
    from distprop.autograd import Function

    class ReadOnly(Function):  # a fresh array, but one that may not be written
        def forward(self, a):
            return a.copy()

        def backward(self, gy):
            g = gy * 1.0
            g.flags.writeable = False
            return (g,)

    class Spread(Function):  # a read-only view of an array the engine owns
        def forward(self, a):
            self.shape = a.shape
            return a.sum(keepdims=True)  # not 0-d: numpy makes scalars of 0-d products

        def backward(self, gy):
            return (np.broadcast_to(gy, self.shape),)

    def spread_twice(x):  # two contributions: the engine adds them into an array of its own
        s = Spread()(x)
        return (s * 2 + s * 3).sum()

    for op, per_pass in ((lambda x: ReadOnly()(x).sum(), 1), (spread_twice, 5)):
        x = dp.tensor(np.zeros(3), requires_grad=True)
        op(x).backward()
        op(x).backward()  # adds into the first pass's gradient
        assert x.grad.flags.writeable and np.array_equal(x.grad, np.full(3, 2 * per_pass))


def test_gradient_lands_in_a_grad_buffer_that_is_a_view_of_a_larger_array():
    # as the data-parallel reducer's buckets are: one flat array, a view per parameter
    rng = np.random.default_rng(2)
    x = dp.tensor(rng.standard_normal((4, 3)))
    w = dp.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    flat = np.full(10, np.nan)
    w.grad_buffer = flat[4:].reshape(2, 3)
    F.linear(x, w).sum().backward()
    assert w.grad is w.grad_buffer
    np.testing.assert_allclose(flat[4:].reshape(2, 3), np.tile(x.data.sum(axis=0), (2, 1)), rtol=1e-12)
