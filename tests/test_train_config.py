"""distprop train's configuration: TOML and flags resolved into one checked config,
and every kind of bad input ending the command with status 2 and one line."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from distprop.cli import build_parser
from distprop.errors import ConfigError
from distprop.train.cli import config_from_args
from distprop.train.config import TrainConfig, from_toml, load_toml, resolve_config, to_toml
from distprop.train.resume import reconcile
from train_helpers import digits_fixture, needs_mpiexec, run_train  # noqa: F401 - a fixture


def resolve(*argv):
    return config_from_args(build_parser("train").parse_args(["train", *map(str, argv)]))


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('model = "lenet"\nbatch-size = 64\nlr = 1\nhidden_sizes = [100, 50]\nnesterov = false\n')
    config = resolve("--config", path, "--lr", "0.02", "--channels", "4,8", "--epochs", 3)
    assert (config.model, config.batch_size, config.lr, config.hidden_sizes, config.nesterov) == \
        ("lenet", 64, 0.02, [100, 50], False)
    assert config.channels == [4, 8] and config.epochs == 3 and config.optimizer == "sgd"
    assert isinstance(resolve("--config", path).lr, float)  # TOML's integer 1 where a number is due
    assert config.explicit == {"model", "batch_size", "lr", "hidden_sizes", "nesterov", "channels", "epochs"}
    assert resolve("--no-nesterov", "--hidden-sizes", 7, 8).hidden_sizes == [7, 8]
    assert resolve("--resume").resume == "latest" and resolve("--resume", "x/y").resume == "x/y"


def test_the_saved_config_reads_back_as_the_same_config(tmp_path):
    config = resolve("--model", "transformer", "--d-model", 32, "--optimizer", "adamw", "--betas", "0.8,0.9",
                     "--clip-grad-norm", 2, "--timeline", "t.json", "--out", "elsewhere")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    again = resolve_config(from_toml(load_toml(path), path), {})
    assert again.to_dict() == {**config.to_dict(), "timeline": None, "out": "runs/train"}
    text = path.read_text()
    assert "# hidden_sizes =  (mlp or lenet only)" in text and "# blocks_per_stage = 3  (resnet20 only)" in text
    assert "# vocab_size =  (not set)" in text
    assert '# timeline = "t.json"  (this run\'s)' in text


def test_a_config_holds_the_sizes_of_the_model_it_trains():
    assert (resolve().hidden_sizes, resolve("--model", "lenet").hidden_sizes) == ([256], [120, 84])
    assert resolve("--model", "lenet").channels == [6, 16] and resolve("--model", "resnet20").widths == [16, 32, 64]
    assert resolve("--model", "lenet", "--hidden-sizes", 50).hidden_sizes == [50]
    assert resolve("--model", "transformer").hidden_sizes is None  # not one of its options


def saved_run(**saved):
    """What `reconcile` reads of a checkpoint written by `distprop train`."""
    config = {**TrainConfig().to_dict(), "input_column": "image", "num_classes": 10, **saved}
    return SimpleNamespace(path="runs/a/checkpoints/step-00000044", config=config, extra={"trainer": {}})


def test_a_resumed_config_takes_the_checkpoints_options_but_where_it_runs():
    checkpoint = saved_run(lr=0.05, epochs=3, device="cpu", threads=1, log_every=7)
    config = reconcile(resolve("--resume", "--epochs", 5), checkpoint)
    assert (config.lr, config.epochs, config.log_every, config.input_column, config.num_classes) == \
        (0.05, 5, 7, "image", 10)
    assert (config.device, config.threads) == ("auto", None)  # this run's, fixed before the checkpoint is read
    # Giving again what the checkpoint holds, the model's default sizes included, is no contradiction.
    again = resolve("--resume", "--hidden-sizes", 256, "--input-column", "image", "--num-classes", 10, "--lr", 0.05)
    assert reconcile(again, checkpoint).hidden_sizes == [256]
    with pytest.raises(ConfigError) as info:
        reconcile(resolve("--resume", "--hidden-sizes", 128), checkpoint)
    assert str(info.value) == ("hidden_sizes = [128] contradicts the checkpoint's hidden_sizes = [256] "
                               "(runs/a/checkpoints/step-00000044); a resumed job keeps its model, data, optimizer "
                               "and schedule (use another --out for a new job)")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--dropout", "1"], "--dropout: must be below 1.0, got 1.0"),
    (["--optimizer", "adm"], "--optimizer: 'adm' is not one of sgd, adam, adamw (did you mean 'adam'?)"),
    (["--hidden-sizes", "64", "x"], "--hidden-sizes: expected an integer, got 'x'"),
    (["--d-model", "32"], "d_model applies to model transformer, not 'mlp'"),
    (["--schedule", "step"], "schedule 'step' needs lr_step_size (steps between decays)"),
    (["--steps", "10", "--warmup-steps", "10"], "warmup_steps (10) must be fewer than steps (10)"),
    (["--momentum", "0"], "nesterov needs a momentum above 0 (set momentum, or nesterov = false)"),
    (["--betas", "0.9"], "betas: expected two numbers, got [0.9]"),
    (["--keep-checkpoints", "1"], "--keep-checkpoints: must be at least 2, got 1"),
])
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(ConfigError) as info:
        resolve(*argv)
    assert str(info.value) == message


@pytest.mark.parametrize("toml, message", [
    ("lerning_rate = 0.1", "unknown key 'lerning_rate' (did you mean 'lr'?)"),
    ("epochs = 2.5", "epochs: expected an integer, got float 2.5"),
    ("nesterov = 1", "nesterov: expected true or false, got int 1"),
    ("[optimizer]\nlr = 1", "[optimizer] tables are not options; write the keys at the top level"),
    ("lr = ", "not valid TOML (Invalid value (at line 1, column 6))"),
    ("keep_checkpoints = 1", "keep_checkpoints: must be at least 2, got 1"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, toml, message):
    path = tmp_path / "job.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        resolve("--config", path)
    assert str(info.value) == f"{path}: {message}"


BAD_JOBS = {  # name: (arguments, the error line after "distprop train: error: ")
    "unknown key": (["--config", "{tmp}/job.toml"], "{tmp}/job.toml: unknown key 'batchsize' (did you mean "
                                                     "'batch_size'?)"),
    "unknown flag": (["--learning-rate", "0.1"], "unknown option --learning-rate (did you mean --lr?)"),
    "wrong type": (["--batch-size", "many"], "--batch-size: expected an integer, got 'many'"),
    "missing data": (["--data", "{tmp}/nowhere"], "data: {tmp}/nowhere does not exist"),
    "data without splits": (["--data", "{tmp}"], "data: {tmp} has no train/ or test/ split (a dataset "
                                                 "directory holds train/ and test/)"),
    "batch larger than the data": (["--data", "{digits}", "--batch-size", "2000"],
                                   "batch_size: 2000 per rank x {ranks} rank(s) is more than the 1438 samples "
                                   "of {digits}/train"),
    "unknown model": (["--model", "resnet"], "--model: 'resnet' is not one of mlp, lenet, resnet20, transformer "
                                             "(did you mean 'resnet20'?)"),
    "missing config file": (["--config", "{tmp}/missing.toml"], "config file {tmp}/missing.toml does not exist"),
    "value missing": (["--lr"], "argument --lr: expected one argument"),
    "missing checkpoint": (["--data", "{digits}", "--resume", "{tmp}/nowhere"],
                           "resume: {tmp}/nowhere: no such checkpoint or directory"),
    "unwritable output": (["--data", "{digits}", "--out", "{tmp}/job.toml/out"],
                          "out: [Errno 20] Not a directory: '{tmp}/job.toml/out'"),
}


def check_bad_job(tmp_path, digits, case, ranks):
    argv, expected = BAD_JOBS[case]
    (tmp_path / "job.toml").write_text("batchsize = 64\n")
    fill = dict(tmp=tmp_path, digits=digits, ranks=ranks)
    out = tmp_path / "out"
    result = run_train(["--out", out] + [a.format(**fill) for a in argv], ranks)  # a case may give its own --out
    assert result.returncode == 2, result.stderr
    ours = [line for line in result.stderr.splitlines() if "distprop" in line or "Traceback" in line]
    assert ours == ["distprop train: error: " + expected.format(**fill)], result.stderr
    assert result.stdout == "" and not out.exists()  # before any work, and nothing written


@pytest.mark.parametrize("case", BAD_JOBS)
def test_a_bad_config_exits_2_with_one_line(tmp_path, digits, case):
    check_bad_job(tmp_path, digits, case, 1)


@needs_mpiexec
@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown key", "missing data", "batch larger than the data", "unwritable output"])
def test_a_bad_config_ends_the_whole_mpi_job_with_one_line(tmp_path, digits, case):
    """Found before MPI starts (same verdict on every rank), after it (agreed over the
    ranks) or by rank 0 alone (shared with the others): either way every rank exits,
    and only rank 0 says why."""
    check_bad_job(tmp_path, digits, case, 2)


def test_import_distprop_reaches_subpackages_lazily():
    code = ("import sys, distprop as dp\n"
            "heavy = [m for m in ('pyarrow', 'safetensors', 'tqdm', 'cupy', 'distprop.data', 'distprop.train') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert dp.data.ArrowLoader.__name__ == 'ArrowLoader' and 'pyarrow' in sys.modules\n"
            "assert dp.save_checkpoint is dp.checkpoint.save_checkpoint and dp.train.TrainConfig\n"
            "assert 'data' in dir(dp) and not hasattr(dp, 'nonexistent')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DISTPROP_RETAIN_HOST_MEMORY": "1"})
    assert result.returncode == 0, result.stderr


def test_a_config_dataclass_field_has_a_flag_and_help():
    help_text = build_parser("train").format_help() + build_parser("train")._subparsers._group_actions[0] \
        .choices["train"].format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text, name
