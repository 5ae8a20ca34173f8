"""MultiheadAttention and TransformerEncoderLayer against PyTorch (weights copied by state_dict)."""

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from helpers import requires_torch, torch
from module_parity import compare_module

N, L, S, E, HEADS = 2, 5, 4, 8, 2


def causal_mask(length):
    return np.triu(np.ones((length, length), dtype=bool), k=1)  # True = may not attend (PyTorch's MHA)


def padding_mask(batch, length):
    mask = np.zeros((batch, length), dtype=bool)
    mask[0, -2:] = True  # the first sequence ends two positions early
    return mask


@requires_torch
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention(batch_first, device, rng):
    x = rng.standard_normal((N, L, E) if batch_first else (L, N, E))

    def attend(module, x):
        return module(x, x, x)

    ours = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    theirs = torch.nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    _compare_attention(ours, theirs, attend, x, device=device)


def _compare_attention(ours, theirs, call, *inputs, device="cpu", **masks):
    """compare_module for attention called as `call(module, *inputs, **masks)`; the
    masks are numpy arrays, given to torch as tensors."""

    class OursWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = ours

        def forward(self, *args):
            return call(self.attention, *args, **_converted(masks, torch_side=False))

    class TheirsWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = theirs

        def forward(self, *args):
            return call(self.attention, *args, **_converted(masks, torch_side=True))

    compare_module(OursWrapper(), TheirsWrapper(), *inputs, device=device)


def _converted(masks, torch_side):
    return {k: (torch.tensor(v) if torch_side else v) for k, v in masks.items()}


@requires_torch
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # float + bool, on purpose
def test_cross_attention_with_masks(rng):
    query, memory = rng.standard_normal((N, L, E)), rng.standard_normal((N, S, E))
    key_padding = padding_mask(N, S)

    def attend(module, q, kv, **masks):
        return module(q, kv, kv, **masks)

    ours, theirs = nn.MultiheadAttention(E, HEADS, batch_first=True), torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
    _compare_attention(ours, theirs, attend, query, memory, key_padding_mask=key_padding)
    float_mask = rng.standard_normal((L, S))
    ours, theirs = nn.MultiheadAttention(E, HEADS, batch_first=True), torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
    _compare_attention(ours, theirs, attend, query, memory, attn_mask=float_mask, key_padding_mask=key_padding)


@requires_torch
def test_boolean_and_causal_masks(rng):
    x = rng.standard_normal((N, L, E))

    def attend(module, x, **masks):
        return module(x, x, x, **masks)

    def pair(bias=True):
        return (nn.MultiheadAttention(E, HEADS, batch_first=True, bias=bias),
                torch.nn.MultiheadAttention(E, HEADS, batch_first=True, bias=bias))

    _compare_attention(*pair(), attend, x, attn_mask=causal_mask(L), key_padding_mask=padding_mask(N, L))
    _compare_attention(*pair(bias=False), attend, x, attn_mask=causal_mask(L))

    # is_causal alone means the causal mask here (PyTorch's is_causal is a hint that needs the mask too)
    def attend_causally(module, x):
        if isinstance(module, nn.Module):
            return module(x, x, x, is_causal=True)
        return module(x, x, x, attn_mask=torch.tensor(causal_mask(L)))

    _compare_attention(*pair(), attend_causally, x)


@requires_torch
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_pytorch(norm_first, activation, batch_first, device, rng):
    kwargs = dict(dim_feedforward=16, dropout=0.0, activation=activation, batch_first=batch_first,
                  norm_first=norm_first)
    x = rng.standard_normal((N, L, E) if batch_first else (L, N, E))
    compare_module(nn.TransformerEncoderLayer(E, HEADS, **kwargs), torch.nn.TransformerEncoderLayer(E, HEADS, **kwargs),
                   x, device=device, src_key_padding_mask=None)


@requires_torch
def test_encoder_layer_with_padding_mask(rng):
    kwargs = dict(dim_feedforward=16, dropout=0.0, batch_first=True)
    x = rng.standard_normal((N, L, E))
    ours, theirs = nn.TransformerEncoderLayer(E, HEADS, **kwargs), torch.nn.TransformerEncoderLayer(E, HEADS, **kwargs)

    class OursWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = ours

        def forward(self, x):
            return self.layer(x, src_key_padding_mask=padding_mask(N, L))

    class TheirsWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = theirs

        def forward(self, x):
            return self.layer(x, src_key_padding_mask=torch.tensor(padding_mask(N, L)))

    compare_module(OursWrapper(), TheirsWrapper(), x)


def test_attention_dropout_only_in_training(rng):
    layer = nn.MultiheadAttention(E, HEADS, dropout=0.5, batch_first=True)
    x = dp.tensor(rng.standard_normal((N, L, E)).astype(np.float32))
    layer.eval()
    first, second = layer(x, x, x)[0].data, layer(x, x, x)[0].data
    np.testing.assert_array_equal(first, second)
    layer.train()
    assert not np.array_equal(layer(x, x, x)[0].data, first)
    assert layer(x, x, x)[1] is None
    with pytest.raises(ValueError, match="divisible"):
        nn.MultiheadAttention(6, 4)
