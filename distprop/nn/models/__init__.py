"""Ready models: an MLP, a LeNet-style CNN, a small ResNet and a Transformer classifier."""

from distprop.nn.models.lenet import LeNet
from distprop.nn.models.mlp import MLP
from distprop.nn.models.resnet import BasicBlock, ResNet, resnet_small
from distprop.nn.models.transformer import TransformerClassifier

__all__ = ["MLP", "LeNet", "BasicBlock", "ResNet", "resnet_small", "TransformerClassifier"]
