"""Loss functions (PyTorch's argument names and reductions)."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module
from distprop.functional.broadcast import sum_to

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_rows(xp, logits):
    """(N, C, d1, ...) logits as rows of (N * d1 * ..., C), classes last; (N, C) as it is."""
    if logits.ndim > 2:
        return xp.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])
    return logits


def _softmax_rows(xp, rows):
    e = xp.exp(rows - rows.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


class CrossEntropy(Function):
    """Softmax and negative log-likelihood fused: one pass forward, and the
    gradient is (softmax - smoothed one-hot) / count with no intermediate graph.

    logits: (N, C) or (N, C, d1, ...); targets: class indices (N,) or (N, d1, ...).
    Targets equal to `ignore_index` contribute nothing and are not counted in the mean.
    """

    def __init__(self, targets, label_smoothing, ignore_index, reduction):
        self.targets, self.smoothing = targets, label_smoothing
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits):
        xp = get_array_module(logits)
        self.spatial_shape = (logits.shape[0],) + logits.shape[2:] if logits.ndim > 2 else None
        logits = _as_rows(xp, logits)
        targets = self.targets.reshape(-1)
        n, c = logits.shape
        if targets.shape[0] != n:
            raise ValueError(f"cross_entropy: {n} rows of logits but {targets.shape[0]} targets")
        valid = targets != self.ignore_index
        safe_targets = xp.where(valid, targets, 0)
        if bool(((safe_targets < 0) | (safe_targets >= c)).any()):
            raise IndexError(f"cross_entropy: target class out of range [0, {c})")

        shifted = logits - logits.max(axis=1, keepdims=True)
        rows = xp.arange(n)
        picked = shifted[rows, safe_targets]
        mean_shifted = shifted.mean(axis=1) if self.smoothing else None
        exp = xp.exp(shifted, out=shifted)  # shifted is done with: one (N, C) array less
        sum_exp = exp.sum(axis=1, keepdims=True)
        log_z = xp.log(sum_exp)[:, 0]
        losses = log_z - picked
        if self.smoothing:
            # -mean_c log p_c = log Z - mean_c shifted_c
            losses = (1 - self.smoothing) * losses + self.smoothing * (log_z - mean_shifted)
        losses = xp.where(valid, losses, 0).astype(logits.dtype, copy=False)

        if self.needs_input_grad[0]:
            exp /= sum_exp  # softmax, computed in place over the exp buffer
            self.softmax, self.rows, self.safe_targets, self.valid = exp, rows, safe_targets, valid
        # The count stays an array: no device-to-host sync on the GPU. An all-ignored
        # batch gives nan, as in PyTorch.
        self.count = valid.sum().astype(logits.dtype)
        if self.reduction == "mean":
            return losses.sum() / self.count
        if self.reduction == "sum":
            return losses.sum()
        return losses.reshape(self.spatial_shape) if self.spatial_shape else losses

    def backward(self, gy):
        xp = get_array_module(gy)
        # The saved softmax is ours alone and becomes the gradient in place (it is
        # handed on as the logits' gradient, so the op lets go of it). A second
        # backward through a retained graph finds it gone and recomputes it.
        g, self.softmax = self.softmax, None
        if g is None:
            g = _softmax_rows(xp, _as_rows(xp, self.inputs[0].data))
        n, c = g.shape
        if self.smoothing:
            g -= self.smoothing / c
        g[self.rows, self.safe_targets] -= 1 - self.smoothing
        if self.reduction == "none":
            scale = gy.reshape(-1, 1) * self.valid[:, None]
        elif self.reduction == "mean":
            scale = (gy / self.count) * self.valid[:, None]
        else:
            scale = gy * self.valid[:, None]
        g *= scale.astype(g.dtype, copy=False)
        if self.spatial_shape is not None:
            g = xp.moveaxis(g.reshape(self.spatial_shape + (c,)), -1, 1)
            g = xp.ascontiguousarray(g)
        return (g,)


def cross_entropy(logits, targets, label_smoothing: float = 0.0, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    """Cross-entropy between `logits` (N, C, ...) and class indices `targets` (N, ...)."""
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    targets = targets.data if isinstance(targets, Tensor) else targets
    xp = get_array_module(logits)
    targets = xp.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy expects integer class indices, got dtype {targets.dtype}")
    if logits.ndim == 1:  # one unbatched sample: (C,) logits and a 0-d target
        loss = CrossEntropy(targets.reshape(1), label_smoothing, ignore_index, reduction)(logits.reshape(1, -1))
        return loss.reshape(()) if reduction == "none" else loss
    return CrossEntropy(targets, label_smoothing, ignore_index, reduction)(logits)


class MSELoss(Function):
    def __init__(self, reduction):
        self.reduction = reduction

    def forward(self, x, target):
        self.shapes = x.shape, target.shape  # they may broadcast, as in PyTorch
        self.diff = x - target
        squared = self.diff * self.diff
        if self.reduction == "mean":
            return squared.mean()
        if self.reduction == "sum":
            return squared.sum()
        return squared

    def backward(self, gy):
        scale = 2 / self.diff.size if self.reduction == "mean" else 2
        g = self.diff * (gy * scale)
        g_input = sum_to(g, self.shapes[0]) if self.needs_input_grad[0] else None
        g_target = -sum_to(g, self.shapes[1]) if self.needs_input_grad[1] else None
        return g_input, g_target


def mse_loss(input, target, reduction: str = "mean") -> Tensor:  # noqa: A002 - PyTorch's name
    _check_reduction(reduction)
    return MSELoss(reduction)(input, target)
