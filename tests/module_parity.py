"""Run a distprop Module and the same torch.nn Module side by side: float64,
identical weights (copied from torch through our load_state_dict, which also proves
that the state_dict keys match PyTorch's), identical inputs; compare the output, the
input gradients, every parameter's gradient and every buffer afterwards."""

from __future__ import annotations

import numpy as np

import distprop as dp
from distprop.backend import to_device
from helpers import assert_close, torch


def load_from_torch(ours, theirs) -> None:
    ours.load_state_dict({k: v.detach().cpu().numpy() for k, v in theirs.state_dict().items()})


def compare_module(ours, theirs, *inputs, training=True, rtol=1e-8, device="cpu", seed=0, **kwargs):
    """Forward `inputs` (numpy arrays; floating ones get gradients) through both modules,
    backward a random cotangent, and compare everything. Extra keyword arguments go to
    both forwards. Returns the two modules (float64) for further checks."""
    theirs = theirs.double().train(training)
    ours = ours.to(device=device, dtype=np.float64).train(training)
    load_from_torch(ours, theirs)
    floating = [np.asarray(a).dtype.kind == "f" for a in inputs]
    our_inputs = [dp.tensor(to_device(np.asarray(a), device), requires_grad=f) for a, f in zip(inputs, floating)]
    their_inputs = [torch.tensor(np.asarray(a), requires_grad=f) for a, f in zip(inputs, floating)]
    y = ours(*our_inputs, **kwargs)
    y_ref = theirs(*their_inputs, **kwargs)
    if isinstance(y_ref, tuple):  # attention returns (output, weights)
        y, y_ref = y[0], y_ref[0]
    assert_close(y.data, y_ref.detach().numpy(), rtol, what="output")

    u = np.random.default_rng(seed).standard_normal(tuple(y_ref.shape))
    y.backward(to_device(u, device))
    y_ref.backward(torch.tensor(u))
    for index, (a, b, f) in enumerate(zip(our_inputs, their_inputs, floating)):
        if f:
            assert_close(a.grad, b.grad.numpy(), rtol, what=f"gradient of input {index}")
    reference = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        expected = reference[name].grad
        if expected is None:
            assert param.grad is None or not np.any(dp.backend.to_numpy(param.grad)), name
        else:
            assert_close(param.grad, expected.numpy(), rtol, what=f"gradient of {name}")
    reference_buffers = dict(theirs.named_buffers())
    for name, buffer in ours.named_buffers():
        assert_close(buffer, reference_buffers[name].numpy(), rtol, what=f"buffer {name}")
    return ours, theirs
