"""Differentiable ops on Tensors, with PyTorch's names, argument names and layouts."""

from distprop.functional.activations import gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from distprop.functional.arithmetic import add, div, matmul, mul, neg, pow, sub
from distprop.functional.attention import scaled_dot_product_attention
from distprop.functional.conv import conv2d
from distprop.functional.dropout import dropout
from distprop.functional.elementwise import abs, clamp, exp, log, sqrt
from distprop.functional.embedding import embedding
from distprop.functional.linear import linear
from distprop.functional.losses import cross_entropy, mse_loss
from distprop.functional.normalization import (batch_norm, batch_norm_moments, batch_norm_stats, batch_norm_train,
                                               layer_norm, update_running_stats)
from distprop.functional.pooling import adaptive_avg_pool2d, avg_pool2d, global_avg_pool2d, max_pool2d
from distprop.functional.reductions import max, mean, sum
from distprop.functional.shapes import concatenate, flatten, getitem, reshape, stack, transpose
