"""Where checkpoints live in a directory, which ones are complete, which to keep.

A checkpoint directory (the "root", e.g. ``OUT/checkpoints``) holds::

    step-00000100/   model.safetensors  state.safetensors  meta.json
    step-00000200/   ...
    latest           the name of the newest complete checkpoint, one line

A checkpoint is complete when its `meta.json` exists: it is written last, inside a
hidden temporary directory that is renamed to ``step-N`` only afterwards, so a
``step-N`` without it was not made by distprop (a partial copy, say) and is
ignored. Hidden ``.step-N.tmp-*`` directories are writes that never finished.
Steps are compared as numbers, never by modification time.
"""

from __future__ import annotations

import os
import re
import shutil

META = "meta.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d{8,})$")
_LEFTOVER = re.compile(r"^\.step-\d{8,}\.(tmp|old)-[0-9a-f]+$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def is_complete(path) -> bool:
    return os.path.isfile(os.path.join(path, META))


def complete_checkpoints(root) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, by step."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):  # no checkpoints (yet)
        return []
    found = []
    for name in names:
        step = step_of(name)
        if step is not None and is_complete(os.path.join(root, name)):
            found.append((step, os.path.join(root, name)))
    return sorted(found)


def read_latest(root) -> str | None:
    """The checkpoint the `latest` marker names, if the marker exists and that
    checkpoint is complete."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as file:
            name = file.read().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    path = os.path.join(root, name)
    return path if step_of(name) is not None and is_complete(path) else None


def newest_checkpoint(root) -> str | None:
    """The checkpoint to resume from: the one `latest` names, else the complete one
    with the highest step (the marker wins: after resuming from an older checkpoint
    the new run's checkpoints are newer than higher-numbered ones it abandoned)."""
    return read_latest(root) or next((path for _, path in reversed(complete_checkpoints(root))), None)


def find_root(path) -> str:
    """A checkpoint root for `path`: the path itself, or its `checkpoints/` (a run's
    output directory)."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) and not _holds_checkpoints(path) else path


def _holds_checkpoints(path) -> bool:
    return os.path.exists(os.path.join(path, LATEST)) or any(
        step_of(name) is not None for name in os.listdir(path))


def prune(root, keep: int, current: str) -> list[str]:
    """Delete the oldest complete checkpoints up to `current` (which is never
    deleted) so that `keep` remain, and leftovers of writes that never finished.
    Checkpoints numbered after `current` (a run resumed from an older one left
    them) are neither counted nor touched. Returns what was deleted."""
    current_step = step_of(os.path.basename(current))
    candidates = [path for step, path in complete_checkpoints(root) if step <= current_step and path != current]
    doomed = candidates[:max(0, len(candidates) - (keep - 1))]
    doomed += [os.path.join(root, name) for name in os.listdir(root) if _LEFTOVER.match(name)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
