"""`distprop train`: the whole training job -- config, data, model, evaluation,
checkpoints with exact resume, progress, metrics, timeline. `distprop plot` draws
its metrics. See `job` for the order of things, `trainer` for the loop."""

from distprop.train.config import TrainConfig

__all__ = ["TrainConfig"]
