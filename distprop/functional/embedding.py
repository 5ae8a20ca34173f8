"""Embedding lookup: rows of a weight matrix picked by integer indices."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module


class Embedding(Function):
    """weight[indices] for indices of any shape; backward scatter-adds each output
    row's gradient onto its weight row (repeated indices accumulate)."""

    def __init__(self, indices, padding_idx):
        self.indices, self.padding_idx = indices, padding_idx

    def forward(self, weight):
        self.weight_shape = weight.shape
        return get_array_module(weight).take(weight, self.indices, axis=0)

    def backward(self, gy):
        xp = get_array_module(gy)
        gw = xp.zeros(self.weight_shape, gy.dtype)
        xp.add.at(gw, self.indices.reshape(-1), gy.reshape(-1, self.weight_shape[1]))
        if self.padding_idx is not None:
            gw[self.padding_idx] = 0  # the padding row is a constant
        return (gw,)


def embedding(indices, weight, padding_idx=None) -> Tensor:
    """Rows of weight (num_embeddings, dim) for integer `indices` of any shape, giving
    indices.shape + (dim,). The row `padding_idx` (if given) receives no gradient."""
    xp = get_array_module(weight)
    indices = xp.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"embedding expects integer indices, got dtype {indices.dtype}")
    rows = weight.shape[0]
    if indices.size and bool(((indices < 0) | (indices >= rows)).any()):
        raise IndexError(f"embedding: index out of range [0, {rows}) for a weight of shape {tuple(weight.shape)}")
    if padding_idx is not None:
        if not -rows <= padding_idx < rows:
            raise ValueError(f"embedding: padding_idx {padding_idx} out of range for {rows} embeddings")
        padding_idx %= rows
    return Embedding(indices, padding_idx)(weight)
