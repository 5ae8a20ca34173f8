"""The training job's configuration: one dataclass, read from TOML and flags.

Every option has the same name in a TOML file (``batch_size = 64``; ``batch-size``
is accepted too) and on the command line (``--batch-size 64``). Flags override the
file, the file overrides the defaults. Values are checked before anything runs:
an unknown name gets the closest valid one suggested, a value of the wrong type or
out of range says which option, which value and where it came from.

When resuming, an option not given takes the checkpoint's value, so ``--resume``
alone continues the same job. *Trajectory* options decide what is computed
(model, data, optimizer, schedule, batch, seed): giving one that differs from the
checkpoint's is an error. *Run* options (length, logging, checkpoints) may be
changed. *Invocation* options (out, resume, stop_at, keep_global_batch, timeline)
belong to one command and are never taken from a checkpoint, nor are device and
threads (the resumed run may run elsewhere). Sizes whose default depends on the
model are filled in, so a config says what is trained.

TOML is read with the standard library's `tomllib` (Python >= 3.11); on Python
3.10 the `tomli` package, which distprop then depends on, provides the same module.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from distprop.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

MODELS = ("mlp", "lenet", "resnet20", "transformer")
# Sizes whose default depends on the model; a config holds the model's own once built,
# so what is printed, saved and compared on resume is what is trained.
MODEL_SIZES = {"mlp": {"hidden_sizes": [256]},
               "lenet": {"hidden_sizes": [120, 84], "channels": [6, 16]},
               "resnet20": {"widths": [16, 32, 64]}}
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")
DEVICES = ("auto", "cpu", "gpu")
PROGRESS = ("auto", "bar", "log", "none")


def option(default, help: str, *, type=None, kind: str = "run", choices=None, minimum=None, below=None,
           models=None, is_list: bool = False, optional: bool = False, metavar: str | None = None):
    """A config field: `type` of the value (of each item, for lists), `minimum`
    (inclusive) and `below` (exclusive) bounds, `models` it applies to, the flag's
    `metavar` in --help (default: the type's name)."""
    kind_of_value = type or (bool if isinstance(default, bool) else default.__class__)
    meta = dict(help=help, type=kind_of_value, kind=kind, choices=choices, minimum=minimum, below=below,
                models=models, is_list=is_list, optional=optional, metavar=metavar)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # -- model ---------------------------------------------------------------------
    model: str = option("mlp", "model to train", kind="trajectory", choices=MODELS)
    hidden_sizes: list = option(None, "hidden layer widths (default: mlp [256]; lenet's classifier [120, 84])",
                                type=int, kind="trajectory", is_list=True, optional=True, minimum=1,
                                models=("mlp", "lenet"))
    channels: list = option(None, "lenet: channels of its two convolutions (default [6, 16])", type=int,
                            kind="trajectory", is_list=True, optional=True, minimum=1, models=("lenet",))
    widths: list = option(None, "resnet20: width of each stage (default [16, 32, 64])", type=int,
                          kind="trajectory", is_list=True, optional=True, minimum=1, models=("resnet20",))
    blocks_per_stage: int = option(3, "resnet20: residual blocks per stage (3 is ResNet-20)", kind="trajectory",
                                   minimum=1, models=("resnet20",))
    d_model: int = option(64, "transformer: embedding width", kind="trajectory", minimum=1,
                          models=("transformer",))
    nhead: int = option(4, "transformer: attention heads", kind="trajectory", minimum=1, models=("transformer",))
    num_layers: int = option(2, "transformer: encoder layers", kind="trajectory", minimum=1,
                             models=("transformer",))
    dim_feedforward: int = option(128, "transformer: feed-forward width", kind="trajectory", minimum=1,
                                  models=("transformer",))
    vocab_size: int = option(None, "transformer on integer token columns: vocabulary size", type=int,
                             kind="trajectory", optional=True, minimum=1, models=("transformer",))
    dropout: float = option(0.0, "dropout probability in the model", kind="trajectory", minimum=0.0, below=1.0)
    # -- data ----------------------------------------------------------------------
    data: str = option("digits", "dataset: a directory with train/ and test/ splits in distprop's Parquet "
                       "format, or 'digits' (UCI digits, written under OUT/data on first use)",
                       kind="trajectory", metavar="PATH")
    input_column: str = option(None, "column fed to the model (default: the dataset's recorded input column, "
                               "else 'image', 'features', 'input' or the only column besides the label)",
                               type=str, kind="trajectory", optional=True, metavar="COLUMN")
    label_column: str = option(None, "integer class column (default: the dataset's recorded label column, "
                               "else 'label')", type=str, kind="trajectory", optional=True, metavar="COLUMN")
    num_classes: int = option(None, "number of classes (default: largest label in train/ + 1)", type=int,
                              kind="trajectory", optional=True, minimum=2)
    # -- optimization --------------------------------------------------------------
    optimizer: str = option("sgd", "optimizer", kind="trajectory", choices=OPTIMIZERS)
    lr: float = option(0.1, "learning rate (peak, after warmup)", kind="trajectory", minimum=0.0)
    momentum: float = option(0.9, "sgd: momentum", kind="trajectory", minimum=0.0)
    nesterov: bool = option(True, "sgd: Nesterov momentum", kind="trajectory")
    betas: list = option([0.9, 0.999], "adam/adamw: the two moment decay rates", type=float,
                         kind="trajectory", is_list=True, minimum=0.0, below=1.0)
    eps: float = option(1e-8, "adam/adamw: denominator epsilon", kind="trajectory", minimum=0.0)
    weight_decay: float = option(1e-4, "weight decay (L2 for sgd/adam, decoupled for adamw)", kind="trajectory",
                                 minimum=0.0)
    schedule: str = option("cosine", "learning-rate schedule after warmup, over optimizer steps",
                           kind="trajectory", choices=SCHEDULES)
    warmup_steps: int = option(0, "linear warmup steps", kind="trajectory", minimum=0)
    warmup_start_factor: float = option(0.1, "warmup starts at this fraction of lr, in (0, 1]",
                                        kind="trajectory", minimum=0.0)
    lr_step_size: int = option(None, "step schedule: multiply lr by lr_gamma every this many steps", type=int,
                               kind="trajectory", optional=True, minimum=1)
    lr_gamma: float = option(0.1, "step schedule: the factor", kind="trajectory", minimum=0.0)
    min_lr: float = option(0.0, "cosine schedule: the lr it ends at", kind="trajectory", minimum=0.0)
    scale_lr: bool = option(False, "linear scaling rule: lr is for one rank's batch, multiplied by the "
                            "global batch over batch_size (the number of ranks)", kind="trajectory")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", kind="trajectory", minimum=0.0,
                                    below=1.0)
    clip_grad_norm: float = option(None, "clip the gradients' global 2-norm to this", type=float,
                                   kind="trajectory", optional=True, minimum=0.0)
    batch_size: int = option(32, "samples per rank per micro-batch", kind="trajectory", minimum=1)
    accumulation_steps: int = option(1, "micro-batches per optimizer step (gradient accumulation)",
                                     kind="trajectory", minimum=1)
    seed: int = option(0, "seed of the model's initialisation, the data order and dropout", kind="trajectory",
                       minimum=0)
    # -- length --------------------------------------------------------------------
    epochs: int = option(40, "epochs to train (ignored when steps is given)", minimum=1)
    steps: int = option(None, "optimizer steps to train instead of epochs", type=int, optional=True, minimum=1)
    stop_at: int = option(None, "end this run after this optimizer step, with a checkpoint, as a "
                          "time-limited allocation would (the schedule is that of the whole job)", type=int,
                          optional=True, minimum=1, kind="invocation")
    # -- evaluation, output, checkpoints ---------------------------------------------
    eval_every: int = option(0, "also evaluate every this many steps (0: at the end of each epoch only)",
                             minimum=0)
    eval_batch_size: int = option(256, "samples per rank per evaluation batch", minimum=1)
    out: str = option("runs/train", "output directory: config, metrics.jsonl, summary.json, checkpoints/",
                      kind="invocation", metavar="DIR")
    checkpoint_every: int = option(0, "write a checkpoint every this many steps (0: at the end of each "
                                   "epoch), and always at the end", minimum=0)
    keep_checkpoints: int = option(3, "complete checkpoints to keep (at least 2)", minimum=2)
    resume: str = option(None, "continue from the newest complete checkpoint in OUT ('latest') or from "
                         "this checkpoint or directory", type=str, optional=True, kind="invocation")
    keep_global_batch: bool = option(False, "when resuming at another world size, rescale batch_size so "
                                     "that the global batch stays the same", kind="invocation")
    # -- seeing the run ------------------------------------------------------------
    log_every: int = option(50, "log (and append to metrics.jsonl) every this many steps", minimum=1)
    progress: str = option("auto", "rank 0's progress: a bar on a terminal, log lines otherwise ('auto'), "
                           "or 'bar', 'log', 'none'", choices=PROGRESS)
    verbose: bool = option(False, "other ranks print their own log lines too")
    timeline: str = option(None, "write a Chrome trace (Perfetto, chrome://tracing) of a window of steps "
                           "to this file", type=str, optional=True, kind="invocation", metavar="FILE")
    timeline_start: int = option(10, "first step of the timeline's window (clamped to the run)", minimum=1,
                                 kind="invocation")
    timeline_steps: int = option(5, "steps in the timeline's window", minimum=1, kind="invocation")
    timing_warmup: int = option(10, "steps at the start of the run left out of summary.json's phase means",
                                minimum=0)
    # -- where it runs ---------------------------------------------------------------
    device: str = option("auto", "cpu, gpu, or auto (a GPU where every rank has one)", choices=DEVICES)
    threads: int = option(None, "CPU threads per rank (default: the node's cores shared among its ranks)",
                          type=int, optional=True, minimum=1)
    bucket_mb: float = option(25.0, "gradient bucket size for the overlapped allreduce (MB)", minimum=0.001)

    def __post_init__(self):
        for name, size in MODEL_SIZES.get(self.model, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, list(size))

    @property
    def explicit(self) -> frozenset:
        """Names given in the TOML file or as flags (set by `resolve_config`)."""
        return getattr(self, "_explicit", frozenset())

    def replaced(self, **changes) -> "TrainConfig":
        """A copy with `changes`, the same names counting as given."""
        config = replace(self, **changes)
        config._explicit = self.explicit
        return config

    def to_dict(self) -> dict:
        return asdict(self)


