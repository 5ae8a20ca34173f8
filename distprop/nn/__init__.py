"""Modules, parameters, layers, initialisers and ready models, with PyTorch's names."""

from distprop.nn import init, utils
from distprop.nn.activation import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from distprop.nn.container import ModuleList, Sequential
from distprop.nn.conv import Conv2d
from distprop.nn.dropout import Dropout
from distprop.nn.embedding import Embedding
from distprop.nn.flatten import Flatten
from distprop.nn.linear import Identity, Linear
from distprop.nn.module import IncompatibleKeys, Module
from distprop.nn.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from distprop.nn.parameter import Parameter
from distprop.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from distprop.nn.transformer import MultiheadAttention, TransformerEncoderLayer
from distprop.nn.models import LeNet, MLP, ResNet, TransformerClassifier, resnet_small

__all__ = [
    "Module", "Parameter", "IncompatibleKeys", "init", "utils",
    "Linear", "Identity", "Conv2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Dropout", "Embedding",
    "Sequential", "ModuleList", "Flatten", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "ReLU", "LeakyReLU", "GELU", "Tanh", "Sigmoid", "Softmax", "LogSoftmax",
    "MultiheadAttention", "TransformerEncoderLayer",
    "MLP", "LeNet", "ResNet", "resnet_small", "TransformerClassifier",
]
