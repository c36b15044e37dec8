"""One-shot, synchronous save and load of a single checkpoint folder, and ``latest``.

Public through ``btckpt``: :func:`save` and :func:`load` (``btckpt.save``, ``btckpt.load``); import them
from there. The module itself is internal: its path and its other names may change without notice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from .distributed.world import World
from .errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    IncompleteCheckpoint,
    UnsupportedFormat,
)
from .format.manifest import DEFAULT_MAX_SHARD_SIZE, read_manifest
from .restore.load import read_checkpoint
from .restore.policy import ResumePolicy, latest
from .restore.resume import restore_from
from .restore.rng import capture_rng
from .saving.job import SaveJob, checked_extra_files, run_save
from .saving.plan import SavePlans, paused_gc, prepare_flat
from .saving.snapshot import Stager
from .storage.local import is_url, new_tag, space_error

__all__ = ["save", "load", "latest"]

log = logging.getLogger("btckpt")


@paused_gc()
def save(path: str | os.PathLike[str], state: Mapping[str, Any], *, step: int | None = None,
         max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, save_rng: bool = True,
         extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``state`` as a committed checkpoint folder at ``path`` (atomically; it must not exist).

    ``step`` defaults to the number in a ``checkpoint-<N>`` name, else 0. Returns the folder.
    """
    target = Path(path)
    if step is None:
        m = re.match(r"^checkpoint-(\d+)$", target.name)
        step = int(m.group(1)) if m else 0
    if target.exists():
        raise CheckpointError(f"{target} already exists; btckpt never overwrites a checkpoint in place")
    if not isinstance(state, Mapping) or not state:
        raise ConfigError("state must be a non-empty dict of named groups, e.g. {'model': model}")
    flat, layout = prepare_flat(SavePlans(keep=False), list(state.items()),
                                max_shard_size=max_shard_size)
    assert layout is not None
    extra_files = checked_extra_files(layout, extra_files, root=target.parent, margin=0)
    stager = Stager(small_via_arena=True)  # many small tensors: one batched copy, then large writes
    try:
        try:
            staged = stager.stage(flat, layout, async_keys=set(), sync=True)
        except OSError as exc:
            raise space_error(exc, target) from exc
        job = SaveJob(step=step, root=target.parent, tag=new_tag(), world=World(), flat=flat,
                      staged=staged, rng=capture_rng() if save_rng else None, extra_files=dict(extra_files or {}),
                      name=target.name)
        run_save(job)  # committed straight under its own name (no detour through <parent>/checkpoint-<step>)
    finally:
        stager.close()
    return target


def load(path: str | os.PathLike[str], state: MutableMapping[str, Any], *, strict: bool = True,
         load_rng: bool = True) -> int:
    """Load a checkpoint into ``state`` in place and return its step.

    ``path`` is a checkpoint folder (btckpt, or a plain HF model folder for weights only) or a folder
    holding checkpoints in any layout (the newest complete one that reads and verifies is used, falling
    back past damaged ones with a warning naming each; a model file at its top does not hide them): the
    resume policy for a named folder (:meth:`btckpt.restore.policy.ResumePolicy.at`).
    """
    policy = ResumePolicy.at(path)
    # behind a URL even a named checkpoint goes through restore_from, which downloads it before reading
    info = None if is_url(path) else policy.target()
    if info is None:
        found = restore_from(policy, state, rank=0, want_rng=load_rng, strict=strict)
        assert found is not None  # a named folder with nothing sound raises NoCheckpointFound
        return found.step
    if not info.complete:  # one named checkpoint: its own error, no fallback
        if info.status == "corrupt" and info.manifest is None:
            read_manifest(info.path)  # raises the precise error (UnsafeCheckpoint for names leaving the folder)
        cls = {"corrupt": CorruptCheckpoint, "newer": UnsupportedFormat}.get(info.status, IncompleteCheckpoint)
        raise cls(f"{info.path}: {info.reason}" if str(info.path) not in info.reason else info.reason)
    read_checkpoint(info, state, rank=0, want_rng=load_rng, strict=strict)()  # sharded groups via DCP
    return info.step


latest = latest
