"""Where a (re)started job resumes from: the Checkpointer's side of the resume policy, and the verified read.

Which checkpoint, in which dir, verified how and what if none is :class:`btckpt.restore.policy.ResumePolicy`'s
(the one policy every entry point asks). Here: :func:`restore_from` reads the policy's first sound candidate
into the state (:func:`btckpt.restore.load.restore_first`), and :class:`Resume` adds what only the Checkpointer
has: with several ranks, every rank calls :meth:`Resume.restore` and all load the same step, the newest one
complete on every node and verified on every rank, agreed through the c10d store (no collectives).

The guarantee (:mod:`btckpt.restore.load`'s doc): a candidate with an older complete one after it (another copy,
an older step) is read in one pass straight into the live tensors; if it fails verification, the tensors it
overwrote are recorded and the candidate that is loaded instead must load every one of them, so the state ends
exactly as restoring that candidate leaves it (model, optimizer, RNG). The last candidate is verified before
anything is applied. With several ranks the same holds across the agreement: a rank that read step N one pass
and then, with the others, agrees on an older step loads that step into every tensor N overwrote; if nothing is
agreed after such a read, :class:`CorruptCheckpoint` (the state is no longer what it was), never a silent start
from scratch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from ..config import CheckpointConfig
from ..distributed.world import World
from ..errors import CheckpointError, ConfigError, CoordinationError, StateMismatch
from ..storage.discovery import CheckpointInfo, verified
from .load import (
    LAST_CANDIDATE,
    Overwrites,
    finish_restore,
    has_fallback,
    read_candidate,
    reads_collectively,
    restore_first,
)
from .policy import ResumePolicy

__all__ = ["Resume", "restore_from"]

log = logging.getLogger("btckpt")
Read = tuple[CheckpointInfo, Callable[[], None]]  # a candidate read and verified, and the function that loads it


def restore_from(policy: ResumePolicy, state: MutableMapping[str, Any], *, rank: int, want_rng: bool,
                 strict: bool, candidates: list[CheckpointInfo] | None = None,
                 overwrites: Overwrites | None = None) -> CheckpointInfo | None:
    """Load ``policy``'s first candidate (or of ``candidates``) that reads and verifies into ``state``;
    the checkpoint, or None / :class:`NoCheckpointFound` as the policy says (:meth:`ResumePolicy.missing`).
    ``overwrites``: what earlier one-pass reads of this restore overwrote (module doc)."""
    cands = policy.candidates() if candidates is None else candidates
    # candidates given (the step the ranks agreed on) are not listed again: every rank must load that step
    info = restore_first(cands, state, rank=rank, want_rng=want_rng, strict=strict,
                         rescan=policy.candidates if candidates is None else None, overwrites=overwrites)
    if info is None:
        policy.missing()
    return info


class Resume:
    """Finds and loads the checkpoint a Checkpointer resumes from (one per Checkpointer, every rank)."""

    def __init__(self, *, config: CheckpointConfig, world: World, root: Path, remote: str | None,
                 session: str, local: Path | None = None) -> None:
        self.config, self.world, self.root, self.remote, self.session = config, world, root, remote, session
        self.policy = ResumePolicy.for_job(dir=root, load_dir=config.load_dir, on_missing=config.on_missing,
                                           remote=remote, local=local, run=config.run_id)

    def candidates(self) -> list[CheckpointInfo]:
        """Complete checkpoints in order of preference: own (local tier and dir) newest first, then ``load_dir``'s."""
        infos = self.policy.candidates()
        for i in infos:
            if i.status == "newer":  # passed over: said, never silent
                log.warning("btckpt: passing over %s: %s", i.where, i.reason)
        return [i for i in infos if i.complete]

    def restore(self, state: MutableMapping[str, Any], *, strict: bool) -> int | None:
        """Load the preferred checkpoint into ``state``; its step, or None (or NoCheckpointFound, see below).

        Raises :class:`NoCheckpointFound` when ``load_dir`` is set, nothing was found anywhere and
        ``on_missing='raise'``: a resume was asked for and the run would silently start from scratch.
        """
        cands, ow = None, Overwrites()
        if self.world.size > 1 and self.world.store is not None:
            cands, read = self._agree_on_step(self.candidates(), state, strict=strict, overwrites=ow)
            if read is not None:  # read and verified while agreeing: load it (its bytes are not hashed twice)
                return finish_restore(*read).step
        info = restore_from(self.policy, state, rank=self.world.rank, want_rng=self.config.save_rng, strict=strict,
                            candidates=cands, overwrites=ow)
        return info.step if info is not None else None

    def _agree_on_step(self, cands: list[CheckpointInfo], state: MutableMapping[str, Any], *, strict: bool,
                       overwrites: Overwrites | None = None) -> tuple[list[CheckpointInfo], Read | None]:
        """The candidate every rank can load: the newest step complete on every node *and* read and verified on
        every rank (checksums, and the state fits), agreed through the store. Each rank tries its copies of the
        step (tier, dir, load dir, published: the policy's order) until one verifies; a step with no sound copy on
        some rank is dropped by all of them together, so ranks never restore different steps (or some start fresh).

        Returns the agreed candidate (or none) and, when this rank's check was the verified read itself
        (:meth:`_check`), that read, to be loaded as it is. Like :func:`btckpt.storage.discovery.select`, raises the
        first :class:`StateMismatch` when no step was agreed and the state did not fit one.

        A copy with a usable candidate after it in this rank's list is read one pass (module doc), the last one
        verify-first (its bytes land at the load, after the agreement); ``overwrites`` records what one-pass
        reads overwrote: a later read must load all of it, and agreeing on nothing after one raises
        :class:`CorruptCheckpoint` (:meth:`~btckpt.restore.load.Overwrites.error`)."""
        ow = overwrites if overwrites is not None else Overwrites()
        remaining, newest, attempt = list(cands), max((c.step for c in cands), default=-1), 0
        mismatch: StateMismatch | None = None
        while True:
            key = f"{self.session}/restore/{attempt}"
            step = self.world.agree_step(key, [c.step for c in remaining], timeout=self.config.barrier_timeout)
            mine = [c for c in remaining if c.step == step]  # this rank's copies of the step, fastest first
            read: Read | None = None  # the previous attempt's read is released before the next one
            ok = False
            later = has_fallback(remaining)
            for n, copy in enumerate(mine):  # a damaged copy is dropped alone: the next copy of the step is tried
                try:
                    read = self._check(copy, state, strict=strict, onepass=later[id(copy)], overwrites=ow)
                    ok, mine = True, mine[n:]
                    break
                except (ConfigError, CoordinationError):
                    raise
                except StateMismatch as exc:
                    mismatch = mismatch or exc
                    log.warning("btckpt: rank %d: %s does not fit the state: %s", self.world.rank, copy.path, exc)
                except CheckpointError as exc:
                    log.warning("btckpt: rank %d: %s is damaged: %s%s", self.world.rank, copy.path, exc,
                                "; trying the next copy of this step" if n + 1 < len(mine) else "")
            agreed = self.world.agree_step(f"{key}/verified", [step] if ok else [],
                                           timeout=self.config.barrier_timeout)
            if step < 0 or agreed == step:
                break
            remaining, attempt = [c for c in remaining if c.step != step], attempt + 1
        if newest > step:
            log.warning("btckpt: rank %d: checkpoint-%d is not complete and verified on every rank; resuming from "
                        "%s", self.world.rank, newest, f"step {step}" if step >= 0 else "scratch")
        if step < 0 and ow.touched:
            raise ow.error()
        if step < 0 and mismatch is not None:
            raise mismatch
        return (mine, read) if step >= 0 else ([], None)

    def _check(self, info: CheckpointInfo, state: MutableMapping[str, Any], *, strict: bool, onepass: bool = False,
               overwrites: Overwrites | None = None) -> Read | None:
        """This rank's check of the step the ranks consider: the verified read of it, kept so that the restore
        hashes each byte once (``onepass``: read into the live state as it goes, see :meth:`_agree_on_step`);
        or, when the read goes through DCP's planner (which every rank enters together, so only after the
        agreement), the checksums alone (None: the read follows the agreement)."""
        if reads_collectively(info, state):
            verified(info)
            return None
        return read_candidate(info, state, rank=self.world.rank, want_rng=self.config.save_rng, strict=strict,
                              mode="onepass" if onepass else LAST_CANDIDATE, overwrites=overwrites)
