"""Scaled dot-product attention with a fused backward pass."""

from __future__ import annotations

import math

from distprop import random
from distprop.autograd import Function, Tensor
from distprop.backend import device_of, get_array_module
from distprop.cpu_threads import matmul
from distprop.functional import shapes
from distprop.functional.broadcast import sum_to


def _masked_softmax(xp, scores):
    """Softmax over the last axis where a row that is masked out entirely (all -inf)
    gives zeros instead of nan, as PyTorch's attention does."""
    peak = scores.max(axis=-1, keepdims=True)
    e = xp.exp(scores - xp.where(xp.isfinite(peak), peak, 0))
    total = e.sum(axis=-1, keepdims=True)
    e /= xp.where(total > 0, total, 1)
    return e


class ScaledDotProductAttention(Function):
    """softmax(q k^T * scale + mask) v over (..., L, E) queries, (..., S, E) keys and
    (..., S, Ev) values, batch axes broadcasting. Inputs are q, k, v and optionally
    an additive float mask (differentiable); `allowed` is a boolean mask (True takes
    part) that already includes causality. Backward applies softmax's Jacobian inline:
    d scores = p * (dp - sum(dp * p)), never materialising it."""

    def __init__(self, scale, allowed, dropout_p, generator):
        self.scale, self.allowed = scale, allowed
        self.dropout_p, self.generator = dropout_p, generator
        self.kept_scale = 1 / (1 - dropout_p) if dropout_p < 1 else 0.0  # inverted dropout

    def forward(self, q, k, v, *float_mask):
        xp = get_array_module(q)
        scores = matmul(q, xp.swapaxes(k, -1, -2))
        scores *= self.scale
        if float_mask:
            scores = scores + float_mask[0]
        if self.allowed is not None:
            scores = xp.where(self.allowed, scores, -xp.inf).astype(scores.dtype, copy=False)
        p = _masked_softmax(xp, scores)
        attended = p
        self.keep = None
        if self.dropout_p > 0:
            self.keep = random.uniform(p.shape, dtype=p.dtype, device=device_of(p),
                                       generator=self.generator) >= self.dropout_p
            attended = p * self.keep
            attended *= self.kept_scale
        if any(self.needs_input_grad):
            self.q, self.k, self.v, self.p, self.attended = q, k, v, p, attended
            self.mask_shape = float_mask[0].shape if float_mask else None
        return matmul(attended, v)

    def backward(self, gy):
        xp = get_array_module(gy)
        q, k, v, p = self.q, self.k, self.v, self.p
        needs = self.needs_input_grad
        gv = sum_to(matmul(xp.swapaxes(self.attended, -1, -2), gy), v.shape) if needs[2] else None
        g_scores = None
        if needs[0] or needs[1] or (len(needs) > 3 and needs[3]):
            gp = matmul(gy, xp.swapaxes(v, -1, -2))
            if self.keep is not None:
                gp *= self.keep
                gp *= self.kept_scale
            g_scores = p * (gp - (gp * p).sum(axis=-1, keepdims=True))
        g_mask = sum_to(g_scores, self.mask_shape) if len(needs) > 3 and needs[3] else None
        gq = gk = None
        if needs[0] or needs[1]:
            g_scaled = g_scores * self.scale
            gq = sum_to(matmul(g_scaled, k), q.shape) if needs[0] else None
            gk = sum_to(matmul(xp.swapaxes(g_scaled, -1, -2), q), k.shape) if needs[1] else None
        return (gq, gk, gv) if len(needs) == 3 else (gq, gk, gv, g_mask)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, *, mask=None,
                                 generator=None) -> Tensor:
    """Attention over (..., L, E) queries, (..., S, E) keys and (..., S, Ev) values.

    attn_mask (or `mask`) broadcasts to (..., L, S): boolean, True where a query may
    attend to a key (PyTorch's convention), or float, added to the scores. is_causal
    lets query i attend to keys 0..i. scale defaults to 1/sqrt(E). Rows with no key
    to attend to give zeros. Dropout (dropout_p > 0) draws from `generator`.
    """
    if mask is not None:
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention: give attn_mask or mask, not both")
        attn_mask = mask
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: is_causal and attn_mask cannot both be set")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    xp = get_array_module(query)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    allowed, float_mask = None, ()
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        allowed = xp.tril(xp.ones((length, source), dtype=bool))
    elif attn_mask is not None:
        raw = attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)
        # A float mask is cast to the query's dtype (differentiably for a Tensor), so
        # that a float64 mask cannot turn float32 attention and q/k/v's gradients float64.
        if raw.dtype == bool:
            allowed = raw
        elif isinstance(attn_mask, Tensor):
            float_mask = (shapes.to(attn_mask, dtype=query.dtype),)
        else:
            float_mask = (raw.astype(query.dtype, copy=False),)
    function = ScaledDotProductAttention(scale, allowed, dropout_p, generator)
    return function(query, key, value, *float_mask)
