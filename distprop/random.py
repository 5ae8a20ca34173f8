"""Random numbers for initialisation and dropout, seedable with `manual_seed`.

Draws come from a numpy Generator. On the GPU, a draw seeds cupy's generator from
it, so one seed reproduces a run on either device (the streams differ between
devices, not between runs).
"""

from __future__ import annotations

import numpy as np

from distprop.backend import cupy_module, normalize_device

_default = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the default generator (initialisers and dropout use it unless given one)."""
    global _default
    _default = np.random.default_rng(seed)
    return _default


def default_generator() -> np.random.Generator:
    return _default


def uniform(shape, low=0.0, high=1.0, dtype=np.float32, device=None, generator=None):
    """An array of uniform draws in [low, high) on `device` ('cpu' or 'gpu')."""
    generator = generator or _default
    if normalize_device(device) == "gpu":
        cp = cupy_module()
        gpu_rng = cp.random.default_rng(int(generator.integers(2**63)))
        return (gpu_rng.random(shape, dtype=np.float64) * (high - low) + low).astype(dtype)
    return (generator.random(shape) * (high - low) + low).astype(dtype, copy=False)


def normal(shape, mean=0.0, std=1.0, dtype=np.float32, device=None, generator=None):
    """An array of normal draws on `device`."""
    generator = generator or _default
    if normalize_device(device) == "gpu":
        cp = cupy_module()
        gpu_rng = cp.random.default_rng(int(generator.integers(2**63)))
        return (gpu_rng.standard_normal(shape, dtype=np.float64) * std + mean).astype(dtype)
    return (generator.standard_normal(shape) * std + mean).astype(dtype, copy=False)
