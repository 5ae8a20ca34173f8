"""distprop: data-parallel neural-network training over MPI, on numpy and cupy arrays."""

from distprop.autograd import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from distprop import functional

__version__ = "0.1.0"
