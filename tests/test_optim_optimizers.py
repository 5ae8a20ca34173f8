"""SGD, Adam and AdamW against PyTorch's trajectories; param groups; state_dict."""

import copy

import numpy as np
import pytest

import distprop as dp
from distprop import nn, optim
from helpers import assert_close, requires_torch, torch

SHAPES = [(4, 3), (3,), (2, 2, 2)]
STEPS = 10


def _problem(seed=0):
    """Initial values and, per step, gradient coefficients: grad = a * p + b (elementwise),
    so each trajectory feeds back on itself and any update error grows visibly."""
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s) for s in SHAPES]
    coefficients = [[(rng.uniform(0.5, 2.0, s), rng.standard_normal(s)) for s in SHAPES] for _ in range(STEPS)]
    return start, coefficients


def _ours(start):
    return [nn.Parameter(p.copy()) for p in start]


def _theirs(start):
    return [torch.nn.Parameter(torch.tensor(p.copy())) for p in start]


def _set_grads(params, coefficients, step, values):
    for p, value, (a, b) in zip(params, values, coefficients[step]):
        p.grad = a * value + b if isinstance(value, np.ndarray) else torch.tensor(a) * value + torch.tensor(b)


def _run_ours(opt, params, coefficients, steps, skip=None):
    trajectory = []
    for step in steps:
        _set_grads(params, coefficients, step, [p.data.copy() for p in params])
        if skip is not None:
            params[skip].grad = None
        opt.step()
        trajectory.append([p.data.copy() for p in params])
    return trajectory


def _run_theirs(opt, params, coefficients, steps, skip=None):
    trajectory = []
    for step in steps:
        _set_grads(params, coefficients, step, [p.detach().clone() for p in params])
        if skip is not None:
            params[skip].grad = None
        opt.step()
        trajectory.append([p.detach().numpy().copy() for p in params])
    return trajectory


def _assert_same_trajectory(ours, theirs, rtol=1e-8):
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for index, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rtol=rtol, what=f"parameter {index} after step {step + 1}")


CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]


@requires_torch
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{sorted(k.items())}" for n, k in CONFIGS])
def test_trajectory_matches_pytorch(name, kwargs):
    start, coefficients = _problem()
    ours, theirs = _ours(start), _theirs(start)
    ours_opt = getattr(optim, name)(ours, **kwargs)
    theirs_opt = getattr(torch.optim, name)(theirs, **kwargs)
    _assert_same_trajectory(_run_ours(ours_opt, ours, coefficients, range(STEPS)),
                            _run_theirs(theirs_opt, theirs, coefficients, range(STEPS)))


@requires_torch
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_param_groups_with_their_own_hyperparameters(name):
    start, coefficients = _problem(1)
    ours, theirs = _ours(start), _theirs(start)
    extra = {"momentum": 0.9} if name == "SGD" else {"betas": (0.5, 0.9)}

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "lr": 0.003, "weight_decay": 0.02, **extra}]

    ours_opt = getattr(optim, name)(groups(ours), lr=0.05)
    theirs_opt = getattr(torch.optim, name)(groups(theirs), lr=0.05)
    # A parameter without a gradient is skipped, and gets no state.
    _assert_same_trajectory(_run_ours(ours_opt, ours, coefficients, range(STEPS), skip=1),
                            _run_theirs(theirs_opt, theirs, coefficients, range(STEPS), skip=1))
    assert sorted(ours_opt.state) == sorted(theirs_opt.state_dict()["state"])


@requires_torch
def test_param_group_added_later_and_lr_changed_between_steps():
    start, coefficients = _problem(2)
    ours, theirs = _ours(start), _theirs(start)
    ours_opt = optim.SGD(ours[:1], lr=0.1, momentum=0.9)
    theirs_opt = torch.optim.SGD(theirs[:1], lr=0.1, momentum=0.9)
    ours_opt.add_param_group({"params": ours[1:], "lr": 0.01})
    theirs_opt.add_param_group({"params": theirs[1:], "lr": 0.01})
    first_ours = _run_ours(ours_opt, ours, coefficients, range(5))
    first_theirs = _run_theirs(theirs_opt, theirs, coefficients, range(5))
    ours_opt.param_groups[0]["lr"] = theirs_opt.param_groups[0]["lr"] = 0.02
    _assert_same_trajectory(first_ours + _run_ours(ours_opt, ours, coefficients, range(5, STEPS)),
                            first_theirs + _run_theirs(theirs_opt, theirs, coefficients, range(5, STEPS)))


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         ("Adam", dict(lr=0.01, amsgrad=True)),
                                         ("AdamW", dict(lr=0.01))])
