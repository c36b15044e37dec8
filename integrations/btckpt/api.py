"""One-shot, synchronous save and load of a single checkpoint folder, and ``latest``."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from .discovery import _is_url, latest, scan
from .distributed import World
from .errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    IncompleteCheckpoint,
    NoCheckpointFound,
)
from .layout import fill_refs, flatten_group, plan_layout
from .loading import read_checkpoint, restore_first
from .manifest import DEFAULT_MAX_SHARD_SIZE, read_manifest
from .rng import capture_rng
from .saving import SaveJob, check_extra_files, run_save
from .snapshot import Stager
from .statedict import group_value
from .storage import new_tag, preflight, space_error

__all__ = ["save", "load", "latest"]

log = logging.getLogger("btckpt")


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
    flat = [flatten_group(name, group_value(obj)) for name, obj in state.items()]
    layout = plan_layout(flat, max_shard_size=max_shard_size)
    fill_refs(flat, layout)
    extra_files = check_extra_files(extra_files, [f.name for f in layout.files] + list(layout.index_files))
    nbytes = layout.total_bytes + sum(len(v) for v in (extra_files or {}).values())
    preflight(target.parent, nbytes, margin=0)
    stager = Stager()
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
    back past damaged ones with a warning naming each; a model file at its top does not hide them).
    """
    if _is_url(path):  # behind a URL, a checkpoint is downloaded (restore_first) before it is read
        infos, named = scan(path), False
    else:
        p = Path(os.fspath(path).removeprefix("file://"))
        if not p.exists():
            raise NoCheckpointFound(f"{p} does not exist")
        infos = scan(p)
        named = len(infos) == 1 and infos[0].path == p
    if named:  # one named checkpoint: its own error, no fallback
        info = infos[0]
        if not info.complete:
            if info.status == "corrupt" and info.manifest is None:
                read_manifest(info.path)  # raises the precise error (UnsafeCheckpoint for names leaving the folder)
            cls = CorruptCheckpoint if info.status == "corrupt" else IncompleteCheckpoint
            raise cls(f"{info.path}: {info.reason}" if str(info.path) not in info.reason else info.reason)
        read_checkpoint(info, state, rank=0, want_rng=load_rng, strict=strict)()  # sharded groups via DCP
        return info.step
    found = restore_first(infos, state, rank=0, want_rng=load_rng, strict=strict)  # the selection rule
    if found is None:
        raise NoCheckpointFound(f"no complete, readable checkpoint at or under {path} (damaged ones are named in "
                                "the warnings above)")
    return found.step


latest = latest
