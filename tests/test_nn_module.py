"""Module: registration, names and order, state_dict, to(), modes, gradients."""

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from distprop.backend import to_numpy
from helpers import requires_torch, torch


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.scale = nn.Parameter(np.ones(4, np.float32))
        self.register_buffer("count", np.zeros((), np.int64))
        self.register_buffer("cache", np.zeros(2, np.float32), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.first(x)))


def test_named_parameters_are_dotted_and_in_registration_order():
    # Per module its own parameters, then its children's (PyTorch's order).
    names = [name for name, _ in Net().named_parameters()]
    assert names == ["first.scale", "first.fc.weight", "first.fc.bias", "norm.weight", "norm.bias",
                     "head.weight"]


@requires_torch
def test_names_and_order_match_pytorch_for_the_same_architecture():
    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = TorchBlock()
            self.norm = torch.nn.BatchNorm1d(4)
            self.head = torch.nn.Linear(4, 2, bias=False)

    ours, theirs = Net(), TorchNet()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    np.testing.assert_array_equal(ours.first.fc.weight.data, theirs.first.fc.weight.detach().numpy())


def test_order_is_registration_order_not_alphabetical():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.zeta = nn.Linear(1, 1)
            self.alpha = nn.Linear(1, 1)

    assert [n for n, _ in Reversed().named_parameters()] == ["zeta.weight", "zeta.bias", "alpha.weight",
                                                             "alpha.bias"]


def test_buffers_modules_and_children():
    net = Net()
    assert [n for n, _ in net.named_buffers()] == ["first.count", "first.cache", "norm.running_mean",
                                                   "norm.running_var", "norm.num_batches_tracked"]
    assert [n for n, _ in net.named_modules()] == ["", "first", "first.fc", "norm", "head"]
    assert [type(m).__name__ for m in net.children()] == ["Block", "BatchNorm1d", "Linear"]
    assert len(list(net.modules())) == 5


def test_shared_parameters_and_modules_are_listed_once_under_their_first_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(3, 3)
            self.decoder = nn.Linear(3, 3)
            self.decoder.weight = self.encoder.weight
            self.again = self.encoder

    tied = Tied()
    assert [n for n, _ in tied.named_parameters()] == ["encoder.weight", "encoder.bias", "decoder.bias"]
    assert len(list(tied.parameters())) == 3
    assert [n for n, _ in tied.named_modules()] == ["", "encoder", "decoder"]
    # state_dict keeps every name, as PyTorch's does
    assert list(tied.state_dict()) == ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias",
                                       "again.weight", "again.bias"]


def test_state_dict_layout_arrays_and_aliasing():
    net = Net()
    state = net.state_dict()
    assert list(state) == ["first.scale", "first.count", "first.fc.weight", "first.fc.bias", "norm.weight",
                           "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
                           "head.weight"]
    assert all(isinstance(v, np.ndarray) for v in state.values())  # plain arrays, not Tensors
    assert state["first.fc.weight"] is net.first.fc.weight.data  # aliases the live storage
    assert "first.cache" not in state  # non-persistent buffer


def test_load_state_dict_copies_in_place_and_keeps_parameter_objects():
    source, target = Net(), Net()
    weight = target.first.fc.weight
    array = weight.data
    snapshot = {k: v.copy() for k, v in source.state_dict().items()}
    result = target.load_state_dict(snapshot)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target.first.fc.weight is weight and weight.data is array
    for key, value in snapshot.items():
        np.testing.assert_array_equal(target.state_dict()[key], value)


def test_load_state_dict_strict_error_lists_missing_unexpected_and_mismatched():
    net = Net()
    state = {k: v.copy() for k, v in net.state_dict().items()}
    del state["head.weight"]
    state["extra.weight"] = np.zeros(3)
    state["first.fc.weight"] = np.zeros((5, 3))
    before = net.first.fc.bias.data.copy()
    state["first.fc.bias"] = before + 1
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    assert "Net" in message
    assert 'Missing key(s) in state_dict: "head.weight"' in message
    assert 'Unexpected key(s) in state_dict: "extra.weight"' in message
    assert "size mismatch for first.fc.weight" in message and "(5, 3)" in message and "(4, 3)" in message
    np.testing.assert_array_equal(net.first.fc.bias.data, before)  # nothing copied on error


