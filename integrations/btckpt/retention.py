"""Retention policy: which committed checkpoints to delete (the mechanism is ``commit.delete_checkpoint``).

Rules: keep the newest ``keep_last`` complete checkpoints; never the newest complete one; never a
protected one (e.g. the best model); never anything that is not a complete btckpt checkpoint (folders
written by other tools, incomplete ones); and only after a newer checkpoint committed (the caller
runs this right after a commit).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .discovery import CheckpointInfo

__all__ = ["select_for_deletion"]


def select_for_deletion(infos: Iterable[CheckpointInfo], *, keep_last: int | None,
                        protected: Iterable[Path] = ()) -> list[Path]:
    """The checkpoint folders to delete, oldest first."""
    if keep_last is None:
        return []
    prot = {Path(p).resolve() for p in protected}
    complete = sorted((i for i in infos if i.complete and i.kind == "btckpt"), key=lambda i: i.step, reverse=True)
    doomed = [i.path for i in complete[max(keep_last, 1):] if i.path.resolve() not in prot]
    return list(reversed(doomed))
