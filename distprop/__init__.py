"""distprop: data-parallel neural-network training over MPI, on numpy and cupy arrays."""

from distprop.host_memory import retain_freed_memory

retain_freed_memory()  # reuse freed arrays' pages: see distprop.host_memory

from distprop.autograd import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from distprop.cpu_threads import get_num_threads, set_num_threads
from distprop.random import manual_seed
from distprop import functional, nn, optim
from distprop.parallel import DataParallel, SyncBatchNorm, init

__version__ = "0.1.0"
