"""SGD, Adam and AdamW: trajectories against the published update rules written out
step by step in float64 (no PyTorch needed), against hand-computed first steps, and
against PyTorch's own optimizers; param groups; state_dict."""

import copy
import math
import re

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


# ---- the update rules as published (PyTorch's documentation), one parameter at a time

def _sgd_rule(lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    def update(p, g, state, t):
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            state["b"] = g if t == 1 else momentum * state["b"] + (1 - dampening) * g
            g = g + momentum * state["b"] if nesterov else state["b"]
        return p - lr * g
    return update


def _adam_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False):
    beta1, beta2 = betas

    def update(p, g, state, t):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        elif weight_decay != 0:
            g = g + weight_decay * p
        state["m"] = beta1 * state.get("m", 0.0) + (1 - beta1) * g
        state["v"] = beta2 * state.get("v", 0.0) + (1 - beta2) * g * g
        second = state["v"]
        if amsgrad:
            second = state["vmax"] = np.maximum(state.get("vmax", 0.0), state["v"])
        m_hat = state["m"] / (1 - beta1 ** t)
        v_hat = second / (1 - beta2 ** t)
        return p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return update


RULES = {"SGD": _sgd_rule, "Adam": _adam_rule,
         "AdamW": lambda weight_decay=1e-2, **kwargs: _adam_rule(weight_decay=weight_decay, decoupled=True, **kwargs)}


def _run_rule(update, start, coefficients, steps):
    params, states, trajectory = [p.copy() for p in start], [{} for _ in start], []
    for t, step in enumerate(steps, 1):
        for i, (a, b) in enumerate(coefficients[step]):
            params[i] = update(params[i], a * params[i] + b, states[i], t)
        trajectory.append([p.copy() for p in params])
    return trajectory


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
    ("Adam", dict(lr=0.001, weight_decay=1.0)),  # 1 is not a special value
    ("AdamW", dict(lr=0.001, weight_decay=1.0)),
]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{sorted(k.items())}" for n, k in CONFIGS])
def test_trajectory_follows_the_published_rule(name, kwargs):
    start, coefficients = _problem()
    ours = _ours(start)
    _assert_same_trajectory(_run_ours(getattr(optim, name)(ours, **kwargs), ours, coefficients, range(STEPS)),
                            _run_rule(RULES[name](**kwargs), start, coefficients, range(STEPS)), rtol=1e-12)


def _steps(opt, p, count):
    """p (a scalar Parameter) after each of `count` steps on the loss p**2 (gradient 2p)."""
    values = []
    for _ in range(count):
        p.grad = 2 * p.data
        opt.step()
        values.append(float(p.data[0]))
    return values


@pytest.mark.parametrize("kwargs, expected", [
    (dict(lr=0.1), [0.8, 0.64, 0.512]),
    (dict(lr=0.1, momentum=0.9), [0.8, 0.46, 0.062]),  # b = 2, 3.4, 3.98
    (dict(lr=0.1, momentum=0.9, dampening=0.5), [0.8, 0.54, 0.252]),  # b = 2, 2.6, 2.88
    (dict(lr=0.1, momentum=0.9, dampening=1.0), [0.8, 0.62, 0.458]),  # b = 2, 1.8, 1.62: no new gradient
    (dict(lr=0.1, momentum=0.9, nesterov=True), [0.62, 0.2224]),  # b = 2, 3.04; steps 3.8, 3.976
    (dict(lr=0.1, weight_decay=0.1), [0.79, 0.6241, 0.493039]),  # gradient 2.1 p
    (dict(lr=0.1, weight_decay=1.0), [0.7, 0.49, 0.343]),  # gradient 3 p
])
def test_sgd_first_steps_by_hand(kwargs, expected):
    p = nn.Parameter(np.array([1.0]))
    np.testing.assert_allclose(_steps(optim.SGD([p], **kwargs), p, len(expected)), expected, rtol=1e-12)


