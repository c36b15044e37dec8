"""Retention: which committed checkpoints to delete, and the one loop that deletes them.

Scope: only this writer's own checkpoints, the ``checkpoint-<N>`` folders directly under its dir; never
other jobs' folders or nested layouts beside them (``<job>/rank-<node>/...``, ``rank-<node>/...``), never
files at the top of the dir. Rules: keep the newest ``keep_last`` complete checkpoints; never the newest
complete one; never a protected one (e.g. the best model, one being read); never anything that is not a
complete btckpt checkpoint (folders written by other tools, incomplete ones); and only after a newer
checkpoint committed (the caller runs this right after a commit).

One exception, :func:`remove_diverged`: after every rank resumed from step S, this writer's own checkpoints
newer than S are a future the job abandoned (not complete and verified on every node, or the job would have
resumed from them); the next save of such a step would find its name taken on some nodes only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..storage.discovery import STEP_DIR, CheckpointInfo, scan
from .commit import delete_checkpoint

__all__ = ["select_for_deletion", "apply_retention", "remove_diverged"]

log = logging.getLogger("btckpt")


def select_for_deletion(infos: Iterable[CheckpointInfo], *, keep_last: int | None,
                        protected: Iterable[Path] = ()) -> list[Path]:
    """The checkpoint folders to delete, oldest first."""
    if keep_last is None:
        return []
    prot = {Path(p).resolve() for p in protected}
    complete = sorted((i for i in infos if i.complete and i.kind == "btckpt"), key=lambda i: i.step, reverse=True)
    doomed = [i.path for i in complete[max(keep_last, 1):] if i.path.resolve() not in prot]
    return list(reversed(doomed))


def _own(base: Path) -> list[CheckpointInfo]:
    return [i for i in scan(base, own=True) if i.path.parent == base and STEP_DIR.match(i.path.name)]


def remove_diverged(root: str | os.PathLike[str], *, resumed: int, protected: Iterable[Path] = ()) -> list[Path]:
    """Delete this writer's complete btckpt checkpoints newer than ``resumed``, the step every rank resumed from
    (call it on the node's leader after the agreed restore); the deleted ones. Protected ones are kept (logged)."""
    prot = {Path(p).resolve() for p in protected}
    removed = []
    for info in _own(Path(root)):
        if not (info.complete and info.kind == "btckpt" and info.step > resumed):
            continue
        if info.path.resolve() in prot:
            log.warning("btckpt: %s is newer than the step resumed from (%d) but protected; kept (a save of "
                        "step %d will find its name taken)", info.path, resumed, info.step)
            continue
        try:
            delete_checkpoint(info.path)
        except OSError as exc:
            log.warning("btckpt: could not remove %s: %s", info.path, exc)
            continue
        log.warning("btckpt: removed %s: newer than the step every rank resumed from (%d), so not a checkpoint of "
                    "the whole job; the run saves that step again", info.path, resumed)
        removed.append(info.path)
    return removed


def apply_retention(root: str | os.PathLike[str], *, keep_last: int | None, protected: Iterable[Path] = (),
                    salvage: Callable[[Path], object] | None = None) -> list[Path]:
    """Delete the old checkpoints of the writer whose dir is ``root`` (see the module doc); the deleted ones.
    ``salvage``: as in :func:`~btckpt.saving.commit.delete_checkpoint` (a local tier's arena files).

    A folder that cannot be removed is logged and kept; the next commit tries again.
    """
    if keep_last is None:
        return []
    removed = []
    for path in select_for_deletion(_own(Path(root)), keep_last=keep_last, protected=protected):
        try:
            delete_checkpoint(path, salvage=salvage)
        except OSError as exc:
            log.warning("btckpt: retention could not remove %s: %s", path, exc)
            continue
        log.info("btckpt: retention removed %s", path)
        removed.append(path)
    return removed
