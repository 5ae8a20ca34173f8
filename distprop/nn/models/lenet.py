"""A LeNet-5 style convolutional network (LeCun et al., 1998), with ReLU and max pooling."""

from __future__ import annotations

from typing import Sequence

from distprop.functional.conv import as_pair
from distprop.nn.activation import ReLU
from distprop.nn.container import Sequential
from distprop.nn.conv import Conv2d
from distprop.nn.models.mlp import MLP
from distprop.nn.module import Module
from distprop.nn.pooling import MaxPool2d


class LeNet(Module):
    """conv5x5 -> ReLU -> maxpool2 -> conv5x5 -> ReLU -> maxpool2 -> two hidden Linear layers -> classes.

    For 1x28x28 input with the default widths this is LeNet-5: the first convolution
    pads by 2, the second is 'valid' (14x14 -> 10x10), leaving 16 maps of 5x5. Where
    a 'valid' second convolution would leave less than 2x2 after pooling (e.g. the
    8x8 UCI digits), it pads by 2 instead so the spatial layout survives.
    `input_size` is the image height and width (an int or a pair).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size=28,
                 channels: Sequence[int] = (6, 16), hidden_sizes: Sequence[int] = (120, 84),
                 dropout: float = 0.0):
        super().__init__()
        height, width = as_pair(input_size, "LeNet: input_size")
        height, width = height // 2, width // 2  # conv1 keeps the size, the pool halves it
        valid_fits = min(height, width) - 4 >= 4
        padding = 0 if valid_fits else 2
        height, width = (height - 4 + 2 * padding) // 2, (width - 4 + 2 * padding) // 2
        if min(height, width) < 1:
            raise ValueError(f"LeNet: input size {input_size} is too small (at least 4x4 needed)")
        self.features = Sequential(
            Conv2d(in_channels, channels[0], 5, padding=2), ReLU(), MaxPool2d(2),
            Conv2d(channels[0], channels[1], 5, padding=padding), ReLU(), MaxPool2d(2),
        )
        # Flatten, then the hidden Linear/ReLU(/Dropout) layers: an MLP (a Sequential,
        # so the state_dict keys are those of the same torch.nn.Sequential).
        self.classifier = MLP(channels[1] * height * width, hidden_sizes, num_classes, dropout=dropout)

    def forward(self, x):
        return self.classifier(self.features(x))