def test_adam_and_adamw_first_steps_by_hand():
    # Step 1: both moments are bias-corrected to exactly g and g^2, so the step is
    # lr * g / (|g| + eps) whatever the betas: a bias correction off by one step
    # (t - 1 or t + 1) gives another value (or a division by zero).
    p = nn.Parameter(np.array([1.0]))
    first, second = _steps(optim.Adam([p], lr=0.1), p, 2)
    assert first == pytest.approx(1 - 0.1 * 2 / (2 + 1e-8), rel=1e-14)
    # Step 2, by hand: g = 2 * first; m = 0.9 * 0.2 + 0.1 g; v = 0.999 * 0.004 + 0.001 g^2.
    g = 2 * first
    m_hat, v_hat = (0.18 + 0.1 * g) / (1 - 0.9 ** 2), (0.003996 + 0.001 * g * g) / (1 - 0.999 ** 2)
    assert second == pytest.approx(first - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8), rel=1e-13)
    # AdamW decays the parameter first, by lr * weight_decay, and leaves the gradient alone.
    q = nn.Parameter(np.array([1.0]))
    (decayed,) = _steps(optim.AdamW([q], lr=0.1, weight_decay=0.5), q, 1)
    assert decayed == pytest.approx(1 * (1 - 0.1 * 0.5) - 0.1 * 2 / (2 + 1e-8), rel=1e-14)
    # Adam adds weight_decay * p to the gradient instead: with g = 2 + 0.5 the first step is still lr.
    r = nn.Parameter(np.array([1.0]))
    (coupled,) = _steps(optim.Adam([r], lr=0.1, weight_decay=0.5), r, 1)
    assert coupled == pytest.approx(1 - 0.1 * 2.5 / (2.5 + 1e-8), rel=1e-14)


def test_amsgrad_keeps_the_largest_second_moment():
    # Gradients 4 then 0.1: v falls on step 2, AMSGrad divides by the larger old one.
    p = nn.Parameter(np.array([0.0]))
    opt = optim.Adam([p], lr=1.0, betas=(0.0, 0.5), amsgrad=True)
    for g in (4.0, 0.1):
        p.grad = np.array([g])
        opt.step()
    v_max = max(0.5 * 16, 0.5 * 0.5 * 16 + 0.5 * 0.01)  # 8.0, the first step's
    expected = -4 / (math.sqrt(16) + 1e-8) - 0.1 / (math.sqrt(v_max / (1 - 0.25)) + 1e-8)
    assert float(p.data[0]) == pytest.approx(expected, rel=1e-14)
    assert opt.state[0]["max_exp_avg_sq"][0] == 8.0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_param_groups_follow_their_own_hyperparameters(name):
    start, coefficients = _problem(1)
    extra = {"momentum": 0.9} if name == "SGD" else {"betas": (0.5, 0.9)}
    own = {"lr": 0.003, "weight_decay": 0.02, **extra}
    params = _ours(start)
    opt = getattr(optim, name)([{"params": params[:2]}, {"params": params[2:], **own}], lr=0.05)
    ours = _run_ours(opt, params, coefficients, range(STEPS))
    default = _run_rule(RULES[name](lr=0.05), start[:2], [c[:2] for c in coefficients], range(STEPS))
    grouped = _run_rule(RULES[name](**own), start[2:], [c[2:] for c in coefficients], range(STEPS))
    _assert_same_trajectory(ours, [a + b for a, b in zip(default, grouped)], rtol=1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_parameter_without_gradient_is_skipped_and_gets_no_state(name):
    start, coefficients = _problem(5)
    params = _ours(start)
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    opt = getattr(optim, name)(params, **kwargs)
    trajectory = _run_ours(opt, params, coefficients, range(3), skip=1)  # the middle one of one group
    expected = _run_rule(RULES[name](**kwargs), start, coefficients, range(3))
    for step, (got, want) in enumerate(zip(trajectory, expected)):
        assert_close(got[0], want[0], rtol=1e-12, what=f"parameter 0, step {step + 1}")
        np.testing.assert_array_equal(got[1], start[1])
        assert_close(got[2], want[2], rtol=1e-12, what=f"parameter 2, step {step + 1}")
    assert sorted(opt.state) == [0, 2]


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


def _exactly(message):
    return "^" + re.escape(message) + "$"


def test_defaults_are_pytorchs():
    params = _ours(_problem()[0])
    assert optim.SGD(params).defaults == dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                              nesterov=False)
    adam = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)
    assert optim.Adam(params).defaults == adam
    assert optim.AdamW(params).defaults == {**adam, "weight_decay": 1e-2}