OPTIONS = {f.name: f for f in fields(TrainConfig)}
TRAJECTORY = tuple(name for name, f in OPTIONS.items() if f.metadata["kind"] == "trajectory")
INVOCATION = tuple(name for name, f in OPTIONS.items() if f.metadata["kind"] == "invocation")


# ---- reading values ----------------------------------------------------------------

def load_toml(path) -> dict:
    """The TOML file's key/value pairs (one-line ConfigError if missing or malformed)."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


# Names other trainers use, for suggestions only.
_SYNONYMS = {"learning_rate": "lr", "scheduler": "schedule", "lr_schedule": "schedule",
             "num_epochs": "epochs", "max_epochs": "epochs", "max_steps": "steps", "total_steps": "steps",
             "train_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
             "gradient_accumulation_steps": "accumulation_steps", "max_grad_norm": "clip_grad_norm",
             "output_dir": "out", "save_steps": "checkpoint_every", "save_total_limit": "keep_checkpoints",
             "logging_steps": "log_every", "eval_steps": "eval_every", "warmup": "warmup_steps"}


def closest_option(name: str) -> str | None:
    """The valid option name nearest to a misspelt one (underscores), if any is near."""
    candidates = list(OPTIONS) + list(_SYNONYMS)
    close = difflib.get_close_matches(name.replace("-", "_"), candidates, n=1, cutoff=0.6)
    return _SYNONYMS.get(close[0], close[0]) if close else None


def from_toml(values: dict, path) -> dict:
    """Checked, typed values of a TOML file's table."""
    checked = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: [{key}] tables are not options; write the keys at the top level")
        if name not in OPTIONS:
            close = closest_option(key)
            hint = f" (did you mean '{close}'?)" if close else " (distprop train --help lists the options)"
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        checked[name] = check_value(name, value, f"{path}: {key}")
    return checked


