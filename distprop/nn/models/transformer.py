"""A small Transformer encoder classifier for token or feature sequences."""

from __future__ import annotations

from distprop.autograd import Tensor
from distprop.backend import get_array_module
from distprop.nn import init
from distprop.nn.container import ModuleList
from distprop.nn.embedding import Embedding
from distprop.nn.linear import Linear
from distprop.nn.module import Module
from distprop.nn.normalization import LayerNorm
from distprop.nn.parameter import Parameter, filled_array
from distprop.nn.transformer import TransformerEncoderLayer


class TransformerClassifier(Module):
    """Embed a sequence, add learned position embeddings, run pre-norm encoder layers,
    average over positions and classify.

    Input is either token ids (N, L) with `vocab_size`, or feature vectors (N, L,
    input_dim) with `input_dim` (e.g. the rows of an image as a sequence of length H).
    The layers are pre-norm (`norm_first=True`, with a final LayerNorm): they train
    stably without a warmup. With `padding_idx`, padded tokens are masked out of the
    attention and of the average.
    """

    def __init__(self, num_classes: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 128, dropout: float = 0.1,
                 vocab_size: int | None = None, input_dim: int | None = None, padding_idx: int | None = None):
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError("TransformerClassifier needs exactly one of vocab_size (token ids) "
                             "and input_dim (feature vectors)")
        if padding_idx is not None and vocab_size is None:
            raise ValueError("padding_idx applies to token ids: give vocab_size")
        self.max_len, self.padding_idx = max_len, padding_idx
        if vocab_size is not None:
            self.embed = Embedding(vocab_size, d_model, padding_idx=padding_idx)
        else:
            self.embed = Linear(input_dim, d_model)
        self.position = Parameter(filled_array((max_len, d_model)))
        init.normal_(self.position, std=0.02)
        self.layers = ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation="gelu",
                                    batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = LayerNorm(d_model)
        self.head = Linear(d_model, num_classes)

    def forward(self, x):
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of length {length} is longer than max_len={self.max_len}")
        padding = None
        if self.padding_idx is not None:
            padding = (x.data if isinstance(x, Tensor) else x) == self.padding_idx  # (N, L), True where padded
        h = self.embed(x) + self.position[:length]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
        h = self.norm(h)
        if padding is None:
            pooled = h.mean(axis=1)
        else:
            keep = (~padding).astype(h.dtype)
            counts = get_array_module(keep).maximum(keep.sum(axis=1, keepdims=True), 1)
            pooled = (h * keep[:, :, None]).sum(axis=1) / counts
        return self.head(pooled)
