"""distprop.save_checkpoint / load_checkpoint in one process: exact round trips, the
directory's layout and retention, what a checkpoint file holds (no pickle), errors
that name the checkpoint, and PyTorch reading model.safetensors."""

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import nn, optim
from distprop.checkpoint import CheckpointError, complete_checkpoints, newest_checkpoint, tree
from distprop.data import ArrowLoader, write_dataset
from distprop.optim import lr_scheduler
from distprop.parallel import SingleProcessCommunicator
from helpers import requires_torch, torch

COMM = SingleProcessCommunicator()


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data"
    write_dataset(path, {"x": rng.standard_normal((300, 12)).astype(np.float32),
                         "label": rng.integers(0, 5, 300)}, row_group_size=64)
    return str(path)


def make_job(dataset, optimizer="adam"):
    """A small model with dropout, an optimizer with state, warmup then cosine, a shuffling loader."""
    dp.manual_seed(0)
    model = nn.MLP(12, [16], 5, dropout=0.3)
    opt = (optim.Adam(model.parameters(), lr=0.01, amsgrad=True) if optimizer == "adam"
           else optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    schedule = lr_scheduler.SequentialLR(opt, [lr_scheduler.LinearLR(opt, 0.1, total_iters=3),
                                               lr_scheduler.CosineAnnealingLR(opt, T_max=20)], milestones=[3])
    loader = ArrowLoader(dataset, 16, seed=3)
    return model, opt, schedule, loader


def train(model, opt, schedule, loader, steps):
    """`steps` steps, continuing the loader's epoch and going on to the next ones."""
    done = 0
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            F.cross_entropy(model(dp.tensor(batch["x"])), batch["label"]).backward()
            opt.step()
            schedule.step()
            done += 1
            if done == steps:
                return
        loader.set_epoch(loader.epoch + 1)


def snapshot(model, opt):
    state = opt.state_dict()
    arrays = {f"model.{k}": v.copy() for k, v in model.state_dict().items()}
    arrays.update({f"opt.{i}.{k}": np.array(v) for i, entry in state["state"].items() for k, v in entry.items()})
    return arrays, [dict(g, params=None) for g in state["param_groups"]]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resuming_is_bitwise_the_same_as_not_stopping(tmp_path, dataset, optimizer):
    model, opt, schedule, loader = make_job(dataset, optimizer)
    train(model, opt, schedule, loader, 7)  # stops mid-epoch (18 batches per epoch)
    dp.save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=schedule, loader=loader, step=7,
                       comm=COMM)
    train(model, opt, schedule, loader, 20)  # into the next epochs
    expected, expected_groups = snapshot(model, opt)

    model, opt, schedule, loader = make_job(dataset, optimizer)
    dp.manual_seed(123)  # whatever the generator holds now is replaced by the checkpoint's
    checkpoint = dp.load_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=schedule,
                                    loader=loader, comm=COMM)
    assert checkpoint.step == 7
    train(model, opt, schedule, loader, 20)
    found, groups = snapshot(model, opt)
    assert expected.keys() == found.keys()
    for key in expected:
        assert expected[key].tobytes() == found[key].tobytes(), key
    assert groups == expected_groups


def test_extra_and_config_come_back_with_their_types(tmp_path):
    model = nn.Linear(3, 2)
    extra = {"trainer": {"epoch": 2, "done": False, "lr": 0.1 / 3, "history": [(1, 2.5), (2, None)]},
             "by_index": {0: "a", 7: np.arange(3)}, "__array__": "not a tag", "weights": np.ones((2, 2)),
             "count": np.array(3), "none": np.zeros((0, 4))}
    dp.save_checkpoint(tmp_path, model=model, step=5, extra=extra, config={"model": "linear"}, comm=COMM)
    checkpoint = dp.load_checkpoint(tmp_path, comm=COMM)
    got = checkpoint.extra
    assert got["trainer"] == extra["trainer"] and isinstance(got["trainer"]["history"][0], tuple)
    assert got["by_index"][0] == "a" and np.array_equal(got["by_index"][7], np.arange(3))
    assert got["__array__"] == "not a tag" and np.array_equal(got["weights"], np.ones((2, 2)))
    assert got["count"].shape == () and got["count"] == 3 and got["none"].shape == (0, 4)
    assert checkpoint.config == {"model": "linear"} and checkpoint.world_size == 1


