"""The optimizer base class: parameter groups, per-parameter state, state_dict."""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import numpy as np

from distprop.autograd import Tensor, enable_grad, zero_grads
from distprop.backend import device_of, is_gpu_array, to_device


class Optimizer:
    """Holds `param_groups` (dicts with 'params' and hyperparameters) and `state`.

    `state` maps a parameter's index in the optimizer's flat order (group by group,
    parameter by parameter) to its dict of arrays. Indices rather than object ids
    make `state_dict()` portable between processes and give it PyTorch's layout:
    `{'state': {index: {...}}, 'param_groups': [{..., 'params': [indices]}]}`.

    Subclasses implement `step()`, updating each `p.data` in place in that same order
    (the data-parallel reducer and every rank rely on both).
    """

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        groups = [params] if isinstance(params, Tensor) else list(_ordered(params, "params"))
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group: dict) -> None:
        """Append a group; hyperparameters it does not set take the optimizer's defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(_ordered(params, "a param group's 'params'"))
        for position, param in enumerate(params):
            if not isinstance(param, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(param).__name__} "
                                f"at position {position} of group {len(self.param_groups)}")
            if not param.is_leaf:
                raise ValueError(f"optimizer can only optimize leaf Tensors (position {position} "
                                 f"of group {len(self.param_groups)} is computed from others)")
        known = {id(p) for group in self.param_groups for p in group["params"]}  # membership only
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids) or known.intersection(ids):
            raise ValueError("some parameters appear more than once in the optimizer's parameter groups")
        group = {**self.defaults, **param_group, "params": params}
        self.param_groups.append(group)

    def _indexed_groups(self) -> Iterator[tuple[dict, Iterable[tuple[int, Tensor]]]]:
        """Each group with its (state index, parameter) pairs."""
        start = 0
        for group in self.param_groups:
            params = group["params"]
            yield group, enumerate(params, start)
            start += len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads((p for group in self.param_groups for p in group["params"]), set_to_none)

    def step(self, closure: Callable | None = None):
        raise NotImplementedError(f"{type(self).__name__} does not define step()")

    @staticmethod
    def _evaluate(closure: Callable | None):
        """Run the closure (which recomputes the loss and its gradients), if given."""
        if closure is None:
            return None
        with enable_grad():
            return closure()

    # ---- checkpoints -------------------------------------------------------
    def state_dict(self) -> dict:
        """{'state': {index: {name: array or number}}, 'param_groups': [...]}.

        The state arrays ALIAS the live ones (as in PyTorch): the next `step()`
        changes them. Serialise or copy before stepping on if a snapshot is wanted.
        """
        groups = []
        start = 0
        for group in self.param_groups:
            saved = {name: value for name, value in group.items() if name != "params"}
            saved["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(saved)
        state = {index: dict(entry) for index, entry in sorted(self.state.items())}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by `state_dict` (here or in another
        process) for the same parameter layout. Arrays are copied onto each parameter's
        device, floating ones in its dtype."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        index_of_saved = {}
        for number, ((_, indexed), saved) in enumerate(zip(self._indexed_groups(), saved_groups)):
            indexed = list(indexed)
            if len(indexed) != len(saved["params"]):
                raise ValueError(f"parameter group {number} has {len(indexed)} parameters, "
                                 f"the loaded state dict has {len(saved['params'])}")
            # int(): formats such as JSON turn the integer keys into strings
            index_of_saved.update((int(saved_index), pair) for saved_index, pair in zip(saved["params"], indexed))
        state = {}
        for saved_index, entry in state_dict["state"].items():
            if int(saved_index) not in index_of_saved:
                raise ValueError(f"loaded state dict has state for parameter {saved_index}, "
                                 "which none of its parameter groups lists")
            index, param = index_of_saved[int(saved_index)]
            state[index] = {name: _state_value(name, value, param, index) for name, value in entry.items()}
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({name: value for name, value in saved.items() if name != "params"})
        self.state = state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for number, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {number}")
            lines.extend(f"    {name}: {value}" for name, value in group.items() if name != "params")
        return "\n".join(lines) + "\n)"


def _ordered(params, what: str):
    """params itself, unless it is a set: a set's order (by object id) differs between
    processes, and state indices, state_dict and every rank's update order follow it."""
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"optimizer {what} must be an ordered collection (a list, or "
                        "model.parameters()), not a set: its order differs between processes")
    return params


def _state_value(name: str, value, param: Tensor, index: int):
    """A loaded state entry, ready for `param`: the step count as an int, arrays as
    fresh copies on the parameter's device (floating ones in its dtype)."""
    if name == "step":
        return int(value)
    if value is None or isinstance(value, (int, float)):
        return value
    array = value.data if isinstance(value, Tensor) else value
    if not (isinstance(array, np.ndarray) or is_gpu_array(array)):
        array = np.asarray(array)
    if array.shape != param.shape:
        raise ValueError(f"optimizer state {name!r} of parameter {index} has shape {array.shape}, "
                         f"the parameter has shape {param.shape}")
    array = to_device(array, device_of(param.data))
    dtype = param.dtype if array.dtype.kind == "f" else array.dtype
    return array.astype(dtype, copy=True)


# Smaller parameters are left to numpy: their arrays stay in cache between its passes,
# and importing numba (about half a second) would cost more than the kernels save.
ONE_PASS_MIN_ELEMENTS = 1 << 15


@functools.cache
def compiled_kernels():
    """`distprop.optim.update_kernels`, or None where numba is not installed."""
    try:
        from distprop.optim import update_kernels
    except ImportError:
        return None
    return update_kernels


def one_pass(data, *others):
    """``(kernels, views)`` for updating parameter `data` in one compiled pass:
    `distprop.optim.update_kernels` and `data` and `others` as 1-D views (None: an
    empty array); or None where the numpy path is taken: small parameters, arrays on
    the GPU, dtypes other than float32 and float64, arrays of another dtype or shape
    than `data`, not contiguous (whose flattened copies would not be written back) or
    read-only (numpy's path says so in its words), or no numba."""
    arrays = [data] + [a for a in others if a is not None]
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable and a.dtype == data.dtype
               and a.shape == data.shape for a in arrays) \
            or data.dtype not in (np.float32, np.float64) or data.size < ONE_PASS_MIN_ELEMENTS:
        return None
    kernels = compiled_kernels()
    if kernels is None:
        return None
    return kernels, [data.reshape(-1)] + [data[:0].reshape(-1) if a is None else a.reshape(-1) for a in others]
