"""The job's models, sized from the config and the dataset's input column, and the
step that turns a batch's input column into what the model takes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from distprop import nn
from distprop.autograd import Tensor
from distprop.backend import get_array_module
from distprop.data import ColumnSpec
from distprop.errors import ConfigError


def build_model(config, spec: ColumnSpec, num_classes: int) -> nn.Module:
    shape = spec.shape
    if config.model == "mlp":
        return nn.MLP(int(math.prod(shape)), config.hidden_sizes, num_classes, dropout=config.dropout)
    if config.model == "lenet":
        channels, height, width = _image_shape(config, spec)
        return nn.LeNet(num_classes, in_channels=channels, input_size=(height, width),
                        channels=config.channels, hidden_sizes=config.hidden_sizes,
                        dropout=config.dropout)
    if config.model == "resnet20":
        if config.dropout:
            raise ConfigError("dropout: resnet20 has no dropout layers")
        channels, _, _ = _image_shape(config, spec)
        return nn.resnet_small(num_classes, channels, config.widths, config.blocks_per_stage)
    if config.model == "transformer":
        if config.d_model % config.nhead:
            raise ConfigError(f"d_model ({config.d_model}) must be divisible by nhead ({config.nhead})")
        length, features = _sequence_shape(config, spec)
        tokens = {"vocab_size": config.vocab_size} if features is None else {"input_dim": features}
        return nn.TransformerClassifier(num_classes, d_model=config.d_model, nhead=config.nhead,
                                        num_layers=config.num_layers, dim_feedforward=config.dim_feedforward,
                                        max_len=length, dropout=config.dropout, **tokens)
    raise ConfigError(f"unknown model '{config.model}'")


def _image_shape(config, spec: ColumnSpec) -> tuple[int, int, int]:
    if len(spec.shape) == 3:
        return spec.shape
    if len(spec.shape) == 2:
        return (1,) + spec.shape
    raise ConfigError(f"model {config.model} takes images (C, H, W) or (H, W); column '{spec.name}' holds "
                      f"{spec.describe()}")


def _sequence_shape(config, spec: ColumnSpec) -> tuple[int, int | None]:
    """(length, features per position), features None for token ids."""
    if spec.dtype.kind in "iu" and len(spec.shape) == 1:
        if config.vocab_size is None:
            raise ConfigError(f"column '{spec.name}' holds token ids ({spec.describe()}): set vocab_size")
        return spec.shape[0], None
    if len(spec.shape) == 2:
        return spec.shape
    if len(spec.shape) == 3:  # an image: its rows are the sequence
        channels, height, width = spec.shape
        return height, channels * width
    raise ConfigError(f"model transformer takes token ids (L,), feature sequences (L, D) or images (C, H, W); "
                      f"column '{spec.name}' holds {spec.describe()}")


def input_preparer(config, spec: ColumnSpec) -> Callable:
    """batch column -> model input: floats as float32 (uint8 pixels scaled to [0, 1]),
    token ids as they are, images reshaped where the model reads them differently."""
    tokens = config.model == "transformer" and spec.dtype.kind in "iu" and len(spec.shape) == 1
    scale = 1 / 255 if spec.dtype == np.uint8 else None
    shape = spec.shape
    if config.model == "lenet" and len(shape) == 2:
        reshape = (1,) + shape
    elif config.model == "transformer" and len(shape) == 3:
        reshape = "rows"
    else:
        reshape = None

    def prepare(array) -> Tensor:
        if tokens:
            return Tensor(array)
        xp = get_array_module(array)
        x = array.astype(np.float32) if array.dtype != np.float32 else array
        if scale is not None:
            x *= np.float32(scale)
        if reshape == "rows":  # (N, C, H, W) -> (N, H, W * C): one position per image row
            n, channels, height, width = x.shape
            x = xp.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n, height, width * channels)
        elif reshape is not None:
            x = x.reshape((len(x),) + reshape)
        return Tensor(x)

    return prepare