def test_tree_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError, match=r"extra\.when: a checkpoint stores"):
        tree.split({"extra": {"when": object()}}, "")


def test_files_are_safetensors_and_json_and_load_without_pickle(tmp_path, dataset, monkeypatch):
    model, opt, schedule, loader = make_job(dataset)
    train(model, opt, schedule, loader, 3)
    path = dp.save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=schedule, loader=loader, step=3,
                              comm=COMM)
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors", "state.safetensors"]
    for name in ("model.safetensors", "state.safetensors"):
        with open(os.path.join(path, name), "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))  # the format: a JSON header, then raw bytes
        assert all(set(entry) == {"dtype", "shape", "data_offsets"} for key, entry in header.items()
                   if key != "__metadata__")
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["optimizer"]["class"] == "Adam" and meta["loader"]["batches_consumed"] == 3

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must load without unpickling anything")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    model2, opt2, schedule2, loader2 = make_job(dataset)
    dp.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=schedule2, loader=loader2, comm=COMM)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert np.array_equal(a, b), key


def test_layout_latest_marker_and_retention(tmp_path):
    model = nn.Linear(3, 2)
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        dp.save_checkpoint(root, model=model, step=step, keep=2, comm=COMM)
    assert sorted(os.listdir(root)) == ["latest", "step-00000030", "step-00000040"]
    assert (root / "latest").read_text() == "step-00000040\n"
    # A step directory without meta.json (not written by distprop) and a write that never finished.
    (root / "step-00000050").mkdir()
    (root / ".step-00000060.tmp-0123abcd").mkdir()
    assert [step for step, _ in complete_checkpoints(root)] == [30, 40]
    assert newest_checkpoint(root) == str(root / "step-00000040")
    (root / "latest").write_text("step-00000035\n")  # names no complete checkpoint: the highest step wins
    assert newest_checkpoint(root) == str(root / "step-00000040")
    assert dp.load_checkpoint(tmp_path, comm=COMM).step == 40  # a run directory holding checkpoints/
    dp.save_checkpoint(root, model=model, step=45, keep=2, comm=COMM)
    assert not (root / ".step-00000060.tmp-0123abcd").exists()


def test_resumed_from_an_older_checkpoint_the_new_run_wins(tmp_path):
    """Saving step 20 again after resuming from step 10 replaces the abandoned step 20;
    a later-numbered abandoned checkpoint is neither counted nor deleted, and `latest`
    names the new one."""
    model = nn.Linear(3, 2)
    for step in (10, 20, 30):
        dp.save_checkpoint(tmp_path, model=model, step=step, comm=COMM)
    model.weight.data[...] = 7
    dp.save_checkpoint(tmp_path, model=model, step=20, keep=2, comm=COMM)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000010", "step-00000020", "step-00000030"]
    checkpoint = dp.load_checkpoint(tmp_path, comm=COMM)
    assert checkpoint.step == 20 and (checkpoint.model_state["weight"] == 7).all()


@pytest.mark.parametrize("keep", [0, 1, 2.5])
def test_keep_below_two_is_refused(tmp_path, keep):
    with pytest.raises(ValueError, match="keep must be an integer >= 2"):
        dp.save_checkpoint(tmp_path, model=nn.Linear(2, 2), step=1, keep=keep, comm=COMM)


