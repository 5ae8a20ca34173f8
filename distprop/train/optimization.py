"""The job's optimizer and learning-rate schedule, from the config."""

from __future__ import annotations

from distprop import optim
from distprop.errors import ConfigError
from distprop.optim import lr_scheduler


def peak_lr(config, per_rank_batch: int, world_size: int) -> float:
    """The configured lr; with scale_lr, times the global batch over batch_size (Goyal
    et al.'s linear scaling rule: lr is given for one rank's batch)."""
    if not config.scale_lr:
        return config.lr
    return config.lr * per_rank_batch * world_size / config.batch_size


def build_optimizer(config, parameters, lr: float) -> optim.Optimizer:
    if config.optimizer == "sgd":
        return optim.SGD(parameters, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                         weight_decay=config.weight_decay)
    kind = optim.Adam if config.optimizer == "adam" else optim.AdamW
    return kind(parameters, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def build_schedule(config, optimizer, total_steps: int) -> lr_scheduler.LRScheduler:
    """Linear warmup from warmup_start_factor x lr over warmup_steps, then the
    schedule over the remaining steps; stepped once per optimizer step."""
    warmup = config.warmup_steps
    if warmup >= total_steps:
        raise ConfigError(f"warmup_steps ({warmup}) must be fewer than the job's {total_steps} optimizer steps")
    ramp = None
    if warmup:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=config.warmup_start_factor, end_factor=1.0,
                                     total_iters=warmup)
    if config.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=config.min_lr)
    elif config.schedule == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=config.lr_step_size, gamma=config.lr_gamma)
    else:
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=1)  # constant
    if ramp is None:
        return main
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def restart_schedule(config, optimizer, total_steps: int, lr: float, step: int) -> lr_scheduler.LRScheduler:
    """A schedule for a resumed job whose length or lr changed: the new schedule,
    advanced to `step` (the optimizer's moments are kept; its lr follows the new curve)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    schedule = build_schedule(config, optimizer, total_steps)
    for _ in range(step):
        schedule.step()
    return schedule
