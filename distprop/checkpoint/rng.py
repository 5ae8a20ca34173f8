"""The random number generators a training process draws from, as JSON-safe values.

distprop's own generator (`distprop.random`: initialisers, dropout) and, for
scripts that use them, numpy's global generator and Python's `random` module.
"""

from __future__ import annotations

import random as python_random

import numpy as np

from distprop import random as distprop_random


def seed(value: int) -> None:
    """Seed every generator that `capture` saves, from one integer."""
    distprop_random.manual_seed(value)
    np.random.seed(value % 2**32)
    python_random.seed(value)


def capture() -> dict:
    legacy = np.random.get_state(legacy=False)
    legacy["state"] = {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])}
    version, internal, gauss = python_random.getstate()
    return {"distprop": distprop_random.default_generator().bit_generator.state,
            "numpy": legacy,
            "python": [version, list(internal), gauss]}


def restore(state: dict) -> None:
    distprop_random.default_generator().bit_generator.state = state["distprop"]
    legacy = dict(state["numpy"])
    legacy["state"] = {"key": np.array(legacy["state"]["key"], dtype=np.uint32), "pos": legacy["state"]["pos"]}
    np.random.set_state(legacy)
    version, internal, gauss = state["python"]
    python_random.setstate((version, tuple(internal), gauss))
