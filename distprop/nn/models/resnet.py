"""A small CIFAR-style residual network (He et al., 2016): BasicBlocks with batch norm
and projection shortcuts."""

from __future__ import annotations

from typing import Sequence

import distprop.functional as F
from distprop.nn import init
from distprop.nn.container import ModuleList, Sequential
from distprop.nn.conv import Conv2d
from distprop.nn.linear import Linear
from distprop.nn.module import Module
from distprop.nn.normalization import BatchNorm2d


class BasicBlock(Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3x3 convolutions.

    The shortcut is the identity, or a 1x1 convolution with batch norm (a projection)
    where the stride or the width changes. Names follow torchvision's (`downsample`).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.downsample = Sequential(Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                         BatchNorm2d(planes))
        else:
            self.downsample = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(Module):
    """3x3 stem, then one stage of BasicBlocks per width (each stage after the first
    halves the resolution), global average pooling and a Linear classifier.

    Convolutions are initialised kaiming_normal_(mode='fan_out', nonlinearity='relu')
    as in torchvision. `zero_init_residual` starts each block's last batch-norm scale
    at 0, so every block begins as the identity (Goyal et al., 2017).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: Sequence[int] = (3, 3, 3), zero_init_residual: bool = False):
        super().__init__()
        if len(widths) != len(blocks_per_stage):
            raise ValueError(f"ResNet: {len(widths)} widths but {len(blocks_per_stage)} block counts")
        self.conv1 = Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for number, (planes, blocks) in enumerate(zip(widths, blocks_per_stage)):
            stride = 1 if number == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(Sequential(*stage))
            in_planes = planes
        self.stages = ModuleList(stages)
        self.fc = Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, Conv2d):
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if zero_init_residual and isinstance(module, BasicBlock):
                init.zeros_(module.bn2.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(F.global_avg_pool2d(x))


def resnet_small(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int | Sequence[int] = 3, zero_init_residual: bool = False) -> ResNet:
    """The CIFAR ResNet family: 3 blocks per stage with widths (16, 32, 64) is ResNet-20."""
    if isinstance(blocks_per_stage, int):
        blocks_per_stage = (blocks_per_stage,) * len(widths)
    return ResNet(num_classes, in_channels, widths, blocks_per_stage, zero_init_residual)
