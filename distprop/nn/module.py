"""`Module`: the base class of layers and models.

A Module owns three ordered registries, filled by plain attribute assignment:
Parameters (learnable Tensors), sub-Modules, and buffers (plain arrays such as
batch norm's running statistics). Everything that walks a model — `named_parameters`,
`state_dict`, the optimizers' state, the data-parallel reducer's buckets — walks
these registries in registration order, so the order is the same on every process
(never a set, never a hash order).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, NamedTuple

import numpy as np

from distprop.backend import device_of, is_gpu_array, normalize_device, to_device
from distprop.autograd import Tensor, zero_grads
from distprop.nn.parameter import Parameter


class IncompatibleKeys(NamedTuple):
    """What a non-strict `load_state_dict` skipped."""

    missing_keys: list
    unexpected_keys: list


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or is_gpu_array(value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Module:
    """Base class of every layer and model; subclasses define `forward`.

    Attribute assignment registers values by type: a `Parameter` goes to the
    parameters, a `Module` to the sub-modules; `register_buffer` declares a buffer.
    Subclasses must call `super().__init__()` before assigning any of these.
    """

    def __init__(self):
        # object.__setattr__ because our own __setattr__ needs these registries.
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers", set())  # membership tests only
        object.__setattr__(self, "_modules", {})

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- registration ------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            if isinstance(value, (Parameter, Module)):
                raise AttributeError(f"cannot assign {type(value).__name__} {name!r} before "
                                     f"{type(self).__name__}.__init__() calls super().__init__()")
            object.__setattr__(self, name, value)
        elif isinstance(value, Parameter):
            self._forget(name, keep=self._parameters)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name, keep=self._modules)
            self._modules[name] = value
        elif name in self._parameters:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} "
                                "(a Parameter or None expected)")
            self._parameters[name] = None
        elif name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} "
                                "(a Module or None expected)")
            self._modules[name] = None
        elif name in self._buffers:
            if value is not None and not _is_array(value):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} "
                                "(a numpy/cupy array or None expected)")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Only called when ordinary lookup fails: the registered values live here.
        for registry in ("_parameters", "_buffers", "_modules"):
            values = self.__dict__.get(registry)
            if values is not None and name in values:
                return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def _forget(self, name: str, keep: dict) -> None:
        """Drop `name` from every registry but `keep` (a name has one kind at a time;
        keeping the entry in `keep` keeps its position when a value is replaced)."""
        self.__dict__.pop(name, None)
        for registry in (self._parameters, self._buffers, self._modules):
            if registry is not keep:
                registry.pop(name, None)
        self._non_persistent_buffers.discard(name)

    def _check_new_name(self, name: str, registry: dict) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"invalid name {name!r}: a non-empty string without '.' expected")
        if name in self.__dict__ or any(name in r for r in (self._parameters, self._buffers, self._modules)
                                        if r is not registry):
            raise KeyError(f"attribute {name!r} already exists on {type(self).__name__}")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` (or None: a declared but absent parameter, like a disabled bias)."""
        self._check_new_name(name, self._parameters)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot register {type(param).__name__} as parameter {name!r} "
                            "(a Parameter or None expected)")
        self._parameters[name] = param

    def register_buffer(self, name: str, array, persistent: bool = True) -> None:
        """Register a plain array (or None) that is part of the state but not learned.

        Persistent buffers appear in `state_dict`; all buffers move with `to()`."""
        self._check_new_name(name, self._buffers)
        if array is not None and not _is_array(array):
            raise TypeError(f"cannot register {type(array).__name__} as buffer {name!r} "
                            "(a numpy/cupy array or None expected)")
        self._buffers[name] = array
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        self._check_new_name(name, self._modules)
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"cannot add {type(module).__name__} as child module {name!r}")
        self._modules[name] = module

    register_module = add_module

    # ---- walking the tree --------------------------------------------------
    def named_modules(self, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """This module and all below it, depth first in registration order, with dotted names.

        A module reachable by two paths is yielded once, under its first name,
        unless `remove_duplicate` is False."""
        seen = set()  # ids of modules yielded; membership only, the walk gives the order
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if remove_duplicate:
                if id(module) in seen:
                    continue
                seen.add(id(module))
            yield name, module
            children = [(_join(name, child_name), child) for child_name, child in module._modules.items()
                        if child is not None]
            stack.extend(reversed(children))  # popped first-registered first

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def _named_members(self, registry: str, prefix: str, recurse: bool, remove_duplicate: bool):
        modules = self.named_modules(prefix, remove_duplicate) if recurse else [(prefix, self)]
        seen = set()  # ids of members yielded (shared weights appear once); membership only
        for module_prefix, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None:
                    continue
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield _join(module_prefix, name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) in registration order, each Parameter once (first name wins)."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, object]]:
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator:
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call fn on every sub-module, children before parents (PyTorch's order), then self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ---- state -------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> OrderedDict:
        """Dotted name -> array for every parameter and persistent buffer.

        Per module, its parameters then its buffers, then its children, as PyTorch
        orders them (so keys match PyTorch's for the same architecture). A shared
        parameter appears under each of its names.

        The arrays ALIAS the live storage, as PyTorch's tensors do: an optimizer step
        or `load_state_dict` changes them. Copy them (e.g. `{k: v.copy() ...}`) to
        keep a snapshot while training goes on. After `to()` they are stale.
        """
        state = OrderedDict()
        for module_prefix, module in self.named_modules(prefix, remove_duplicate=False):
            for name, param in module._parameters.items():
                if param is not None:
                    state[_join(module_prefix, name)] = param.data
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers:
                    state[_join(module_prefix, name)] = buffer
        return state

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values into the existing parameters and buffers, in place.

        The Parameter objects stay the same (optimizers and hooks hold them); values
        are converted to each target's dtype and device. Nothing is copied unless
        every check passes: shape mismatches always raise, and with `strict` so do
        missing and unexpected keys, all listed in one RuntimeError. Returns the
        missing and unexpected keys.
        """
        targets = self.state_dict()
        values = {key: _as_host_or_device_array(value) for key, value in state_dict.items()}
        missing = [key for key in targets if key not in values]
        unexpected = [key for key in values if key not in targets]
        mismatched = [(key, tuple(values[key].shape), tuple(target.shape))
                      for key, target in targets.items()
                      if key in values and tuple(values[key].shape) != tuple(target.shape)]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
        for key, found, expected in mismatched:
            errors.append(f"size mismatch for {key}: copying a param with shape {found} from checkpoint, "
                          f"the shape in current model is {expected}.")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        for key, target in targets.items():
            if key in values:
                target[...] = to_device(values[key], device_of(target))
        return IncompatibleKeys(missing, unexpected)

    # ---- modes, devices, gradients ------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set training mode (dropout active, batch norm on batch statistics) on every module."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for param in self.parameters():
            param.requires_grad = requires_grad
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads(self.parameters(), set_to_none)

    def to(self, device=None, dtype=None) -> Module:
        """Move parameters (with their gradients) and buffers to `device` and cast the
        floating-point ones to `dtype`, in place: every Parameter keeps its identity,
        only its `.data`/`.grad` arrays are replaced. `to(np.float64)` also works."""
        if isinstance(device, (type, np.dtype)):
            device, dtype = None, device
        device = normalize_device(device)
        if dtype is not None:
            dtype = np.dtype(dtype)
            if dtype.kind != "f":
                raise TypeError(f"Module.to only accepts floating point dtypes, got {dtype}")

        def convert(array):
            if device is not None:
                array = to_device(array, device)
            if dtype is not None and array.dtype.kind == "f":
                array = array.astype(dtype, copy=False)
            return array

        for param in self.parameters():
            param.data = convert(param.data)
            if param.grad is not None:
                param.grad = convert(param.grad)
        for module in self.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = convert(buffer)
        return self

    # ---- printing ----------------------------------------------------------
    def extra_repr(self) -> str:
        """The constructor arguments worth printing; layers override it."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = [f"({name}): " + repr(module).replace("\n", "\n  ")
                 for name, module in self._modules.items()]
        if not lines:
            return f"{type(self).__name__}({extra})"
        body = ([extra] if extra else []) + lines
        return f"{type(self).__name__}(\n  " + "\n  ".join(body) + "\n)"


def _as_host_or_device_array(value):
    """An ndarray (numpy or cupy) for a state_dict value: arrays as they are, Tensors
    unwrapped, anything else (numbers, lists, other libraries' tensors) via numpy."""
    if isinstance(value, Tensor):
        return value.data
    return value if _is_array(value) else np.asarray(value)