def test_what_does_not_fit_is_a_one_line_error_naming_the_checkpoint(tmp_path):
    path = dp.save_checkpoint(tmp_path, model=nn.MLP(4, [8], 3), optimizer=optim.SGD(nn.Linear(1, 1).parameters()),
                              step=1, comm=COMM)
    with pytest.raises(CheckpointError) as info:
        dp.load_checkpoint(tmp_path, model=nn.MLP(4, [16], 3), comm=COMM)
    assert str(info.value) == (f"{path}: model.safetensors has '1.weight' of shape (8, 4), "
                               "the model (MLP) has (16, 4)")
    with pytest.raises(CheckpointError, match=r"does not fit the model \(Linear\): missing 'weight', 'bias'; "
                                              r"unexpected '1.weight', '1.bias', '3.weight' and 1 more"):
        dp.load_checkpoint(tmp_path, model=nn.Linear(4, 3), comm=COMM)
    with pytest.raises(CheckpointError, match="holds SGD optimizer state, not Adam"):
        model = nn.MLP(4, [8], 3)
        dp.load_checkpoint(tmp_path, model=model, optimizer=optim.Adam(model.parameters()), comm=COMM)
    with pytest.raises(CheckpointError, match="holds no scheduler state"):
        opt = optim.SGD(nn.Linear(1, 1).parameters())
        dp.load_checkpoint(tmp_path, scheduler=lr_scheduler.StepLR(opt, 2), comm=COMM)


def test_damaged_checkpoints_are_errors_not_crashes(tmp_path):
    path = dp.save_checkpoint(tmp_path, model=nn.Linear(30, 20), step=1, comm=COMM)
    model_file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(model_file)
    with open(model_file, "r+b") as file:
        file.truncate(size - 10)
    with pytest.raises(CheckpointError, match=f"{size - 10} bytes, meta.json recorded {size} bytes"):
        dp.load_checkpoint(path, comm=COMM)
    with open(os.path.join(path, "meta.json"), "w") as file:
        file.write('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a distprop checkpoint"):
        dp.load_checkpoint(path, comm=COMM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        dp.load_checkpoint(tmp_path / "empty", comm=COMM)
    with pytest.raises(CheckpointError, match="no such checkpoint or directory"):
        dp.load_checkpoint(tmp_path / "nowhere", comm=COMM)


def test_an_unwritable_directory_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoint step 3"):
        dp.save_checkpoint(blocker, model=nn.Linear(2, 2), step=3, comm=COMM)


@requires_torch
def test_pytorch_loads_model_safetensors_into_the_same_architecture(tmp_path):
    from safetensors.torch import load_file

    from distprop.bench import torch_models

    rng = np.random.default_rng(0)
    dp.manual_seed(0)
    for ours, twin_of, shape in ((nn.MLP(64, [32, 16], 10), lambda m: torch_models.mlp(64, [32, 16], 10), (5, 64)),
                                 (nn.resnet_small(10, widths=(4, 8), blocks_per_stage=1), torch_models.ResNet,
                                  (2, 3, 8, 8))):
        ours.train()
        ours(dp.tensor(rng.standard_normal((4,) + shape[1:]).astype(np.float32)))  # moves batch-norm statistics
        ours.eval()
        path = dp.save_checkpoint(tmp_path / type(ours).__name__, model=ours, step=0, comm=COMM)
        twin = twin_of(ours)
        loaded = load_file(os.path.join(path, "model.safetensors"))
        shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in loaded.items()} == shapes  # 0-d buffers stay 0-d
        twin.load_state_dict(loaded)
        twin.eval()
        x = rng.standard_normal(shape).astype(np.float32)
        expected = ours(dp.tensor(x)).data
        with torch.no_grad():
            got = twin(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@requires_torch
def test_the_readmes_pytorch_snippet_loads_the_default_jobs_model(tmp_path, monkeypatch):
    """The README's code, as written, on the checkpoint path it names."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = next(block for block in readme.split("```python")[1:] if "safetensors.torch" in block)
    snippet = snippet.split("```")[0]
    dp.manual_seed(0)
    ours = nn.MLP(64, [256], 10)
    monkeypatch.chdir(tmp_path)
    dp.save_checkpoint("runs/train/checkpoints", model=ours, step=880, comm=COMM)
    names = {}
    exec(snippet, names)  # noqa: S102 - the README's own text
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        got = names["twin"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ours(dp.tensor(x)).data, rtol=1e-5, atol=1e-5)
