"""Continuing a job from a checkpoint: which one, with which config, at which batch."""

from __future__ import annotations

import os

from distprop.checkpoint import layout
from distprop.errors import ConfigError
from distprop.train.config import INVOCATION, OPTIONS, TRAJECTORY, validate

# Applied when the job starts, before any checkpoint is read: where this run runs,
# never taken from the checkpoint (the resumed run may be on other machines).
PLACED_AT_START = ("device", "threads")


def checkpoint_to_resume(config) -> str | None:
    """The path to read, or None to start afresh (resume 'latest' with no checkpoint yet)."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        return layout.newest_checkpoint(os.path.join(config.out, "checkpoints"))
    return config.resume


def check_fresh_start(config) -> None:
    """A new run must not mix its checkpoints with another run's."""
    newest = layout.newest_checkpoint(os.path.join(config.out, "checkpoints"))
    if config.resume is None and newest is not None:
        raise ConfigError(f"out: {config.out} already holds checkpoints ({os.path.basename(newest)}); pass "
                          "--resume to continue that run, or choose another --out")


def check_branch(config, checkpoint) -> None:
    """A run resumed from another directory's checkpoint must not write among a third
    run's checkpoints (keeping the newest K would delete theirs)."""
    newest = layout.newest_checkpoint(os.path.join(config.out, "checkpoints"))
    if newest is not None and not is_own(config, checkpoint):
        raise ConfigError(f"out: {config.out} already holds checkpoints ({os.path.basename(newest)}); resuming "
                          f"there from {checkpoint.path}, outside it, would mix two runs: choose another --out")


def is_own(config, checkpoint) -> bool:
    """Whether `checkpoint` is one of OUT's own."""
    own = os.path.realpath(os.path.join(config.out, "checkpoints"))
    return os.path.dirname(os.path.realpath(checkpoint.path)) == own


def reconcile(config, checkpoint):
    """The config to resume with: the checkpoint's value of every option this
    invocation did not give (but out, resume, stop_at, keep_global_batch, the
    timeline's, device and threads), so that ``--resume`` alone continues the same
    job. A given trajectory option (model, data, optimizer, schedule, batch, seed)
    that differs from the checkpoint's is an error, raised before anything is written."""
    saved = checkpoint.config
    extra = checkpoint.extra
    if not isinstance(saved, dict) or "model" not in saved or not isinstance(extra, dict) or "trainer" not in extra:
        raise ConfigError(f"resume: {checkpoint.path} holds no distprop train config (written by another "
                          "script?); load it with distprop.load_checkpoint instead")
    updates = {}
    for name in OPTIONS:
        if name not in saved or name in INVOCATION or name in PLACED_AT_START:
            continue
        if name not in config.explicit:
            updates[name] = saved[name]
        elif name in TRAJECTORY and _normal(getattr(config, name)) != _normal(saved[name]):
            raise ConfigError(f"{name} = {getattr(config, name)!r} contradicts the checkpoint's {name} = "
                              f"{saved[name]!r} ({checkpoint.path}); a resumed job keeps its model, data, "
                              "optimizer and schedule (use another --out for a new job)")
    resumed = config.replaced(**updates)
    validate(resumed)
    return resumed


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def per_rank_batch(config, checkpoint, trainer_state: dict, world_size: int) -> int:
    """The batch each rank takes after resuming: the saved one at the same world
    size; at another, config.batch_size, or with keep_global_batch the saved global
    batch divided over the new ranks (an error if it does not divide)."""
    if checkpoint is None:
        return config.batch_size
    saved_batch, saved_size = trainer_state["per_rank_batch"], checkpoint.world_size
    if world_size == saved_size:
        return saved_batch
    if not config.keep_global_batch:
        return config.batch_size
    total = saved_batch * saved_size
    if total % world_size:
        raise ConfigError(f"keep_global_batch: the checkpoint's global batch of {total} ({saved_batch} x "
                          f"{saved_size} ranks) does not divide over {world_size} ranks")
    return total // world_size


def metrics_lines_to_keep(config, checkpoint, trainer_state: dict) -> int | None:
    """metrics.jsonl lines to keep: a checkpoint of this run's own keeps what was
    written up to it; one from elsewhere starts a new file."""
    if checkpoint is None or not is_own(config, checkpoint):
        return None
    return trainer_state["metrics_lines"]

