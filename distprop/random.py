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
    """An array of uniform draws in [low, high) on `device` ('cpu' or 'gpu'). The draws
    are float64 rounded to `dtype`, so a float32 one can round up to `high` itself."""
    generator = generator or _default
    if normalize_device(device) == "gpu":
        draws = _gpu_generator(generator).random(shape, dtype=np.float64)
    else:
        draws = generator.random(shape)
    return _scaled(draws, high - low, low, dtype)


def normal(shape, mean=0.0, std=1.0, dtype=np.float32, device=None, generator=None):
    """An array of normal draws on `device`."""
    generator = generator or _default
    if normalize_device(device) == "gpu":
        draws = _gpu_generator(generator).standard_normal(shape, dtype=np.float64)
    else:
        draws = generator.standard_normal(shape)
    return _scaled(draws, std, mean, dtype)


def _gpu_generator(generator: np.random.Generator):
    """A cupy Generator seeded from `generator` (one draw from it)."""
    return cupy_module().random.default_rng(int(generator.integers(2**63)))


def _scaled(draws, scale, shift, dtype):
    """draws * scale + shift in `dtype`: in place on the fresh float64 draws (the same
    numbers as out of place, without two more temporaries the size of the draws)."""
    if scale != 1:
        draws *= scale
    if shift != 0:
        draws += shift
    return draws.astype(dtype, copy=False)
