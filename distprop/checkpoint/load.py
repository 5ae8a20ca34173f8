"""`read_checkpoint` / `load_checkpoint`: find a complete checkpoint, read it on rank
0, hand it to every rank, and apply it to a model, optimizer, schedule and loader.

Reading uses only JSON and safetensors (whose format is a JSON header and raw
little-endian bytes): a checkpoint from an untrusted source runs no code. Rank 0
reads and broadcasts (arrays as raw buffers), so the other ranks never depend on
seeing the same file system, or seeing it up to date.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from distprop.checkpoint import layout, rng, tree
from distprop.checkpoint.errors import CheckpointError
from distprop.checkpoint.save import FORMAT, FORMAT_VERSION, MODEL_FILE, STATE_FILE, unwrap
from distprop.parallel import runtime
from distprop.parallel.helpers import broadcast_state


@dataclass
class Checkpoint:
    """A checkpoint read into memory (the same on every rank).

    `model_state` maps the model's state_dict keys to numpy arrays; `meta` is
    `meta.json`. `config` and `extra` are what `save_checkpoint` was given.
    """

    path: str
    meta: dict
    model_state: dict
    arrays: dict = field(repr=False)  # optimizer, scheduler and extra arrays by name

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    @property
    def config(self) -> dict | None:
        return self.meta["config"]

    @property
    def extra(self):
        return tree.join(self.meta["extra"], self.arrays)

    def restore(self, *, model=None, optimizer=None, scheduler=None, loader=None, rng_state: bool = True,
                comm=None) -> bool:
        """Apply the checkpoint: each object given gets its saved state. The random
        generators are restored when `rng_state` is true and the world size is the
        saved one (each rank gets its own); returns whether they were. Raises
        CheckpointError, naming the checkpoint, when something does not fit."""
        if model is not None:
            self._restore_model(unwrap(model))
        for owner, what in ((optimizer, "optimizer"), (scheduler, "scheduler")):
            if owner is not None:
                self._restore_state(owner, what)
        if loader is not None:
            if self.meta["loader"] is None:
                raise CheckpointError(f"{self.path}: holds no loader position")
            loader.load_state_dict(self.meta["loader"])
        if not rng_state:
            return False
        comm = comm if comm is not None else runtime.current()
        if self.world_size != comm.size:
            return False
        rng.restore(self.meta["rng"][comm.rank])
        return True

    def _restore_model(self, module) -> None:
        ours = module.state_dict()
        missing = [k for k in ours if k not in self.model_state]
        unexpected = [k for k in self.model_state if k not in ours]
        if missing or unexpected:
            detail = "; ".join(part for part in (
                f"missing {_some(missing)}" if missing else "",
                f"unexpected {_some(unexpected)}" if unexpected else "") if part)
            raise CheckpointError(f"{self.path}: {MODEL_FILE} does not fit the model "
                                  f"({type(module).__name__}): {detail}")
        for key, array in ours.items():
            saved = self.model_state[key]
            if tuple(saved.shape) != tuple(array.shape):
                raise CheckpointError(f"{self.path}: {MODEL_FILE} has '{key}' of shape {tuple(saved.shape)}, "
                                      f"the model ({type(module).__name__}) has {tuple(array.shape)}")
        module.load_state_dict(self.model_state)

    def _restore_state(self, owner, what: str) -> None:
        saved = self.meta[what]
        if saved is None:
            raise CheckpointError(f"{self.path}: holds no {what} state")
        if saved["class"] != type(owner).__name__:
            raise CheckpointError(f"{self.path}: holds {saved['class']} {what} state, "
                                  f"not {type(owner).__name__}")
        try:
            owner.load_state_dict(tree.join(saved["state_dict"], self.arrays))
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"{self.path}: the {what} state does not fit: {error}") from None


def _some(keys: list[str], shown: int = 3) -> str:
    listed = ", ".join(f"'{k}'" for k in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def resolve_checkpoint(path) -> str:
    """The checkpoint `path` means: a checkpoint directory itself, or the newest
    complete one under a checkpoint root or a run directory (`OUT/checkpoints`)."""
    path = os.fspath(path)
    if layout.is_complete(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or directory")
    root = layout.find_root(path)
    found = layout.newest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (a step-N directory with {layout.META})")
    return found


def read_checkpoint(path, comm=None) -> Checkpoint:
    """Rank 0 finds and reads the checkpoint, every rank gets it (call on all ranks)."""
    comm = comm if comm is not None else runtime.current()
    content = failure = None
    if comm.rank == 0:
        try:
            content = _read(resolve_checkpoint(path))
        except CheckpointError as error:
            failure = str(error)
        except (KeyError, TypeError, AttributeError) as error:  # a meta.json of the wrong shape
            failure = f"{path}: malformed checkpoint metadata ({type(error).__name__}: {error})"
    if comm.size > 1:
        failure = comm.bcast_object(failure, root=0)
        if not failure:
            content = broadcast_state(content, comm)
    if failure:
        raise CheckpointError(failure)
    return Checkpoint(content["path"], content["meta"], content["model"], content["arrays"])


def load_checkpoint(path, *, model=None, optimizer=None, scheduler=None, loader=None, rng_state: bool = True,
                    comm=None) -> Checkpoint:
    """Read a checkpoint (see `read_checkpoint`) and restore what is given into it
    (see `Checkpoint.restore`); returns it, for `step`, `extra` and `config`."""
    checkpoint = read_checkpoint(path, comm)
    checkpoint.restore(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                       rng_state=rng_state, comm=comm)
    return checkpoint


def _read(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    meta_path = os.path.join(path, layout.META)
    try:
        with open(meta_path, encoding="utf-8") as file:
            meta = json.load(file)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{meta_path}: unreadable ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a distprop checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format version {meta.get('format_version')!r}; this "
                              f"distprop reads version {FORMAT_VERSION}")
    loaded = {}
    for name, expected in meta["files"].items():
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != expected["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise CheckpointError(f"{file}: {found}, {layout.META} recorded {expected['bytes']} bytes")
        try:
            loaded[name] = load_file(file)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    model = loaded.get(MODEL_FILE, {})
    model = {key: model[key] for key in meta["model"]["keys"]}  # the state_dict's order, not the file's
    return {"path": path, "meta": meta, "model": model, "arrays": loaded.get(STATE_FILE, {})}
