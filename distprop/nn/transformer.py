"""Multi-head attention and the Transformer encoder layer (Vaswani et al., 2017),
with PyTorch's parameter names, so state_dicts load across."""

from __future__ import annotations

from typing import Callable

import distprop.functional as F
from distprop.autograd import Tensor
from distprop.backend import get_array_module
from distprop.nn import init
from distprop.nn.dropout import Dropout
from distprop.nn.linear import Linear
from distprop.nn.module import Module
from distprop.nn.normalization import LayerNorm
from distprop.nn.parameter import Parameter, filled_array


def _as_array(xp, mask):
    """A mask (array, Tensor or nested list) as an array of the module's array type."""
    return xp.asarray(mask.data if isinstance(mask, Tensor) else mask)


class MultiheadAttention(Module):
    """Attention over `num_heads` subspaces of `embed_dim`, through F.scaled_dot_product_attention.

    Parameters as in PyTorch: `in_proj_weight` (3E, E) and `in_proj_bias` stack the
    query, key and value projections; `out_proj` is a Linear. Inputs are (L, N, E),
    or (N, L, E) with `batch_first`. `key_padding_mask` (N, S) and a boolean
    `attn_mask` (L, S) mark with True the positions NOT to attend to (PyTorch's MHA
    convention); a float `attn_mask` is added to the scores; `is_causal` lets position
    i attend to positions 0..i (it needs no `attn_mask`, unlike PyTorch's hint).

    Returns `(output, None)`: the attention weights are not computed (unlike PyTorch's
    default need_weights=True), as the fused attention op never forms them for us.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = Parameter(filled_array((3 * embed_dim, embed_dim), dtype=dtype, device=device))
        if bias:
            self.in_proj_bias = Parameter(filled_array((3 * embed_dim,), dtype=dtype, device=device))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        init.xavier_uniform_(self.in_proj_weight)
        if bias:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def _project(self, x, part: int):
        """The query (0), key (1) or value (2) projection of x, as (N, heads, L, head_dim)."""
        e = self.embed_dim
        weight = self.in_proj_weight[part * e:(part + 1) * e]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part * e:(part + 1) * e]
        n, length = x.shape[0], x.shape[1]
        y = F.linear(x, weight, bias)
        return y.reshape(n, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    @staticmethod
    def _attention_mask(xp, key_padding_mask, attn_mask, is_causal, batch, target_length, source_length):
        """One mask for F.scaled_dot_product_attention (boolean, True = attend; or additive
        floats with -inf where not allowed), or None."""
        allowed, additive = None, None
        if attn_mask is not None:
            attn_mask = _as_array(xp, attn_mask)
            if attn_mask.dtype == bool:
                allowed = ~attn_mask
            else:
                additive = attn_mask
        if key_padding_mask is not None:
            keep = ~_as_array(xp, key_padding_mask).reshape(batch, 1, 1, source_length)
            allowed = keep if allowed is None else allowed & keep
        if is_causal:
            causal = xp.tril(xp.ones((target_length, source_length), dtype=bool))
            allowed = causal if allowed is None else allowed & causal
        if additive is None or allowed is None:
            return allowed if additive is None else additive
        return xp.where(allowed, additive, -xp.inf).astype(additive.dtype, copy=False)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal: bool = False):
        self_attention = query is key and key is value
        if not self.batch_first:  # work in (N, L, E)
            query = query.transpose(1, 0, 2)
            key, value = (query, query) if self_attention else (key.transpose(1, 0, 2), value.transpose(1, 0, 2))
        n, length = query.shape[0], query.shape[1]
        if self_attention:  # one GEMM for q, k and v
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        mask = self._attention_mask(get_array_module(q), key_padding_mask, attn_mask, is_causal,
                                    n, length, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(0, 2, 1, 3).reshape(n, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(1, 0, 2)
        return out, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class TransformerEncoderLayer(Module):
    """Self-attention then a feed-forward network, each with a residual connection,
    dropout and layer norm. Post-norm by default (as in the original paper and
    PyTorch); `norm_first=True` gives the pre-norm variant, which trains more stably
    without warmup. Names and arguments follow torch.nn.TransformerEncoderLayer.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first, device, dtype)
        self.linear1 = Linear(d_model, dim_feedforward, bias, device, dtype)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias, device, dtype)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, layer_norm_eps, bias=bias, device=device, dtype=dtype)
        self.norm2 = LayerNorm(d_model, layer_norm_eps, bias=bias, device=device, dtype=dtype)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
            activation = _ACTIVATIONS[activation]
        self.activation = activation

    def _self_attention(self, x, mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=mask, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._self_attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))
