"""Nested training state as JSON plus named arrays, so that nothing needs pickle.

`split(tree, prefix)` walks dicts, lists and tuples; every array is replaced by a
reference ``{"__array__": name}`` and collected under that name (for a safetensors
file); everything else must be a JSON value. `join` puts the arrays back. What
JSON cannot say directly is tagged, so a round trip gives back equal values of the
same types: tuples (``{"__tuple__": [...]}``), dicts whose keys are not all
strings, or that could be mistaken for a tag (``{"__items__": [[key, value],
...]}``, e.g. an optimizer's state keyed by parameter index). Floats round-trip
exactly: Python writes the shortest repr that reads back as the same double.
"""

from __future__ import annotations

import numpy as np

from distprop.backend import is_gpu_array, to_numpy

ARRAY, TUPLE, ITEMS = "__array__", "__tuple__", "__items__"
_TAGS = (ARRAY, TUPLE, ITEMS)


def is_array(value) -> bool:
    return isinstance(value, np.ndarray) or is_gpu_array(value)


def split(tree, prefix: str) -> tuple[object, dict[str, np.ndarray]]:
    """(JSON-safe skeleton, {name: contiguous host array}); names are dotted paths
    below `prefix` (e.g. ``optimizer.state.0.exp_avg``)."""
    arrays: dict[str, np.ndarray] = {}
    return _split(tree, prefix, arrays), arrays


def _split(value, path: str, arrays: dict):
    if is_array(value):
        name = path
        while name in arrays:  # a key containing a dot could spell another path
            name += "_"
        arrays[name] = np.asarray(to_numpy(value), order="C")  # keeps 0-d arrays 0-d
        return {ARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [_split(v, _child(path, i), arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, _child(path, i), arrays) for i, v in enumerate(value)]
    if isinstance(value, dict):
        tag_like = len(value) == 1 and next(iter(value)) in _TAGS
        plain = all(isinstance(k, str) for k in value) and not tag_like
        if plain:
            return {k: _split(v, _child(path, k), arrays) for k, v in value.items()}
        return {ITEMS: [[_split(k, _child(path, "key"), arrays), _split(v, _child(path, k), arrays)]
                        for k, v in value.items()]}
    raise TypeError(f"{path or 'the state'}: a checkpoint stores numbers, strings, None, lists, tuples, dicts "
                    f"and arrays, not {type(value).__name__}")


def _child(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def join(skeleton, arrays: dict[str, np.ndarray]):
    """The tree `split` took apart, with its arrays (KeyError naming a missing one)."""
    if isinstance(skeleton, list):
        return [join(v, arrays) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        (tag, content), = skeleton.items()
        if tag == ARRAY:
            if content not in arrays:
                raise KeyError(f"array {content!r} is referenced but missing")
            return arrays[content]
        if tag == TUPLE:
            return tuple(join(v, arrays) for v in content)
        if tag == ITEMS:
            return {join(k, arrays): join(v, arrays) for k, v in content}
    return {k: join(v, arrays) for k, v in skeleton.items()}