def check_value(name: str, value, where: str):
    """`value` as option `name` takes it (ints become floats where a float is due)."""
    meta = OPTIONS[name].metadata
    if value is None:
        if meta["optional"]:
            return None
        raise ConfigError(f"{where}: a value is required")
    if meta["is_list"]:
        if not isinstance(value, list):
            value = [value]
        if not value:
            raise ConfigError(f"{where}: the list is empty")
        return [_check_scalar(meta, item, f"{where}[{i}]") for i, item in enumerate(value)]
    return _check_scalar(meta, value, where)


def _check_scalar(meta, value, where):
    kind = meta["type"]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(meta['choices'])}{hint}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{where}: must be at least {meta['minimum']}, got {value!r}")
    if meta["below"] is not None and value >= meta["below"]:
        raise ConfigError(f"{where}: must be below {meta['below']}, got {value!r}")
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def parse_flag(name: str, text, flag: str):
    """A flag's string(s) converted to the option's type, then checked."""
    meta = OPTIONS[name].metadata
    if meta["is_list"]:
        items = [item for part in text for item in str(part).split(",") if item != ""]
        return check_value(name, [_convert(meta["type"], item, flag) for item in items], flag)
    if isinstance(text, bool) or meta["type"] is str:
        return check_value(name, text, flag)
    return check_value(name, _convert(meta["type"], text, flag), flag)


