"""Where a save goes: into ``dir``, or through the local tier and then promoted into ``dir`` (policy only: the
engine snapshots and writes, the tier session copies, the publication follows each durable commit); and the
order in which a Checkpointer's parts end (:meth:`SaveRouting.shutdown`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..distributed.session import OpTags
from ..errors import CheckpointError
from ..publish.publication import Publication
from ..saving.commit import DirLock
from ..saving.engine import SaveEngine, SaveRequest, Target
from ..tiers.session import TierSession
from .preemption import Preemption
from .schedule import SaveSchedule

__all__ = ["SaveRouting"]

log = logging.getLogger("btckpt")


class SaveRouting:
    """The Checkpointer's saves routed to their destination: :meth:`durable` (``save()``), :meth:`local`
    (``save_local()``), :meth:`promote` (a tier step into ``dir``), :meth:`preempt` (the preemption save),
    :meth:`resumed`, :meth:`wait`; and its end: :meth:`closing` (the final promotion), :meth:`shutdown`.

    Call order: every rank calls each method at the same step, in the same order (each draws op tags from
    ``tags``), between two training steps; :meth:`check` (still open) runs under ``busy`` before each snapshot;
    :meth:`shutdown` once, last. ``busy`` is the facade's lock (one save, restore, wait or close at a time).

    Guarantees: without a tier a durable save is one engine save into ``dir`` (retention, upload and
    consolidation after its commit: :attr:`Publication.target`). With a tier (``local_every_steps``) it is the
    tier save of the step (unless this session saved that step there already: a step is never snapshotted
    twice) and its promotion, queued behind that save's commit; the request's ``on_commit`` then runs after
    the durable commit, once the publication was told (:meth:`Publication.then`). Each durable save (or a
    restored step) resets the schedule's cadence (:meth:`SaveSchedule.saved`).
    """

    def __init__(self, *, engine: SaveEngine, tiers: TierSession, publication: Publication,
                 schedule: SaveSchedule, preemption: Preemption, tags: OpTags, timeout: Callable[[], float],
                 busy: threading.Lock) -> None:
        self.engine, self.tiers, self.publication, self.schedule = engine, tiers, publication, schedule
        self.preemption, self.tags, self.timeout, self.busy = preemption, tags, timeout, busy
        self.closed = False  # shutdown() began: every later save, restore or wait is refused
        self.abandoned = False  # after SIGTERM, shutdown() left work running when the grace ran out (exit now)

    def check(self) -> None:
        """Raise :class:`CheckpointError` once :meth:`shutdown` began."""
        if self.closed:
            raise CheckpointError("this Checkpointer is closed; create a new one")

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

    def preempt(self, step: int, save: Callable[[], None] | None) -> None:
        """After SIGTERM: ``save()`` (None: ``step`` is saved already) and wait for its commit (and promotion),
        all within ``preemption_grace`` (:meth:`Preemption.commit`); logged either way."""
        pre = self.preemption
        pre.begin()
        if not pre.commit(step, engine=self.engine, tiers=self.tiers, save=save):
            return  # the grace ran out (logged): the process exits without it
        self.wait()
        if self.tiers.tier is not None and not self.engine.world.is_local_leader:  # the node's leader promotes
            log.warning("btckpt: preemption checkpoint for step %d saved into the local tier; local rank 0 promotes "
                        "it into the dir", step)
        else:
            log.warning("btckpt: preemption checkpoint for step %d committed", step)

    def wait(self) -> None:
        """Every save so far committed (tier saves and promotions too), then published (``dir=URL``); raise the
        first background error, once."""
        self.check()
        with self.busy:
            self.engine.drain()
            self.tiers.wait()
            self.engine.raise_pending()
        self.publication.wait()

    def shutdown(self, *, crashed: bool, lock: DirLock | None) -> None:
        """``close()``, once: drain the writes, the final promotion (:meth:`closing`), then the tier session, the
        publication, the engine and ``lock``, each bounded by the preemption grace after SIGTERM; what is cut
        short stays for the restart (a tier, a replica exchange, a consolidation, the uploader's journal).

        :attr:`closed` is set as soon as the writes drained (or that failed). When work outlived the grace,
        :attr:`abandoned` is set, the engine is left to the process's end and ``lock`` is kept (the writer may
        still read the arena). A background error is raised once, last."""
        clean, pre = False, self.preemption
        try:
            with self.busy:
                if pre.saving and not pre.settled(self.engine):
                    self.abandoned = True  # after SIGTERM: the save still writing outlived the grace
                else:
                    self.engine.drain()
                    clean = self.closing(crashed=crashed, preempted=pre.saving)
        finally:
            self.closed = True
            errors = self.engine.errors
            if not self.tiers.close(clean=clean, crashed=crashed, errors=errors, left=pre.left):
                self.abandoned = True
            if not self.publication.close(errors=errors, left=pre.left):
                self.abandoned = True
            self.engine.close(abandon=self.abandoned)
            if not self.abandoned and lock is not None:
                lock.release()
            pre.close()  # after a preemption save the process is on its way out: SIGTERM stays handled
        self.engine.raise_pending()

    def closing(self, *, crashed: bool, preempted: bool) -> bool:
        """At close, the writes drained: the final promotion (:meth:`TierSession.closing`); whether the tier may
        go at its close."""
        return self.tiers.closing(crashed=crashed, preempted=preempted, key=lambda: f"{self.tags('f')}/tiers",
                                  timeout=self.timeout(), promote=self.promote)

    def _snapshot(self, request: SaveRequest, target: Target) -> bool:
        self.check()
        tag = self.tags("s")  # first: every rank advances the counter, even one that returns early
        return self.engine.save(request, target, tag=tag, barrier_timeout=self.timeout())
