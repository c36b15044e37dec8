"""Where a (re)started job resumes from: the Checkpointer's side of the one selection rule.

The rule itself (order of preference, skipping damaged candidates, ``NoCheckpointFound``) is written once
in :mod:`btckpt.discovery` (:func:`resume_candidates`, :func:`select`, :func:`nothing_to_resume`); the reading
is :mod:`btckpt.loading`'s. Order: the job's own checkpoints (``checkpoint-<N>`` directly under its local
``dir``; with ``dir=URL`` also the published ones not present locally), newest first; then ``load_dir``
(a previous job's, the platform's nested layout). With several ranks, every rank calls
:meth:`Resume.restore` and all load the same step: the newest one complete on every node, agreed through
the c10d store (no collectives).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from .config import CheckpointConfig
from .discovery import CheckpointInfo, nothing_to_resume, resume_candidates, scan, verified
from .distributed import World
from .errors import CheckpointError
from .loading import restore_first

__all__ = ["Resume"]

log = logging.getLogger("btckpt")


class Resume:
    """Finds and loads the checkpoint a Checkpointer resumes from (one per Checkpointer, every rank)."""

    def __init__(self, *, config: CheckpointConfig, world: World, root: Path, remote: str | None,
                 session: str) -> None:
        self.config, self.world, self.root, self.remote, self.session = config, world, root, remote, session

    def own(self) -> list[CheckpointInfo]:
        """This job's checkpoints, newest first, damaged ones included (restore names each one it skips)."""
        local = resume_candidates(self.root, None)
        if self.remote is None:
            return local
        steps = {i.step for i in local if i.complete}
        remote = [i for i in scan(self.remote, own=True) if i.step not in steps]
        return sorted(local + remote, key=lambda i: i.step, reverse=True)

    def others(self) -> list[CheckpointInfo]:
        """The previous job's checkpoints under ``load_dir`` (empty when unset)."""
        return resume_candidates(None, self.config.load_dir)

    def candidates(self) -> list[CheckpointInfo]:
        """Complete checkpoints in order of preference: own newest first, then ``load_dir``'s."""
        return [i for i in self.own() + self.others() if i.complete]

    def restore(self, state: MutableMapping[str, Any], *, strict: bool) -> int | None:
        """Load the preferred checkpoint into ``state``; its step, or None (or NoCheckpointFound, see below).

        Raises :class:`NoCheckpointFound` when ``load_dir`` is set, nothing was found anywhere and
        ``on_missing='raise'``: a resume was asked for and the run would silently start from scratch.
        """
        if self.world.size > 1 and self.world.store is not None:
            cands = self._agree_on_step(self.candidates())
        else:
            cands = self.own() + self.others()
        info = restore_first(cands, state, rank=self.world.rank, want_rng=self.config.save_rng, strict=strict)
        if info is not None:
            return info.step
        nothing_to_resume(self.root, self.config.load_dir, self.config.on_missing)
        return None

    def _agree_on_step(self, cands: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """The candidate every rank can load: the newest step complete on every node *and* verified on every
        rank (checksums), agreed through the store. A step that fails verification on any rank is dropped by
        all of them together, so ranks never restore different steps (or some start fresh)."""
        remaining, newest, attempt = list(cands), max((c.step for c in cands), default=-1), 0
        while True:
            key = f"{self.session}/restore/{attempt}"
            step = self.world.agree_step(key, [c.step for c in remaining], timeout=self.config.barrier_timeout)
            mine = [c for c in remaining if c.step == step]
            ok = False
            if mine:
                try:
                    verified(mine[0])
                    ok = True
                except CheckpointError as exc:
                    log.warning("btckpt: rank %d: %s is damaged: %s", self.world.rank, mine[0].path, exc)
            agreed = self.world.agree_step(f"{key}/verified", [step] if ok else [],
                                           timeout=self.config.barrier_timeout)
            if step < 0 or agreed == step:
                break
            remaining, attempt = [c for c in remaining if c.step != step], attempt + 1
        if newest > step:
            log.warning("btckpt: rank %d: checkpoint-%d is not complete and verified on every rank; resuming from "
                        "%s", self.world.rank, newest, f"step {step}" if step >= 0 else "scratch")
        return mine if step >= 0 else []
