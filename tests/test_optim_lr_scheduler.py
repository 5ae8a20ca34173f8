"""LR schedules: the same lr sequences as PyTorch's schedulers, composition, state_dict."""

import numpy as np
import pytest

from distprop import nn, optim
from distprop.optim import lr_scheduler
from helpers import requires_torch, torch

EPOCHS = 40


def _optimizers(lrs=(0.1, 0.03)):
    ours = optim.SGD([{"params": [nn.Parameter(np.zeros(1))], "lr": lr} for lr in lrs], momentum=0.9)
    theirs = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs],
                             momentum=0.9)
    return ours, theirs


def _lrs(optimizer, scheduler, epochs=EPOCHS):
    """The lr of every group at each epoch, stepping the optimizer before the scheduler."""
    sequence = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(epochs):
        optimizer.step()
        scheduler.step()
        sequence.append([g["lr"] for g in optimizer.param_groups])
        assert scheduler.get_last_lr() == sequence[-1]
    return np.array(sequence)


def _build(module, optimizer, spec):
    """Construct a scheduler (possibly SequentialLR of others) from a spec."""
    name, kwargs = spec
    if name == "SequentialLR":
        children = [_build(module, optimizer, child) for child in kwargs["schedulers"]]
        return module.SequentialLR(optimizer, children, milestones=kwargs["milestones"])
    return getattr(module, name)(optimizer, **kwargs)


SPECS = [
    ("StepLR", dict(step_size=7)),
    ("StepLR", dict(step_size=3, gamma=0.5)),
    ("CosineAnnealingLR", dict(T_max=10)),  # past T_max it rises again, as PyTorch's does
    ("CosineAnnealingLR", dict(T_max=40, eta_min=0.001)),
    ("LinearLR", dict(start_factor=0.1, total_iters=8)),
    ("LinearLR", dict(start_factor=1.0, end_factor=0.2, total_iters=30)),
    # Goyal et al.: linear warmup, then decay (cosine or steps)
    ("SequentialLR", dict(schedulers=[("LinearLR", dict(start_factor=0.1, total_iters=5)),
                                      ("CosineAnnealingLR", dict(T_max=35))], milestones=[5])),
    ("SequentialLR", dict(schedulers=[("LinearLR", dict(start_factor=0.25, total_iters=4)),
                                      ("StepLR", dict(step_size=10, gamma=0.1))], milestones=[4])),
    ("SequentialLR", dict(schedulers=[("LinearLR", dict(start_factor=0.5, total_iters=3)),
                                      ("StepLR", dict(step_size=5, gamma=0.5)),
                                      ("CosineAnnealingLR", dict(T_max=10, eta_min=0.01))],
                          milestones=[3, 20])),
]


@requires_torch
@pytest.mark.parametrize("spec", SPECS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SPECS)])
def test_lr_sequence_matches_pytorch(spec):
    ours_opt, theirs_opt = _optimizers()
    ours = _lrs(ours_opt, _build(lr_scheduler, ours_opt, spec))
    theirs = _lrs(theirs_opt, _build(torch.optim.lr_scheduler, theirs_opt, spec))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_warmup_then_cosine_reaches_the_expected_values():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=4)
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    lrs = _lrs(opt, lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[4]), epochs=14)[:, 0]
    np.testing.assert_allclose(lrs[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(lrs[4:], [0.5 * (1 + np.cos(np.pi * t / 10)) for t in range(11)], atol=1e-15)


@pytest.mark.parametrize("spec", SPECS[::2], ids=[s[0] for s in SPECS[::2]])
def test_state_dict_round_trip_continues_the_sequence(spec):
    def fresh():
        opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
        return opt, _build(lr_scheduler, opt, spec)

    opt, scheduler = fresh()
    uninterrupted = _lrs(opt, scheduler)

    opt, scheduler = fresh()
    first = _lrs(opt, scheduler, epochs=12)
    saved_opt, saved_scheduler = opt.state_dict(), scheduler.state_dict()
    opt, scheduler = fresh()
    opt.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved_scheduler)
    rest = _lrs(opt, scheduler, epochs=EPOCHS - 12)
    np.testing.assert_array_equal(uninterrupted, np.concatenate([first, rest[1:]]))


def test_invalid_arguments():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="start_factor"):
        lr_scheduler.LinearLR(opt, start_factor=0)
    with pytest.raises(ValueError, match="milestone"):
        lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2)], milestones=[3])
    other = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2), lr_scheduler.StepLR(other, 2)], [3])
    with pytest.raises(KeyError, match="initial_lr"):
        lr_scheduler.StepLR(optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1), 2, last_epoch=5)
    with pytest.raises(TypeError, match="not an Optimizer"):
        lr_scheduler.StepLR(object(), 2)
