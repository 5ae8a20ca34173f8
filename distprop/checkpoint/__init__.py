"""Checkpoints any training script can write and resume from: safetensors and JSON,
no pickle, written atomically, the newest K kept.

    dp.save_checkpoint("runs/a/checkpoints", model=model, optimizer=opt, scheduler=sched,
                       loader=loader, step=step, keep=3)
    checkpoint = dp.load_checkpoint("runs/a/checkpoints", model=model, optimizer=opt,
                                    scheduler=sched, loader=loader)
    start = checkpoint.step

See `save` for the write protocol and `layout` for the directory's shape.
"""

from distprop.checkpoint.errors import CheckpointError
from distprop.checkpoint.layout import complete_checkpoints, newest_checkpoint
from distprop.checkpoint.load import Checkpoint, load_checkpoint, read_checkpoint, resolve_checkpoint
from distprop.checkpoint.save import save_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "complete_checkpoints", "load_checkpoint", "newest_checkpoint",
           "read_checkpoint", "resolve_checkpoint", "save_checkpoint"]
