"""Tensors and reverse-mode automatic differentiation, recorded as the code runs.

A `Tensor` wraps a numpy or cupy array. Calling a `Function` (one differentiable
op) on tensors computes its result from the raw arrays and, when gradients are
wanted, records the op as the result's `creator`, so that `backward()` can walk
the graph from the result back to the leaves.

The walk is iterative (no recursion limit): it first counts, for every recorded op
and every leaf, how many edges of the graph lead into it; an op runs its backward
only once all of its consumers have handed over their gradient, so each op sees
its complete output gradient exactly once. A leaf's gradient is final when its last
edge has been processed; its post-accumulate hooks fire at that moment, while the
rest of the walk continues (the data-parallel reducer starts communication there).
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np

from distprop.backend import DEFAULT_DTYPE, device_of, get_array_module, is_gpu_array, to_device

_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_mode, "enabled", True)


class _GradMode:
    """Sets whether ops record the graph, for a `with` block or a decorated function."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = is_grad_enabled()
        _mode.enabled = self.enabled

    def __exit__(self, *exc):
        _mode.enabled = self.previous

    def __call__(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with _GradMode(self.enabled):
                return function(*args, **kwargs)

        return wrapper


def no_grad() -> _GradMode:
    """Context manager (or decorator) inside which ops record nothing."""
    return _GradMode(False)


def enable_grad() -> _GradMode:
    return _GradMode(True)


def _as_array(data, dtype=None):
    """An ndarray for `data`, without copying arrays that already are one."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray) or is_gpu_array(data):
        return data if dtype is None else data.astype(dtype, copy=False)
    array = np.asarray(data, dtype=dtype)
    if dtype is None and array.dtype == np.float64 and not isinstance(data, (np.ndarray, np.generic)):
        array = array.astype(DEFAULT_DTYPE)  # Python floats become float32, like PyTorch
    return array


class RemovableHandle:
    """Returned by hook registration; `remove()` unregisters the hook."""

    def __init__(self, hooks: list, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


class Tensor:
    """An array plus what autograd needs: `grad`, `requires_grad` and the op that made it."""

    __slots__ = ("data", "grad", "requires_grad", "creator", "grad_buffer", "_hooks", "__weakref__")
    __array_priority__ = 1000  # numpy defers `array * tensor` to Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator: Function | None = None
        # Where a leaf would like its next gradient written when .grad is None (the
        # data-parallel reducer points it into its bucket, which saves a copy).
        self.grad_buffer = None
        self._hooks: list | None = None

    # ---- array facts -------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    device = property(lambda self: device_of(self.data))

    @property
    def is_leaf(self) -> bool:
        return self.creator is None

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return len(self.data)

    def item(self):
        return self.data.item()

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (copied from the GPU if it lives there)."""
        return self.data.get() if self.device == "gpu" else self.data

    def detach(self) -> "Tensor":
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        self.requires_grad = requires_grad
        return self

    def to(self, device=None, dtype=None) -> "Tensor":
        """A tensor on `device` and of `dtype` (itself where nothing changes); differentiable."""
        from distprop.functional import shapes

        return shapes.to(self, device=device, dtype=dtype)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({self.data!r}{grad})"

    def __bool__(self):
        return bool(self.data)

    # ---- autograd ----------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` (see `backward`)."""
        backward(self, grad, retain_graph)

    def register_post_accumulate_grad_hook(self, hook: Callable[["Tensor"], None]) -> RemovableHandle:
        """Call `hook(tensor)` as soon as this leaf's `.grad` is final in a backward pass."""
        if self.creator is not None:
            raise RuntimeError("post-accumulate-grad hooks can only be registered on leaf tensors")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return RemovableHandle(self._hooks, hook)

    # ---- operators (the ops themselves live in distprop.functional) ----------
    def __add__(self, other):
        return arithmetic.add(self, other)

    def __radd__(self, other):
        return arithmetic.add(other, self)

    def __sub__(self, other):
        return arithmetic.sub(self, other)

    def __rsub__(self, other):
        return arithmetic.sub(other, self)

    def __mul__(self, other):
        return arithmetic.mul(self, other)

    def __rmul__(self, other):
        return arithmetic.mul(other, self)

    def __truediv__(self, other):
        return arithmetic.div(self, other)

    def __rtruediv__(self, other):
        return arithmetic.div(other, self)

    def __pow__(self, other):
        return arithmetic.pow(self, other)

    def __rpow__(self, other):
        return arithmetic.pow(other, self)

    def __matmul__(self, other):
        return arithmetic.matmul(self, other)

    def __rmatmul__(self, other):
        return arithmetic.matmul(other, self)

    def __neg__(self):
        return arithmetic.neg(self)

    def __getitem__(self, index):
        return shapes.getitem(self, index)

    # Comparisons give plain arrays: they have no gradient.
    def __lt__(self, other):
        return self.data < _raw(other)

    def __le__(self, other):
        return self.data <= _raw(other)

    def __gt__(self, other):
        return self.data > _raw(other)

    def __ge__(self, other):
        return self.data >= _raw(other)

    @property
    def T(self):
        return shapes.transpose(self)

    def transpose(self, *axes):
        return shapes.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes or None)

    def reshape(self, *shape):
        return shapes.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        return shapes.flatten(self, start_dim, end_dim)

    def sum(self, axis=None, keepdims: bool = False):
        return reductions.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return reductions.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return reductions.max(self, axis, keepdims)

    def exp(self):
        return elementwise.exp(self)

    def log(self):
        return elementwise.log(self)

    def sqrt(self):
        return elementwise.sqrt(self)

    def tanh(self):
        return activations.tanh(self)

    def sigmoid(self):
        return activations.sigmoid(self)

    def relu(self):
        return activations.relu(self)


