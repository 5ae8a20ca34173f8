"""LR schedules: the closed forms of each rule (no PyTorch needed), the same lr sequences
as PyTorch's schedulers, composition, state_dict."""

import json
import math
import re

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


def _factor(spec, epoch):
    """The lr at `epoch` as a multiple of the base lr, from each schedule's closed form."""
    name, kwargs = spec
    if name == "StepLR":
        return kwargs.get("gamma", 0.1) ** (epoch // kwargs["step_size"])
    if name == "CosineAnnealingLR":  # past T_max the cosine goes on, back up (PyTorch's as well)
        low = kwargs.get("eta_min", 0.0)
        return None, low, (1 + math.cos(math.pi * epoch / kwargs["T_max"])) / 2
    if name == "LinearLR":
        start, end = kwargs["start_factor"], kwargs.get("end_factor", 1.0)
        return start + (end - start) * min(epoch, kwargs["total_iters"]) / kwargs["total_iters"]
    # SequentialLR: each scheduler starts over at its milestone
    starts = [0] + kwargs["milestones"]
    index = max(i for i, start in enumerate(starts) if start <= epoch)
    return _factor(kwargs["schedulers"][index], epoch - starts[index])


def _closed_form_lrs(spec, base_lrs, epochs=EPOCHS):
    rows = []
    for epoch in range(epochs + 1):
        factor = _factor(spec, epoch)
        if isinstance(factor, tuple):  # cosine: eta_min + (base - eta_min) * cosine
            _, low, cosine = factor
            rows.append([low + (base - low) * cosine for base in base_lrs])
        else:
            rows.append([base * factor for base in base_lrs])
    return np.array(rows)


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SPECS)])
def test_lr_sequence_follows_the_closed_form(spec):
    opt = optim.SGD([{"params": [nn.Parameter(np.zeros(1))], "lr": lr} for lr in (0.1, 0.03)], momentum=0.9)
    np.testing.assert_allclose(_lrs(opt, _build(lr_scheduler, opt, spec)), _closed_form_lrs(spec, (0.1, 0.03)),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("spec", [s for s in SPECS if s[0] != "SequentialLR"], ids=lambda s: s[0])
def test_closed_form_agrees_with_the_step_by_step_rule_at_every_epoch(spec):
    """What SequentialLR uses when a scheduler starts over at a milestone."""
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    scheduler = _build(lr_scheduler, opt, spec)
    for _ in range(EPOCHS):
        opt.step()
        scheduler.step()
        np.testing.assert_allclose(scheduler._closed_form_lr(), scheduler.get_last_lr(), rtol=1e-12, atol=1e-15)


def test_a_scheduler_that_starts_at_a_later_milestone_starts_from_its_closed_form():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    scheduler = lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2, gamma=0.5),
                                                lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)],
                                          milestones=[1])
    assert scheduler.get_last_lr() == [1.0]  # epoch 0 belongs to the first one
    np.testing.assert_allclose(_lrs(opt, scheduler, epochs=6)[:, 0], [1.0, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0])
    assert scheduler.optimizer is opt


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


def test_sequential_of_one_scheduler_is_that_scheduler():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    lrs = _lrs(opt, lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2, gamma=0.5)], milestones=[]), 5)
    np.testing.assert_array_equal(lrs[:, 0], [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_defaults_are_pytorchs():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.9)
    step = lr_scheduler.StepLR(opt, step_size=1)
    assert step.gamma == 0.1
    linear = lr_scheduler.LinearLR(opt)
    assert (linear.start_factor, linear.end_factor, linear.total_iters) == (1.0 / 3, 1.0, 5)
    assert lr_scheduler.CosineAnnealingLR(opt, T_max=3).eta_min == 0.0


@pytest.mark.parametrize("make", [lambda o, e: lr_scheduler.StepLR(o, 3, gamma=0.5, last_epoch=e),
                                  lambda o, e: lr_scheduler.LinearLR(o, 0.25, total_iters=8, last_epoch=e),
                                  lambda o, e: lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.01, last_epoch=e)],
                         ids=["StepLR", "LinearLR", "CosineAnnealingLR"])
