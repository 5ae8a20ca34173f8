"""PyTorch twins of distprop's ready models, for benchmarks that compare the two.

Each twin has the same layers under the same names, so distprop's state_dict loads
into it and both compute the same function from the same weights. torch is never a
dependency of distprop: this module is imported only by benchmarks, where present.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def mlp(in_features, hidden_sizes, num_classes):
    layers = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    def __init__(self, ours):
        """Mirror a distprop LeNet layer by layer (it decides paddings from its input size)."""
        super().__init__()
        self.features = _mirror_sequential(ours.features)
        self.classifier = _mirror_sequential(ours.classifier)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.conv1, self.bn1 = _mirror(ours.conv1), _mirror(ours.bn1)
        self.conv2, self.bn2 = _mirror(ours.conv2), _mirror(ours.bn2)
        self.downsample = None if ours.downsample is None else _mirror_sequential(ours.downsample)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.conv1, self.bn1 = _mirror(ours.conv1), _mirror(ours.bn1)
        self.stages = nn.ModuleList(nn.Sequential(*[BasicBlock(b) for b in stage]) for stage in ours.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = _mirror(ours.fc)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _mirror(layer):
    """The torch layer equivalent to one distprop layer (same hyperparameters)."""
    kind = type(layer).__name__
    if kind == "Conv2d":
        out_channels, in_channels, kh, kw = layer.weight.shape
        return nn.Conv2d(in_channels, out_channels, (kh, kw), stride=layer.stride, padding=layer.padding,
                         bias=layer.bias is not None)
    if kind == "Linear":
        out_features, in_features = layer.weight.shape
        return nn.Linear(in_features, out_features, bias=layer.bias is not None)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if kind == "MaxPool2d":
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "Flatten":
        return nn.Flatten()
    raise TypeError(f"no torch twin for {kind}")


def _mirror_sequential(sequential):
    return nn.Sequential(*[_mirror(layer) for layer in sequential])


def load_weights(twin: nn.Module, ours) -> nn.Module:
    """Copy distprop's parameters and buffers into the twin (float32, on the twin's device)."""
    state = {k: torch.from_numpy(np.array(_host(v))) for k, v in ours.state_dict().items()}
    twin.load_state_dict(state)
    return twin


def _host(array):
    return array.get() if hasattr(array, "get") else array