def zero_grads(tensors, set_to_none: bool = True) -> None:
    """Clear each tensor's gradient: drop it (the default; the next backward makes a
    fresh one) or fill it with zeros in place."""
    for t in tensors:
        if t.grad is None:
            continue
        if set_to_none:
            t.grad = None
        else:
            t.grad[...] = 0


def _raw(value):
    return value.data if isinstance(value, Tensor) else value


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """A Tensor wrapping `data` (a numpy/cupy array is wrapped as is, not copied).

    Python floats and lists of them become float32; arrays keep their dtype.
    """
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """`value` itself if it is a Tensor, else a constant tensor. Python numbers take
    the dtype and device of `like`, so `x * 2` stays float32 on x's device."""
    if isinstance(value, Tensor):
        return value
    if like is not None and isinstance(value, (int, float, bool)):
        xp = get_array_module(like.data)
        kind = like.data.dtype.kind
        dtype = like.data.dtype if kind == "f" or (kind in "iu" and isinstance(value, int)) else None
        return Tensor(xp.asarray(value, dtype=dtype))
    array = _as_array(value)
    if like is not None:
        array = to_device(array, like.device)
    return Tensor(array)


class Function:
    """One differentiable op.

    Subclasses implement `forward(*arrays) -> array` on raw arrays and
    `backward(grad_output) -> tuple` with one gradient (or None) per input. State
    needed by backward is kept on `self`; `self.needs_input_grad` is set before
    `forward` runs so that an op can skip saving (and computing) what is not needed.

    Contract for `backward`: return, for each input, an array of exactly that
    input's shape and dtype; it may be `grad_output` itself or a view, but never an
    array that is stored elsewhere (the engine accumulates into fresh arrays in
    place). Before `backward` runs, the engine may set `self.grad_out`, a dict
    {input index: array}: that input is a leaf whose whole gradient comes from this
    op and which asks for it in that array (its `grad_buffer`). An op may write the
    gradient there (e.g. with matmul's `out=`) and return that very array; ops that
    ignore it cost one copy, nothing else.
    """

    needs_input_grad: tuple = ()

    def __call__(self, *inputs) -> Tensor:
        like = next(x for x in inputs if isinstance(x, Tensor))
        tensors = tuple(as_tensor(x, like) for x in inputs)
        record = is_grad_enabled() and any(t.requires_grad for t in tensors)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors) if record else (False,) * len(tensors)
        y = self.forward(*(t.data for t in tensors))
        if isinstance(y, np.generic):  # numpy reductions give scalars; keep arrays
            y = np.asarray(y)
        out = Tensor(y, requires_grad=record)
        if record:
            self.inputs = tensors
            out.creator = self
        return out

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def _release(self) -> None:
        """Drop inputs and saved arrays once backward has run (unless the graph is retained)."""
        self.__dict__.clear()
        self.released = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


