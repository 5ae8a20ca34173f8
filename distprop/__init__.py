"""distprop: data-parallel neural-network training over MPI, on numpy and cupy arrays."""

from distprop.host_memory import retain_freed_memory

retain_freed_memory()  # reuse freed arrays' pages: see distprop.host_memory

from distprop.autograd import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from distprop.cpu_threads import get_num_threads, set_num_threads
from distprop.random import manual_seed
from distprop import functional, nn, optim
from distprop.parallel import DataParallel, SyncBatchNorm, init

__version__ = "0.1.0"

# Imported on first use (PEP 562), as numpy and scipy do: `dp.data.ArrowLoader` works
# after a plain `import distprop`, which itself stays free of pyarrow, safetensors,
# tqdm and cupy.
_SUBMODULES = ("backend", "bench", "checkpoint", "data", "errors", "launcher", "parallel", "random", "scaling",
               "train")
_FROM_SUBMODULES = {"save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint"}


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"distprop.{name}")
    if name in _FROM_SUBMODULES:
        return getattr(importlib.import_module(f"distprop.{_FROM_SUBMODULES[name]}"), name)
    raise AttributeError(f"module 'distprop' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FROM_SUBMODULES))
