"""`Parameter`: a Tensor that a Module registers as one of its learnable weights."""

from __future__ import annotations

import numpy as np

from distprop.autograd import Tensor
from distprop.backend import DEFAULT_DTYPE, to_device


class Parameter(Tensor):
    """A leaf Tensor that requires grad by default.

    Assigning one to a Module attribute registers it (see `Module.__setattr__`).
    Optimizers, gradient hooks and the data-parallel reducer hold on to the object
    itself, so code that changes a parameter (`Module.to`, `load_state_dict`, an
    optimizer step) replaces or updates its `.data` and never the Parameter.
    """

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter containing:\n{super().__repr__()}"


def filled_array(shape, value: float = 0.0, dtype=None, device=None):
    """An array of `shape` filled with `value`, of `dtype` (float32 by default) on `device`."""
    return to_device(np.full(shape, value, dtype=dtype or DEFAULT_DTYPE), device)