_backward_pass = threading.local()


def queue_callback(callback: Callable[[], None], on_failure: Callable[[], None] | None = None) -> None:
    """Run `callback()` once the backward walk in progress has finished, before
    `backward()` returns. Only callable from inside a backward pass (an op's
    backward or a hook): the data-parallel reducer uses it to wait for its
    allreduces and to reduce the gradients no op produced. If the pass raises
    before `callback` runs, `on_failure()` runs instead (the reducer then winds
    down its half-done pass, so that the next one starts afresh)."""
    callbacks = getattr(_backward_pass, "callbacks", None)
    if callbacks is None:
        raise RuntimeError("queue_callback() called outside of a backward pass")
    callbacks.append((callback, on_failure))


def _is_fresh(array) -> bool:
    """True for an array that owns its memory and can take in-place updates."""
    return array.base is None and getattr(array.flags, "writeable", True)


def _check_grad(fn, index, tensor, gx):
    if gx.shape != tensor.shape:
        raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape {gx.shape} "
                           f"for input {index} of shape {tensor.shape}")


def backward(root: Tensor, grad=None, retain_graph: bool = False) -> None:
    """Propagate `grad` (default: 1 for a one-element `root`) back through the graph.

    Leaf tensors that require grad get the gradient added to their `.grad`; their
    post-accumulate hooks fire as soon as it is final. Saved arrays of each op are
    released as the walk passes it, unless `retain_graph` is set.
    """
    if not root.requires_grad:
        raise RuntimeError("backward() called on a tensor that does not require grad "
                           "(no input had requires_grad=True, or it was computed under no_grad)")
    xp = get_array_module(root.data)
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(f"backward() without a gradient needs a one-element tensor, got shape {root.shape}")
        grad = xp.ones_like(root.data)
    else:
        grad = _as_array(grad, root.dtype)
        if grad.shape != root.shape:
            raise ValueError(f"gradient of shape {grad.shape} for a tensor of shape {root.shape}")

    outer_callbacks = getattr(_backward_pass, "callbacks", None)
    _backward_pass.callbacks = callbacks = []
    try:
        if root.creator is None:
            _accumulate_leaf(root, grad, owned=False)
            _fire_hooks(root)
        else:
            _walk(root, grad, retain_graph)
        while callbacks:  # a callback may queue another
            callback, _ = callbacks.pop(0)
            callback()
    except BaseException:
        for _, on_failure in callbacks:  # those that will not run now
            if on_failure is not None:
                on_failure()
        raise
    finally:
        _backward_pass.callbacks = outer_callbacks