def test_resuming_with_last_epoch_continues_the_sequence(make):
    """A scheduler built with last_epoch=N (on the optimizer state of the run it
    resumes) keeps the current lrs and then goes on as the original would have."""
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.2)
    uninterrupted = _lrs(opt, make(opt, -1), epochs=20)
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.2)
    first = _lrs(opt, make(opt, -1), epochs=7)
    resumed_opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.2)
    resumed_opt.load_state_dict(opt.state_dict())  # brings 'initial_lr' and the current lr
    resumed = make(resumed_opt, 6)
    assert resumed.last_epoch == 7 and resumed.base_lrs == [0.2] and resumed.get_last_lr() == list(first[-1])
    np.testing.assert_allclose(_lrs(resumed_opt, resumed, epochs=13), uninterrupted[7:], rtol=1e-12)


def test_state_dict_is_plain_data_without_the_optimizer():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    sequential = lr_scheduler.SequentialLR(opt, [lr_scheduler.LinearLR(opt, 0.5, total_iters=2),
                                                 lr_scheduler.StepLR(opt, 3)], milestones=[2])
    _lrs(opt, sequential, epochs=4)
    state = sequential.state_dict()
    assert "optimizer" not in state and all("optimizer" not in child for child in state["_schedulers"])
    assert [child["last_epoch"] for child in state["_schedulers"]] == [1, 2]
    restored = json.loads(json.dumps(state))  # a checkpoint can hold it as JSON
    opt2 = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    fresh = lr_scheduler.SequentialLR(opt2, [lr_scheduler.LinearLR(opt2, 0.5, total_iters=2),
                                             lr_scheduler.StepLR(opt2, 3)], milestones=[2])
    opt2.load_state_dict(opt.state_dict())  # after building the scheduler, which sets the lrs
    fresh.load_state_dict(restored)
    assert fresh.optimizer is opt2 and fresh.last_epoch == sequential.last_epoch
    np.testing.assert_allclose(_lrs(opt2, fresh, epochs=5), _lrs(opt, sequential, epochs=5))


def test_a_scheduler_without_rules_says_so():
    class Incomplete(lr_scheduler.LRScheduler):
        pass

    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(NotImplementedError, match=r"^Incomplete does not define get_lr\(\)$"):
        Incomplete(opt)
    with pytest.raises(NotImplementedError, match=r"^Incomplete does not define _closed_form_lr\(\)$"):
        Incomplete._closed_form_lr(object.__new__(Incomplete))


def _exactly(message):
    return "^" + re.escape(message) + "$"


def test_invalid_arguments_say_what():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0)  # both ends of their ranges are fine
    for start in (0, 1.5):
        with pytest.raises(ValueError, match=_exactly(f"start_factor must be in (0, 1], got {start}")):
            lr_scheduler.LinearLR(opt, start_factor=start)
    for end in (-0.1, 1.5):
        with pytest.raises(ValueError, match=_exactly(f"end_factor must be in [0, 1], got {end}")):
            lr_scheduler.LinearLR(opt, end_factor=end)
    with pytest.raises(ValueError, match=_exactly("SequentialLR needs at least one scheduler")):
        lr_scheduler.SequentialLR(opt, [], milestones=[])
    with pytest.raises(ValueError, match=_exactly(
            "SequentialLR needs one milestone fewer than schedulers, got 1 schedulers and 1 milestones")):
        lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2)], milestones=[3])
    other = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=_exactly(
            "SequentialLR: the scheduler at position 1 (StepLR) belongs to another optimizer")):
        lr_scheduler.SequentialLR(opt, [lr_scheduler.StepLR(opt, 2), lr_scheduler.StepLR(other, 2)], [3])
    with pytest.raises(KeyError, match=re.escape(
            "param_groups[0] has no 'initial_lr': resuming a scheduler with last_epoch=5 needs the optimizer "
            "state of the run it resumes")):
        lr_scheduler.StepLR(optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1), 2, last_epoch=5)
    with pytest.raises(TypeError, match=_exactly("dict is not an Optimizer")):
        lr_scheduler.StepLR({}, 2)


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
