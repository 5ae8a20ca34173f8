"""Optimizers, learning-rate schedules and gradient clipping, with PyTorch's names and rules."""

from distprop.nn.utils import clip_grad_norm_
from distprop.optim import lr_scheduler
from distprop.optim.adam import Adam, AdamW
from distprop.optim.optimizer import Optimizer
from distprop.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm_", "lr_scheduler"]