def _walk(root: Tensor, grad, retain_graph: bool) -> None:
    # Pass 1: count the edges into each op and each leaf (keys are id() of objects
    # that stay alive for the whole walk; nothing here is iterated or crosses ranks).
    pending: dict[int, int] = {}
    stack = [root.creator]
    visited = {id(root.creator)}
    while stack:
        fn = stack.pop()
        if getattr(fn, "released", False):
            raise RuntimeError("backward() through a graph that was already freed; "
                               "pass retain_graph=True to the first backward() to walk it twice")
        for t, needed in zip(fn.inputs, fn.needs_input_grad):
            if not needed:
                continue
            node = t.creator if t.creator is not None else t
            pending[id(node)] = pending.get(id(node), 0) + 1
            if t.creator is not None and id(t.creator) not in visited:
                visited.add(id(t.creator))
                stack.append(t.creator)

    # Pass 2: run each op once its gradient is complete. An op's gradient so far
    # lives in `slots`, with a flag saying whether the array is ours to add into.
    slots: dict[int, tuple] = {id(root.creator): (grad, False)}
    touched_leaves: dict[int, bool] = {}
    ready = [root.creator]
    while ready:
        fn = ready.pop()
        gy, gy_owned = slots.pop(id(fn), (None, False))
        inputs, needs = fn.inputs, fn.needs_input_grad
        grad_out = _gradient_destinations(inputs, needs, pending)
        if grad_out:
            fn.grad_out = grad_out
        elif "grad_out" in fn.__dict__:  # left by an earlier walk of a retained graph: stale
            del fn.grad_out
        gxs = fn.backward(gy) if gy is not None else (None,) * len(inputs)
        if not retain_graph:
            fn._release()
        for index, (t, needed, gx) in enumerate(zip(inputs, needs, gxs)):
            if not needed:
                continue
            if gx is not None:
                if isinstance(gx, np.generic):
                    gx = np.asarray(gx)
                _check_grad(fn, index, t, gx)
                if gx.dtype != t.dtype:  # e.g. float32 + float64: each input gets its own dtype back, as in PyTorch
                    gx = gx.astype(t.dtype)
                shared = sum(g is gx for g in gxs) > 1
                if grad_out and gx is grad_out.get(index):
                    owned = True  # written where the leaf asked: it becomes .grad as is
                else:
                    owned = not shared and (gy_owned if gx is gy else _is_fresh(gx))
            node = t.creator if t.creator is not None else t
            key = id(node)
            if t.creator is None:
                if gx is not None:
                    _accumulate_leaf(t, gx, owned)
                    touched_leaves[key] = True
                pending[key] -= 1
                if pending[key] == 0 and touched_leaves.pop(key, False):
                    _fire_hooks(t)
                continue
            if gx is not None:
                slots[key] = _accumulate(slots.get(key), gx, owned)
            pending[key] -= 1
            if pending[key] == 0:
                ready.append(t.creator)


def _gradient_destinations(inputs, needs, pending):
    """{index: buffer} for the inputs that are leaves with a grad_buffer, no .grad yet,
    and this op as their only source of gradient; None when there are none."""
    destinations = None
    for index, t in enumerate(inputs):
        if (needs[index] and t.grad_buffer is not None and t.creator is None and t.grad is None
                and pending.get(id(t)) == 1 and _fits(t.grad_buffer, t.data)):
            destinations = destinations or {}
            destinations[index] = t.grad_buffer
    return destinations


def _fits(buffer, data) -> bool:
    """Whether `buffer` can hold data's gradient: not once the leaf was moved or cast
    after the buffer was made (the op then returns a fresh array, and the buffer's
    owner sees the mismatch)."""
    return type(buffer) is type(data) and buffer.shape == data.shape and buffer.dtype == data.dtype


def _accumulate(slot, gx, owned):
    """Add gx to an op's pending gradient, in place only where the array is ours."""
    if slot is None:
        return gx, owned
    current, current_owned = slot
    if current_owned:
        current += gx
        return current, True
    return current + gx, True


def _accumulate_leaf(leaf: Tensor, gx, owned: bool) -> None:
    """Add gx into leaf.grad. A leaf's .grad must be its own array (it is updated in
    place by later passes, optimizers and the reducer), so a borrowed one is copied."""
    if leaf.grad is None:
        leaf.grad = gx if owned else gx.copy()
    else:
        leaf.grad += gx


def _fire_hooks(leaf: Tensor) -> None:
    if leaf._hooks:
        for hook in tuple(leaf._hooks):
            hook(leaf)


# The ops build on the classes above; imported last so that each module can import
# this one (they are looked up as module attributes, at call time).
from distprop.functional import activations, arithmetic, elementwise, reductions, shapes  # noqa: E402
