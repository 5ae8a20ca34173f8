"""`save_checkpoint`: every rank calls it; rank 0 writes, then tells the others where.

The write (see `layout` for the directory's shape):

1. into a hidden temporary directory beside the final one (same file system, so
   the rename below cannot fail with EXDEV; a new root's parent is fsynced when it
   is made): ``model.safetensors``, then
   ``state.safetensors`` (optimizer, schedule and `extra` arrays), each fsynced;
2. ``meta.json`` last -- everything that is not an array, and the commit marker;
3. the temporary directory fsynced, renamed to ``step-N``, the root fsynced;
4. only then the ``latest`` marker swapped (temporary file, fsync, rename, fsync);
5. old checkpoints beyond `keep` deleted, never the new one.

A process killed at any point leaves the previous checkpoints complete and
`latest` naming one of them. Only rank 0 touches the file system: on a network
file system the other nodes may see a new directory late, so they receive the
path instead of looking for it.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from distprop.backend import to_numpy
from distprop.checkpoint import layout, rng, tree
from distprop.checkpoint.durable import fsync_path, temporary_name, write_text_durably
from distprop.checkpoint.errors import CheckpointError
from distprop.parallel import runtime

FORMAT = "distprop.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"


def save_checkpoint(directory, *, model, optimizer=None, scheduler=None, loader=None, step: int,
                    extra: dict | None = None, config: dict | None = None, keep: int | None = None,
                    comm=None) -> str:
    """Write ``directory/step-<step>/`` and return its path (on every rank).

    Call it on every rank at the same point. It holds: the model's state_dict
    (a `DataParallel`'s inner module, so keys are those of the plain model) in
    ``model.safetensors``; the optimizer's and scheduler's state_dicts (arrays in
    ``state.safetensors``, the rest in JSON); the loader's position; the random
    generators of every rank; `step`, the world size, `config` and `extra` (JSON
    values and arrays); distprop's version. No pickle anywhere.

    keep: keep at most this many complete checkpoints up to this one (at least 2:
        the newest may be half-written when a job dies); None keeps all.
    comm: the job's communicator (default: the current job's).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an integer >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 2):
        raise ValueError(f"save_checkpoint: keep must be an integer >= 2 or None, got {keep!r} "
                         "(the newest checkpoint may be incomplete when a job dies)")
    comm = comm if comm is not None else runtime.current()
    generators = comm.allgather_object(rng.capture()) if comm.size > 1 else [rng.capture()]
    path = failure = cause = None
    if comm.rank == 0:
        try:
            path = _write(os.fspath(directory), step, model, optimizer, scheduler, loader, extra, config,
                          keep, generators, comm.size)
        except Exception as error:  # noqa: BLE001 - reported to every rank, raised on every rank
            failure, cause = f"cannot write checkpoint step {step} in {os.fspath(directory)}: {error}", error
    if comm.size > 1:
        path, failure = comm.bcast_object((path, failure), root=0)
    if failure:
        raise CheckpointError(failure) from (cause if comm.rank == 0 else None)
    return path


def unwrap(model):
    """The replicated model inside a DataParallel (its keys are the plain model's)."""
    from distprop.parallel import DataParallel

    return model.module if isinstance(model, DataParallel) else model


def _write(root, step, model, optimizer, scheduler, loader, extra, config, keep, generators, world_size) -> str:
    from safetensors.numpy import save_file

    module = unwrap(model)
    # asarray, not ascontiguousarray: that one turns a 0-d buffer (num_batches_tracked) into shape (1,)
    model_arrays = {key: np.asarray(to_numpy(value), order="C") for key, value in module.state_dict().items()}
    state = {"optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "extra": extra}
    skeleton, state_arrays = tree.split(state, "")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "distprop_version": _version(),
        "step": step, "world_size": world_size, "saved_at": time.time(),
        "model": {"class": type(module).__name__, "keys": list(model_arrays)},
        "optimizer": _described(optimizer, skeleton["optimizer"]),
        "scheduler": _described(scheduler, skeleton["scheduler"]),
        "extra": skeleton["extra"],
        "loader": loader.state_dict() if loader is not None else None,
        "rng": generators,
        "config": config,
        "files": {},
    }
    _make_durable_directory(root)
    name = layout.checkpoint_name(step)
    staging = temporary_name(root, name)
    os.mkdir(staging)
    try:
        # PyTorch's state_dict layout, hence "pt": what loaders of that format look for.
        for file, arrays in ((MODEL_FILE, model_arrays), (STATE_FILE, state_arrays)):
            if file == MODEL_FILE or arrays:
                target = os.path.join(staging, file)
                save_file(arrays, target, metadata={"format": "pt"} if file == MODEL_FILE else None)
                fsync_path(target)
                meta["files"][file] = {"bytes": os.path.getsize(target)}
        meta_path = os.path.join(staging, layout.META)
        with open(meta_path, "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_path(staging)
        final = _commit(root, staging, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_durably(os.path.join(root, layout.LATEST), name + "\n")
    if keep is not None:
        layout.prune(root, keep, final)
    return final


def _make_durable_directory(root) -> None:
    """`root`, made if missing, with its entry in its parent on disk (a new directory
    is only as durable as the parent's fsync that records it)."""
    if os.path.isdir(root):
        return
    os.makedirs(root, exist_ok=True)
    fsync_path(os.path.dirname(os.path.abspath(root)))


def _described(owner, state_skeleton):
    return None if owner is None else {"class": type(owner).__name__, "state_dict": state_skeleton}


def _commit(root, staging, name) -> str:
    """Rename the finished directory into place. A same-named checkpoint (from a run
    that went further before this one resumed from an earlier step) is moved aside
    first and deleted after: rename cannot replace a non-empty directory."""
    final = os.path.join(root, name)
    displaced = None
    if os.path.lexists(final):
        displaced = temporary_name(root, name, "old")
        os.rename(final, displaced)
    os.rename(staging, final)
    fsync_path(root)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    return final


def _version() -> str:
    from distprop import __version__

    return __version__