def test_boundary_values_are_accepted():
    params = _ours(_problem()[0])
    optim.SGD(params, lr=0.0, momentum=0.0, weight_decay=0.0)
    optim.Adam(params, lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)
    optim.AdamW(params, lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)


@pytest.mark.parametrize("make, message", [
    (lambda p: optim.SGD(p, lr=-0.5), "invalid learning rate: -0.5"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.1), "invalid momentum: -0.1"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1), "invalid weight_decay: -1"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    (lambda p: optim.Adam(p, lr=-0.5), "invalid learning rate: -0.5"),
    (lambda p: optim.Adam(p, eps=-1e-9), "invalid epsilon: -1e-09"),
    (lambda p: optim.Adam(p, betas=(-0.1, 0.9)), "invalid betas: (-0.1, 0.9) (each must be in [0, 1))"),
    (lambda p: optim.Adam(p, betas=(0.9, 1.0)), "invalid betas: (0.9, 1.0) (each must be in [0, 1))"),
    (lambda p: optim.Adam(p, betas=(0.9, -0.5)), "invalid betas: (0.9, -0.5) (each must be in [0, 1))"),
    (lambda p: optim.AdamW(p, weight_decay=-0.1), "invalid weight_decay: -0.1"),
])
def test_invalid_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=_exactly(message)):
        make(_ours(_problem()[0]))


