"""Differentiable ops on Tensors, with PyTorch's names, argument names and layouts."""

from distprop.functional.activations import relu, sigmoid, tanh
from distprop.functional.arithmetic import add, div, matmul, mul, neg, pow, sub
from distprop.functional.elementwise import abs, clamp, exp, log, sqrt
from distprop.functional.linear import linear
from distprop.functional.losses import cross_entropy, mse_loss
from distprop.functional.reductions import max, mean, sum
from distprop.functional.shapes import concatenate, flatten, getitem, reshape, stack, transpose