def _convert(kind, text: str, flag: str):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected {_TYPE_NAMES[kind]}, got '{text}'") from None


# ---- the resolved config -------------------------------------------------------------

def resolve_config(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, then the file's values, then the flags'; checked as a whole."""
    config = TrainConfig(**{**file_values, **flag_values})
    config._explicit = frozenset(file_values) | frozenset(flag_values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that involve several options (each value alone was checked already)."""
    for name in sorted(config.explicit):
        models = OPTIONS[name].metadata["models"]
        if models and config.model not in models and getattr(config, name) != _default(name):
            raise ConfigError(f"{name} applies to model {' or '.join(models)}, not '{config.model}'")
    if not 0 < config.warmup_start_factor <= 1:
        raise ConfigError(f"warmup_start_factor: must be in (0, 1], got {config.warmup_start_factor}")
    if len(config.betas) != 2:
        raise ConfigError(f"betas: expected two numbers, got {config.betas}")
    if config.schedule == "step" and config.lr_step_size is None:
        raise ConfigError("schedule 'step' needs lr_step_size (steps between decays)")
    if config.optimizer == "sgd" and config.nesterov and config.momentum == 0:
        raise ConfigError("nesterov needs a momentum above 0 (set momentum, or nesterov = false)")
    if config.steps is not None and config.warmup_steps >= config.steps:
        raise ConfigError(f"warmup_steps ({config.warmup_steps}) must be fewer than steps ({config.steps})")
    if config.model == "lenet" and config.channels is not None and len(config.channels) != 2:
        raise ConfigError(f"channels: lenet has two convolutions, got {len(config.channels)} widths")


def _default(name: str):
    option = OPTIONS[name]
    return option.default_factory() if option.default is MISSING else option.default


def to_toml(config: TrainConfig) -> str:
    """The config as a TOML file `--config` reads back: unset options, other models'
    and this invocation's own (out, resume, stop_at, ...: reading the file again must
    not replay them) commented out."""
    lines = []
    for name, value in config.to_dict().items():
        models = OPTIONS[name].metadata["models"]
        if models and config.model not in models:
            shown = "" if value is None else _toml_value(value) + " "
            lines.append(f"# {name} = {shown} ({' or '.join(models)} only)")
        elif value is None:
            lines.append(f"# {name} =  (not set)")
        elif name in INVOCATION:
            lines.append(f"# {name} = {_toml_value(value)}  (this run's)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def describe(config: TrainConfig) -> str:
    """Several lines: every option that applies to the model and its value, marking
    those given explicitly."""
    width = max(map(len, OPTIONS))
    return "\n".join(f"  {name:<{width}}  {value!r}{'  (given)' if name in config.explicit else ''}"
                      for name, value in config.to_dict().items()
                      if config.model in (OPTIONS[name].metadata["models"] or (config.model,)))