def test_state_dict_round_trip_mid_trajectory_is_seamless(name, kwargs):
    start, coefficients = _problem(3)
    params = _ours(start)
    opt = getattr(optim, name)([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], **kwargs)
    uninterrupted = _run_ours(opt, params, coefficients, range(STEPS))

    params = _ours(start)
    opt = getattr(optim, name)([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], **kwargs)
    first = _run_ours(opt, params, coefficients, range(4))
    saved = copy.deepcopy(opt.state_dict())  # as if written to and read from a checkpoint
    resumed_params = [nn.Parameter(p.data.copy()) for p in params]
    resumed = getattr(optim, name)([{"params": resumed_params[:1]}, {"params": resumed_params[1:]}], **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["lr"] == 0.02  # hyperparameters come back too
    rest = _run_ours(resumed, resumed_params, coefficients, range(4, STEPS))
    for a, b in zip(uninterrupted, first + rest):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@requires_torch
@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01))])
def test_state_dict_layout_is_pytorchs_and_loads_from_pytorch(name, kwargs):
    start, coefficients = _problem(4)
    ours, theirs = _ours(start), _theirs(start)
    ours_opt = getattr(optim, name)(ours, **kwargs)
    theirs_opt = getattr(torch.optim, name)(theirs, **kwargs)
    _run_ours(ours_opt, ours, coefficients, range(3))
    _run_theirs(theirs_opt, theirs, coefficients, range(3))
    mine, reference = ours_opt.state_dict(), theirs_opt.state_dict()
    assert list(mine["state"]) == list(reference["state"]) == [0, 1, 2]
    for index in mine["state"]:
        assert set(mine["state"][index]) == set(reference["state"][index])
    assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in reference["param_groups"]]
    for key, value in mine["param_groups"][0].items():
        assert reference["param_groups"][0][key] == value, key

    # A PyTorch checkpoint (tensors made arrays) continues the same trajectory here.
    converted = {"state": {i: {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in entry.items()}
                           for i, entry in reference["state"].items()},
                 "param_groups": reference["param_groups"]}
    fresh = [nn.Parameter(p.detach().numpy().copy()) for p in theirs]
    fresh_opt = getattr(optim, name)(fresh, **kwargs)
    fresh_opt.load_state_dict(converted)
    _assert_same_trajectory(_run_ours(fresh_opt, fresh, coefficients, range(3, STEPS)),
                            _run_theirs(theirs_opt, theirs, coefficients, range(3, STEPS)))


def test_load_state_dict_checks_layout():
    params = _ours(_problem()[0])
    opt = optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        optim.Adam([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(saved)
    with pytest.raises(ValueError, match="has 2 parameters"):
        optim.Adam(params[:2]).load_state_dict(saved)
    swapped = [params[1], params[0], params[2]]
    with pytest.raises(ValueError, match="shape"):
        optim.Adam(swapped).load_state_dict(saved)


def test_step_updates_in_place_and_leaves_grads_alone():
    params = _ours(_problem()[0])
    arrays = [p.data for p in params]
    grads = [np.full(p.shape, 0.5) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    for opt in (optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
                optim.Adam(params, weight_decay=0.1), optim.AdamW(params)):
        opt.step()
        assert all(p.data is a for p, a in zip(params, arrays))
        assert all(np.array_equal(p.grad, g) for p, g in zip(params, grads))


def test_zero_grad_and_closure():
    params = _ours(_problem()[0])
    opt = optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.zero_grad(set_to_none=False)
    assert all(not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)

    x = nn.Parameter(np.array([3.0]))
    opt = optim.SGD([x], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).data) == 9.0
    assert float(x.data[0]) == 1.5  # 3 - 0.25 * 6


def test_invalid_arguments():
    params = _ours(_problem()[0])
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([params[0], params[0]], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([{"params": params[:2]}, {"params": params[1:]}], lr=0.1)
    with pytest.raises(TypeError, match="not a set"):  # its order differs between processes
        optim.SGD(set(params), lr=0.1)
    with pytest.raises(TypeError, match="not a set"):
        optim.SGD([{"params": frozenset(params)}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(params, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="learning rate"):
        optim.AdamW(params, lr=-1)
    with pytest.raises(TypeError, match="Tensors"):
        optim.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="leaf"):
        optim.SGD([params[0] * 2], lr=0.1)


def test_float32_parameters_stay_float32(device):
    model = nn.Linear(3, 2).to(device=device)
    for opt in (optim.SGD(model.parameters(), lr=0.1, momentum=0.9), optim.Adam(model.parameters())):
        x = dp.tensor(dp.backend.to_device(np.ones((4, 3), np.float32), device))
        model(x).sum().backward()
        opt.step()
        assert all(p.dtype == np.float32 and p.device == device for p in model.parameters())
        assert all(v.dtype == np.float32 for s in opt.state.values() for v in s.values()
                   if hasattr(v, "dtype"))
