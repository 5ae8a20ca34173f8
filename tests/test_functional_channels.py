"""Per-channel sums and broadcasts (distprop.functional.channels) against plain numpy,
in every memory layout they treat specially and in those they do not."""

import numpy as np
import pytest

from distprop.functional.channels import channel_op, channel_sum


def _layouts(shape, dtype, rng):
    """The same values as channels-first, channels-last and a non-contiguous view."""
    x = rng.standard_normal(shape).astype(dtype)
    last = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    strided = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    strided[...] = x
    return {"first": x, "last": np.moveaxis(last, -1, 1), "strided": strided}


SHAPES = [(4, 16, 8, 8), (3, 6, 5, 7), (5, 3), (2, 4, 9), (2, 3, 2, 3, 2), (1, 1, 1, 1), (7, 5000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_sum_matches_numpy(shape, dtype):
    rng = np.random.default_rng(0)
    axes = tuple(a for a in range(len(shape)) if a != 1)
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, x in _layouts(shape, dtype, rng).items():
        y = _layouts(shape, dtype, np.random.default_rng(1))[name]
        reference = x.astype(np.float64).sum(axis=axes)
        np.testing.assert_allclose(channel_sum(np, x), reference, **tolerance, err_msg=name)
        products = (x.astype(np.float64) * y).sum(axis=axes)
        np.testing.assert_allclose(channel_sum(np, x, y), products, **tolerance, err_msg=name)
        exact = channel_sum(np, x, y, dtype=np.float64)
        assert exact.dtype == np.float64
        np.testing.assert_allclose(exact, products, rtol=1e-12, atol=1e-12, err_msg=name)


def test_channel_sum_of_two_layouts_falls_back():
    rng = np.random.default_rng(2)
    layouts = _layouts((3, 5, 4, 4), np.float64, rng)
    a, b = layouts["first"], layouts["last"]
    np.testing.assert_allclose(channel_sum(np, a, b), (a * b).sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ufunc", [np.add, np.subtract, np.multiply])
def test_channel_op_matches_broadcasting_and_keeps_the_layout(shape, ufunc):
    rng = np.random.default_rng(3)
    vector = rng.standard_normal(shape[1]).astype(np.float32)
    broadcast = (1, shape[1]) + (1,) * (len(shape) - 2)
    for name, x in _layouts(shape, np.float32, rng).items():
        result = channel_op(np, ufunc, x, vector)
        np.testing.assert_array_equal(result, ufunc(x, vector.reshape(broadcast)), err_msg=name)
        if name != "strided":
            assert result.strides == x.strides, name
        in_place = x.copy(order="K")
        assert channel_op(np, ufunc, in_place, vector, out=in_place) is in_place
        np.testing.assert_array_equal(in_place, result, err_msg=name)


def test_channel_op_promotes_like_numpy():
    rng = np.random.default_rng(4)
    x = _layouts((2, 3, 4, 4), np.float32, rng)["last"]
    wide = rng.standard_normal(3)  # float64
    result = channel_op(np, np.multiply, x, wide)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, x * wide.reshape(1, 3, 1, 1))
    narrow = x.astype(np.float64)
    result = channel_op(np, np.add, narrow, wide.astype(np.float32))
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, narrow + wide.astype(np.float32).reshape(1, 3, 1, 1))


def test_layouts_are_told_apart():
    from distprop.functional.channels import _layout, _tiles_per_row

    first = np.zeros((2, 3, 4, 5))
    last = np.moveaxis(np.zeros((2, 4, 5, 3)), -1, 1)
    assert _layout(first) == ("first", None)
    assert _layout(last) == ("last", 40)  # 2 * 4 * 5 pixels of 3 channels: one row
    assert _layout(np.zeros((6, 3))) == ("last", 6)  # (N, C): channels are innermost
    for other in (first[:, :, ::2], np.zeros(3), np.zeros((0, 3, 2)), [[1.0, 2.0]]):
        assert _layout(other) is None
    assert _tiles_per_row(4096 * 3, 2) == 2048 and _tiles_per_row(7, 4096) == 1 and _tiles_per_row(12, 1000) == 4


class _Recorded:
    """A ufunc that notes the dimensions of the arrays it is applied to."""

    def __init__(self, ufunc):
        self.ufunc, self.calls = ufunc, []

    def __call__(self, a, b, out=None):
        self.calls.append((np.ndim(a), np.ndim(b)))
        return self.ufunc(a, b, out=out)


@pytest.mark.parametrize("layout, fast", [("first", (3, 2)), ("last", (2, 1)), ("strided", None)])
def test_each_layout_takes_its_own_path(layout, fast, monkeypatch):
    """Channels-first and channels-last arrays go through their long-row paths (a GEMV
    for sums, one ufunc call on rows for broadcasts); anything else through numpy's
    broadcasting and einsum. The values are the same either way: the paths are what
    makes these helpers fast."""
    from distprop.functional import channels

    x = _layouts((2, 3, 4, 5), np.float64, np.random.default_rng(5))[layout]
    products = []
    monkeypatch.setattr(channels, "matmul", lambda a, b: products.append(1) or np.matmul(a, b))
    total = channel_sum(np, x)
    np.testing.assert_allclose(total, x.sum(axis=(0, 2, 3)), rtol=1e-12)
    assert len(products) == (0 if fast is None else 1)
    add = _Recorded(np.add)
    result = channel_op(np, add, x, np.arange(3.0))
    np.testing.assert_array_equal(result, x + np.arange(3.0).reshape(1, 3, 1, 1))
    assert add.calls == [fast or (4, 4)]
    assert np.isclose(channel_sum(np, x, x, dtype=np.float64), (x * x).sum(axis=(0, 2, 3))).all()
    x32 = x.astype(np.float32, order="K")  # the same layout
    assert channel_sum(np, x32).dtype == np.float32 and channel_sum(np, x32, x32).dtype == np.float32
    assert channel_sum(np, x32, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("x_layout, out_layout", [("first", "last"), ("last", "first"), ("last", "strided"),
                                                  ("first", "strided")])
def test_channel_op_into_an_out_of_another_layout_or_dtype(x_layout, out_layout):
    rng = np.random.default_rng(6)
    x = _layouts((2, 3, 4, 5), np.float64, rng)[x_layout]
    vector = rng.standard_normal(3)
    expected = x * vector.reshape(1, 3, 1, 1)
    out = _layouts((2, 3, 4, 5), np.float64, rng)[out_layout]
    assert channel_op(np, np.multiply, x, vector, out=out) is out
    np.testing.assert_array_equal(out, expected)
    wide = np.zeros((2, 3, 4, 5), np.float64)
    narrow = x.astype(np.float32, order="K")
    channel_op(np, np.multiply, narrow, vector.astype(np.float32), out=wide)
    np.testing.assert_allclose(wide, expected, rtol=1e-6)
    b = _layouts((2, 3, 4, 5), np.float64, rng)[out_layout]
    np.testing.assert_allclose(channel_sum(np, x, b), (x * b).sum(axis=(0, 2, 3)), rtol=1e-12)