def test_load_state_dict_non_strict_returns_keys_but_still_rejects_shapes():
    net = Net()
    state = {k: v.copy() for k, v in net.state_dict().items()}
    del state["head.weight"]
    state["extra"] = np.zeros(1)
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head.weight"] and result.unexpected_keys == ["extra"]
    state["first.scale"] = np.zeros(7)
    with pytest.raises(RuntimeError, match="size mismatch for first.scale"):
        net.load_state_dict(state, strict=False)


def test_load_state_dict_converts_dtype():
    net = Net()
    state = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert net.first.fc.weight.dtype == np.float32


def test_to_dtype_keeps_parameter_identity_and_converts_grads_and_float_buffers():
    net = Net()
    params = list(net.parameters())
    net.first.fc.weight.grad = np.ones((4, 3), np.float32)
    assert net.to(dtype=np.float64) is net
    assert [p is q for p, q in zip(params, net.parameters())] == [True] * len(params)
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net.first.fc.weight.grad.dtype == np.float64
    assert net.norm.running_mean.dtype == np.float64
    assert net.norm.num_batches_tracked.dtype == np.int64  # integer buffers keep their dtype
    net.to(np.float32)  # a dtype as the only argument, as in PyTorch
    assert net.head.weight.dtype == np.float32
    with pytest.raises(TypeError, match="floating point"):
        net.to(dtype=np.int32)


def test_to_device_moves_everything_and_cpu_to_cpu_copies_nothing(device):
    net = Net()
    arrays = [p.data for p in net.parameters()]
    assert net.to(device=device) is net
    if device == "cpu":
        assert all(p.data is a for p, a in zip(net.parameters(), arrays))
    assert all(p.device == device for p in net.parameters())
    assert all(dp.backend.device_of(b) == device for b in net.buffers())
    x = dp.tensor(dp.backend.to_device(np.ones((2, 3), np.float32), device))
    assert net(x).device == device


def test_train_eval_propagate():
    net = Net()
    assert net.training and net.first.fc.training
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_sets_none_or_zeros():
    net = Net()
    x = dp.tensor(np.ones((3, 3), np.float32))
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=False)
    assert all(not np.any(p.grad) for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_assignment_rules():
    block = Block()
    block.fc = None  # a registered module may be set to None
    assert block.fc is None and [n for n, _ in block.named_parameters()] == ["scale"]
    with pytest.raises(TypeError, match="parameter 'scale'"):
        block.scale = np.ones(4)
    with pytest.raises(TypeError, match="buffer 'count'"):
        block.count = 3
    block.count = np.ones((), np.int64)  # a buffer takes arrays
    assert block.state_dict()["count"] == 1
    with pytest.raises(KeyError, match="already exists"):
        block.register_buffer("scale", np.ones(1))
    del block.scale
    assert "scale" not in dict(block.named_parameters())


def test_assigning_before_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(1, 1)

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Broken()


def test_apply_visits_children_first_and_requires_grad_():
    seen = []
    Net().apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["Linear", "Block", "BatchNorm1d", "Linear", "Net"]
    net = Net().requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())


def test_repr_is_nested_and_readable():
    text = repr(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Dropout(0.1))))
    assert text == ("Sequential(\n"
                    "  (0): Linear(in_features=2, out_features=3, bias=True)\n"
                    "  (1): ReLU()\n"
                    "  (2): Sequential(\n"
                    "    (0): Dropout(p=0.1)\n"
                    "  )\n"
                    ")")


def test_sequential_and_module_list_containers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[-1], nn.Linear) and isinstance(seq[1], nn.ReLU)
    assert [type(m).__name__ for m in seq[1:]] == ["ReLU", "Linear"]
    assert list(seq[1:]._modules) == ["1", "2"]  # a slice keeps the names
    with pytest.raises(IndexError):
        seq[3]
    x = dp.tensor(np.ones((4, 2), np.float32))
    expected = seq[2](seq[1](seq[0](x)))
    np.testing.assert_array_equal(seq(x).data, expected.data)
    layers = nn.ModuleList([nn.Linear(1, 1) for _ in range(3)])
    layers.append(nn.Linear(1, 2))
    assert len(layers) == 4 and [n for n, _ in layers.named_parameters()][-1] == "3.bias"


def test_parameter_defaults():
    p = nn.Parameter(np.zeros(3))
    assert p.requires_grad and p.is_leaf and p.dtype == np.float64
    assert repr(p).startswith("Parameter containing:")
    assert not nn.Parameter(np.zeros(1), requires_grad=False).requires_grad
    assert to_numpy(nn.Linear(2, 3).weight.data).dtype == np.float32  # float32 by default
    assert nn.Linear(2, 3, dtype=np.float64).weight.dtype == np.float64