def test_invalid_parameter_lists_say_what_and_where():
    params = _ours(_problem()[0])
    with pytest.raises(ValueError, match=_exactly("optimizer got an empty parameter list")):
        optim.Adam([])
    with pytest.raises(TypeError, match=_exactly(
            "optimizer params must be an ordered collection (a list, or model.parameters()), not a set: "
            "its order differs between processes")):
        optim.SGD(set(params), lr=0.1)
    with pytest.raises(TypeError, match=r"^optimizer a param group's 'params' must be an ordered collection"):
        optim.SGD([{"params": {params[0]}}], lr=0.1)
    with pytest.raises(TypeError, match=_exactly("a param group must be a dict, got list")):
        optim.SGD(params[:1], lr=0.1).add_param_group(params[1:])
    with pytest.raises(TypeError, match=_exactly(
            "optimizer can only optimize Tensors, got ndarray at position 1 of group 0")):
        optim.SGD([params[0], np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match=_exactly(
            "optimizer can only optimize leaf Tensors (position 0 of group 1 is computed from others)")):
        optim.SGD([{"params": params[:1]}, {"params": [params[1] * 2]}], lr=0.1)
    with pytest.raises(ValueError, match=_exactly(
            "some parameters appear more than once in the optimizer's parameter groups")):
        optim.SGD([params[0], params[1], params[0]], lr=0.1)


def test_a_single_tensor_is_a_parameter_list_of_one():
    p = nn.Parameter(np.array([1.0, -2.0]))
    opt = optim.SGD(p, lr=0.5)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    opt.add_param_group({"params": nn.Parameter(np.zeros(1)), "lr": 0.1})
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    p.grad = np.array([1.0, 1.0])
    opt.step()
    np.testing.assert_array_equal(p.data, [0.5, -2.5])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_state_indices_run_on_across_groups(name):
    """State is keyed by the position in the flat order, group after group."""
    params = _ours(_problem()[0]) + [nn.Parameter(np.ones(5))]
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    opt = getattr(optim, name)([{"params": params[:2]}, {"params": params[2:3]}, {"params": params[3:]}],
                               lr=0.1, **kwargs)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.step()
    assert sorted(opt.state) == [0, 1, 2, 3]
    for index, p in enumerate(params):
        arrays = [v for v in opt.state[index].values() if isinstance(v, np.ndarray)]
        assert arrays and all(a.shape == p.shape for a in arrays), index
    assert [g["params"] for g in opt.state_dict()["param_groups"]] == [[0, 1], [2], [3]]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_step_with_closure_returns_its_loss(name):
    x = nn.Parameter(np.array([3.0]))
    opt = getattr(optim, name)([x], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.data) == 9.0 and x.grad[0] == 6.0 and x.data[0] < 3.0
    assert opt.step() is None


def test_load_state_dict_takes_tensors_lists_and_other_dtypes_as_copies():
    p = nn.Parameter(np.zeros(3, np.float32))
    opt = optim.Adam([p], lr=0.1, amsgrad=True)
    exp_avg = np.array([1.0, 2.0, 3.0])  # float64, as another program may have saved it
    saved = {"state": {"0": {"step": np.array(4), "exp_avg": exp_avg, "exp_avg_sq": dp.tensor(np.full(3, 4.0)),
                             "max_exp_avg_sq": [4.0, 4.0, 4.0], "counts": np.array([1, 2, 3]), "note": None,
                             "scale": 0.5}},
             "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                               "amsgrad": True, "params": ["0"]}]}
    opt.load_state_dict(saved)
    state = opt.state[0]
    assert state["step"] == 4 and type(state["step"]) is int
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert isinstance(state[name], np.ndarray) and state[name].dtype == np.float32, name
    np.testing.assert_array_equal(state["exp_avg"], [1, 2, 3])
    np.testing.assert_array_equal(state["max_exp_avg_sq"], [4, 4, 4])
    assert state["counts"].dtype == np.array([1]).dtype  # integers keep their type
    assert state["note"] is None and state["scale"] == 0.5
    assert opt.param_groups[0]["lr"] == 0.01
    exp_avg[0] = 100.0  # a copy: the saved arrays stay the caller's
    assert state["exp_avg"][0] == 1.0
    state["exp_avg_sq"][0] = 9.0
    assert saved["state"]["0"]["exp_avg_sq"].data[0] == 4.0


def test_load_state_dict_names_what_does_not_fit():
    params = _ours(_problem()[0])
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=_exactly(
            "loaded state dict has 1 parameter groups, this optimizer has 2")):
        optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match=_exactly(
            "parameter group 0 has 2 parameters, the loaded state dict has 3")):
        optim.SGD(params[:2], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match=_exactly(
            "optimizer state 'momentum_buffer' of parameter 0 has shape (4, 3), the parameter has shape (3,)")):
        optim.SGD([params[1], params[0], params[2]], lr=0.1).load_state_dict(saved)
    saved["state"][7] = saved["state"][0]
    with pytest.raises(ValueError, match=_exactly(
            "loaded state dict has state for parameter 7, which none of its parameter groups lists")):
        optim.SGD(params, lr=0.1).load_state_dict(saved)


def test_repr_lists_every_group():
    opt = optim.SGD([{"params": _ours(_problem()[0])[:1]}], lr=0.5, momentum=0.9)
    assert repr(opt) == ("SGD (\nParameter Group 0\n    lr: 0.5\n    momentum: 0.9\n    dampening: 0.0\n"
                         "    weight_decay: 0.0\n    nesterov: False\n)")


def test_an_optimizer_without_a_step_says_so():
    class Unfinished(optim.Optimizer):
        pass

    with pytest.raises(NotImplementedError, match=r"^Unfinished does not define step\(\)$"):
        Unfinished([nn.Parameter(np.ones(1))], {}).step()
