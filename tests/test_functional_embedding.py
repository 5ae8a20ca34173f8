"""embedding: any index shape, repeated indices accumulate, padding_idx gets no gradient."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

TF = torch.nn.functional if torch else None


@requires_torch
@pytest.mark.parametrize("indices", [np.array([3, 1, 3, 3]), np.array([[0, 2], [2, 0], [5, 5]]), np.array(4),
                                     np.array([[[1]], [[1]]])])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
def test_embedding_matches_torch(device, indices, padding_idx):
    weight = np.random.default_rng(0).standard_normal((6, 4))
    compare_with_torch(lambda w: F.embedding(to_device(indices, device), w, padding_idx=padding_idx),
                       lambda w: TF.embedding(torch.as_tensor(indices), w, padding_idx=padding_idx),
                       weight, device=device)


def test_embedding_gradients(device):
    indices = to_device(np.array([[1, 0, 1], [2, 1, 1]]), device)
    check_grad(lambda w: F.embedding(indices, w), np.random.default_rng(1).standard_normal((3, 5)), device=device)


def test_repeated_indices_accumulate_and_padding_row_gets_nothing(device):
    weight = dp.tensor(to_device(np.ones((4, 2)), device), requires_grad=True)
    indices = dp.tensor(to_device(np.array([[1, 1, 0], [1, 3, 0]]), device))  # a Tensor works too
    y = F.embedding(indices, weight, padding_idx=0)
    assert y.shape == (2, 3, 2)
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(weight.grad), [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_embedding_rejects_bad_indices(device):
    weight = dp.tensor(to_device(np.ones((4, 2)), device), requires_grad=True)
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(to_device(np.array([0, 4]), device), weight)
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(to_device(np.array([-1]), device), weight)
    with pytest.raises(TypeError, match="integer"):
        F.embedding(to_device(np.array([0.0]), device), weight)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding(to_device(np.array([0]), device), weight, padding_idx=4)


def test_embedding_by_hand_with_list_indices_and_the_lowest_padding_index():
    weight = dp.tensor(np.arange(12.0).reshape(4, 3), requires_grad=True)
    y = F.embedding([[3, 0], [0, 0]], weight, padding_idx=-4)  # -4 is row 0 of 4
    np.testing.assert_array_equal(y.data, [[[9, 10, 11], [0, 1, 2]], [[0, 1, 2], [0, 1, 2]]])
    y.backward(np.arange(12.0).reshape(2, 2, 3))
    np.testing.assert_array_equal(weight.grad, [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 2]])  # row 0 pads
    weight.grad = None
    F.embedding(dp.tensor(np.array([1, 1, 2])), weight).backward(np.ones((3, 3)))
    np.testing.assert_array_equal(weight.grad, [[0, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"^embedding: padding_idx -5 out of range for 4 embeddings$"):
        F.embedding([0], weight, padding_idx=-5)
    with pytest.raises(ValueError, match=r"^embedding: padding_idx 4 out of range for 4 embeddings$"):
        F.embedding([0], weight, padding_idx=4)
    with pytest.raises(TypeError, match=r"^embedding expects integer indices, got dtype float64$"):
        F.embedding([0.0], weight)
    with pytest.raises(IndexError, match=r"^embedding: index out of range \[0, 4\) for a weight of shape \(4, 3\)$"):
        F.embedding([4], weight)
