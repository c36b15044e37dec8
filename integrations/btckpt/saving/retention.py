"""Retention: which committed checkpoints to delete, and the one loop that deletes them.

Scope: only this writer's own checkpoints, the ``checkpoint-<N>`` folders directly under its dir; never
other jobs' folders or nested layouts beside them (``<job>/rank-<node>/...``, ``rank-<node>/...``), never
files at the top of the dir. Rules: keep the newest ``keep_last`` complete checkpoints; never the newest
complete one; never a protected one (e.g. the best model, one being read); never anything that is not a
complete btckpt checkpoint (folders written by other tools, incomplete ones); and only after a newer
checkpoint committed (the caller runs this right after a commit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..storage.discovery import STEP_DIR, CheckpointInfo, scan
from .commit import delete_checkpoint

__all__ = ["select_for_deletion", "apply_retention"]

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


def apply_retention(root: str | os.PathLike[str], *, keep_last: int | None,
                    protected: Iterable[Path] = ()) -> list[Path]:
    """Delete the old checkpoints of the writer whose dir is ``root`` (see the module doc); the deleted ones.

    A folder that cannot be removed is logged and kept; the next commit tries again.
    """
    if keep_last is None:
        return []
    base = Path(root)
    own = [i for i in scan(base, own=True) if i.path.parent == base and STEP_DIR.match(i.path.name)]
    removed = []
    for path in select_for_deletion(own, keep_last=keep_last, protected=protected):
        try:
            delete_checkpoint(path)
        except OSError as exc:
            log.warning("btckpt: retention could not remove %s: %s", path, exc)
            continue
        log.info("btckpt: retention removed %s", path)
        removed.append(path)
    return removed
