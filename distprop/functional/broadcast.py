"""Undoing numpy broadcasting in the backward pass."""


def sum_to(grad, shape):
    """Sum `grad` down to `shape`: the adjoint of broadcasting an array of `shape`.

    Every op whose inputs may broadcast passes each input gradient through here.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)
