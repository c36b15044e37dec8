"""Where a save goes: into ``dir``, or through the local tier and then promoted into ``dir`` (policy only: the
engine snapshots and writes, the tier session copies, the publication follows each durable commit)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..distributed.session import OpTags
from ..publish.publication import Publication
from ..saving.engine import SaveEngine, SaveRequest, Target
from ..tiers.session import TierSession
from .schedule import SaveSchedule

__all__ = ["SaveRouting"]


class SaveRouting:
    """The Checkpointer's saves routed to their destination: :meth:`durable` (``save()``), :meth:`local`
    (``save_local()``), :meth:`promote` (a tier step into ``dir``), :meth:`resumed` and :meth:`closing`.

    Call order: every rank calls each method at the same step, in the same order (each draws op tags from
    ``tags``), between two training steps; ``check()`` (the facade's "still open") runs under ``busy`` before
    each snapshot. ``busy`` is the facade's lock (one save, restore, wait or close at a time).

    Guarantees: without a tier a durable save is one engine save into ``dir`` (retention, upload and
    consolidation after its commit: :attr:`Publication.target`). With a tier (``local_every_steps``) it is the
    tier save of the step (unless this session saved that step there already: a step is never snapshotted
    twice) and its promotion, queued behind that save's commit; the request's ``on_commit`` then runs after
    the durable commit, once the publication was told (:meth:`Publication.then`). Each durable save (or a
    restored step) resets the schedule's cadence (:meth:`SaveSchedule.saved`).
    """

    def __init__(self, *, engine: SaveEngine, tiers: TierSession, publication: Publication,
                 schedule: SaveSchedule, tags: OpTags, timeout: Callable[[], float], busy: threading.Lock,
                 check: Callable[[], None]) -> None:
        self.engine, self.tiers, self.publication, self.schedule = engine, tiers, publication, schedule
        self.tags, self.timeout, self.busy, self.check = tags, timeout, busy, check

    def durable(self, request: SaveRequest) -> None:
        """``save()``: into ``dir``, or a tier save of the step (unless done) promoted in the background."""
        if not self.tiers.saving:  # no tier, or only one resumed from
            with self.busy:
                if self._snapshot(request, self.publication.target):
                    self.schedule.saved(request.step)
            return
        self.local(replace(request, on_commit=None))
        self.promote(request.step, on_commit=request.on_commit)

    def local(self, request: SaveRequest) -> bool:
        """``save_local()``: into the tier unless this session saved that step there already; whether it saved."""
        if self.tiers.saved(request.step):
            return False
        with self.busy:
            if self._snapshot(request, self.tiers.target()):
                self.tiers.saved_into(request.step)
        return True

    def promote(self, step: int, *, on_commit: Callable[[Path], None] | None = None) -> None:
        """Queue the promotion of tier step ``step`` (after its save, still writing, committed); after the
        durable commit: retention, upload, consolidation (:meth:`Publication.committed`), then ``on_commit``."""
        tag = self.tags("p")  # every rank draws it: the counter stays in step
        self.tiers.promote(step, after=self.engine.pending, tag=tag, timeout=self.timeout(),
                           on_commit=self.publication.then(on_commit))
        self.schedule.saved(step)

    def resumed(self, step: int | None) -> None:
        """After a restore of ``step`` (None: nothing): a tier it resumed from is adopted (and promoted); the
        node's checkpoints newer than it are an abandoned future (:meth:`TierSession.resumed`); the cadence counts
        from it."""
        self.tiers.resumed(step, key=lambda: f"{self.tags('a')}/adopt", timeout=self.timeout(), promote=self.promote)
        if step is not None:
            self.schedule.saved(step)
        self.publication.resumed(step)

    def closing(self, *, crashed: bool, preempted: bool) -> bool:
        """At close, the writes drained: the final promotion (:meth:`TierSession.closing`); whether the tier may
        go at its close."""
        return self.tiers.closing(crashed=crashed, preempted=preempted, key=lambda: f"{self.tags('f')}/tiers",
                                  timeout=self.timeout(), promote=self.promote)

    def _snapshot(self, request: SaveRequest, target: Target) -> bool:
        self.check()
        tag = self.tags("s")  # first: every rank advances the counter, even one that returns early
        return self.engine.save(request, target, tag=tag, barrier_timeout=self.timeout())
