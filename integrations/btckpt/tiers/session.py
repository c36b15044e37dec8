"""One Checkpointer session's local tier and peer replicas: where tier saves go, their promotion into the
durable dir, the tier a restart resumed from, and what the close keeps.

A :class:`TierSession` exists on every rank of every Checkpointer; without a tier (no ``local_every_steps``
and nothing to recover or adopt) every verb is a no-op, so its caller needs no branches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..config import CheckpointConfig
from ..distributed.world import World
from ..errors import CheckpointError
from ..saving.commit import checkpoint_name
from ..saving.engine import ErrorChannel, Target
from ..saving.job import SaveJob
from ..saving.retention import remove_diverged
from ..storage.discovery import inspect, scan, verify
from .local import LocalTier, resumable_tier, stale_tier, sweep_orphans, tier_dir
from .replicas import PeerReplicas, recovery_needed

__all__ = ["TierSession"]

log = logging.getLogger("btckpt")


class TierSession:
    """The tier (:class:`~btckpt.tiers.local.LocalTier`) and the replicas (:class:`~btckpt.tiers.replicas.
    PeerReplicas`) a Checkpointer session owns (DESIGN.md "Lifetimes").

    Call order, every rank, the same order: :meth:`create` in the Checkpointer's constructor; per tier save
    :meth:`target` (then the engine's save) and :meth:`promote` for a durable one; after the restore
    :meth:`resumed` (:meth:`adopt`, then :meth:`remove_diverged`); :meth:`wait` / the error channel any time; at the end
    :meth:`closing` (promotes :meth:`final_step`) then :meth:`close`. Only the node's leader copies,
    promotes and removes; every rank agrees on the steps through the store.
    """

    def __init__(self, config: CheckpointConfig, world: World, durable: Path, *, session: str,
                 tier: LocalTier | None, replicas: PeerReplicas | None) -> None:
        self.config, self.world, self.durable, self.session = config, world, durable, session
        self.tier, self.replicas = tier, replicas

    @classmethod
    def create(cls, config: CheckpointConfig, world: World, durable: Path, *, session: str,
               salvage: Callable[[Path], object] | None) -> TierSession:
        """Claim this session's tier (with ``local_every_steps``; or, tier-less, when a replicated job's node lost
        its copy: it fetches it back into a tier), connect the replicas. ``salvage``: takes a retired tier step's
        staged files back (the Stager's ``reclaim``). A failure leaks nothing."""
        tier = LocalTier.create(config, world, durable, session=session)
        try:
            if tier is None and recovery_needed(config, world, durable, key=f"{session}/replicas/tiers"):
                # the session owns the tiers it resumes from: adopt() promotes, a clean close removes them
                tier = LocalTier.create(config, world, durable, session=session, resumed=True)
            if tier is not None:
                tier.salvage = salvage
            replicas = PeerReplicas.create(config, world, tier, session=session)
        except BaseException:
            if tier is not None:
                tier.close(remove=False)
            raise
        return cls(config, world, durable, session=session, tier=tier, replicas=replicas)

    # -- saving ---------------------------------------------------------------------------------------------
    @property
    def saving(self) -> bool:
        """Whether saves go through the tier (``local_every_steps``; not a tier only adopted or recovered)."""
        return self.tier is not None and self.config.local_every_steps is not None

    def saved(self, step: int) -> bool:
        """Whether this session saved ``step`` into the tier already."""
        return self.tier is not None and self.tier.last_step == step

    def target(self) -> Target:
        """Where a tier save goes: the tier's folder, its memory check, its arena (the node's leader), and after
        the commit on every node, its retention and the copy to the next node's tier."""
        tier = self.tier
        assert tier is not None, "target() without a tier (TierSession.saving is False)"

        def committed(job: SaveJob, path: Path) -> None:
            if self.world.is_local_leader:
                tier.retain(committed=path)  # run_save returned: every node committed it
            if self.replicas is not None:  # node leaders: a copy into the next node's tier, in the background
                self.replicas.schedule(job.step)

        return Target(root=tier.root, committed=committed, check=tier.check,
                      arena=tier.arena(self.world.rank) if self.world.is_local_leader else None)

    def saved_into(self, step: int) -> None:
        """A tier save of ``step`` was handed to the writer."""
        assert self.tier is not None
        self.tier.last_step = step

    def promote(self, step: int, *, after: Future[Any] | None, tag: str, timeout: float,
                on_commit: Callable[[Path], None]) -> None:
        """Queue the promotion of tier step ``step`` into the durable dir once ``after`` (its save) finished;
        ``on_commit(folder)`` runs after the durable commit (:meth:`LocalTier.schedule`)."""
        assert self.tier is not None
        self.tier.schedule(step, after=after, tag=tag, timeout=timeout, on_commit=on_commit)

    def watch(self, errors: ErrorChannel) -> None:
        """Report the promoter's errors through ``errors`` (raised once, at the next save/wait/close)."""
        errors.watch(lambda: self.tier.take_error() if self.tier is not None else None)

    def wait(self, timeout: float | None = None, *, replicas: bool = True) -> bool:
        """Wait for the promotions (and, ``replicas``, the exchanges) so far, up to ``timeout`` s each; False when
        some are still running then."""
        done = self.tier is None or self.tier.wait(timeout)
        if replicas and self.replicas is not None:
            done = self.replicas.wait(timeout) and done
        return done

    # -- resuming ------------------------------------------------------------------------------------------
    def resumable(self) -> Path | None:
        """The tier a restore may resume from: the one this session claimed (a fresh private folder when the
        default path was taken: a replica fetched from a peer lands there), else the one a restart finds."""
        return self.tier.root if self.tier is not None else resumable_tier(self.durable, self.config.local_tier_dir)

    def adopt(self, step: int | None, *, key: str, timeout: float) -> int | None:
        """After every rank resumed ``step``: the step to promote into the durable dir now, or None.

        Without a tier of its own, a session owns the local tier of its dir (DESIGN.md "Lifetimes"; otherwise it
        would stay in RAM for good). When it resumed ``step`` from it on every node, the step is promoted now and
        a clean close removes the tier. A tier holding nothing newer than what was resumed, or one an earlier
        incarnation of the dir left, is removed now by its node's leader. A session that claimed the tiers at
        start for the replica exchange (:meth:`create`) promotes the same way and removes them at its clean
        close. Every rank calls it with the same ``step``."""
        if self.saving:
            return None  # a tier session: its promotions run as scheduled
        recovery = self.tier is not None  # claimed for the replica exchange at start
        local = self.resumable()
        held = step is not None and local is not None and inspect(local / checkpoint_name(step)).complete
        if self.world.agree_step(key, [step] if held and step is not None else [], timeout=timeout) != step or not held:
            if self.world.is_local_leader and not recovery:  # a claimed tier goes at the clean close
                self._discard_stale(local, step)
            return None  # some node resumed it from elsewhere: a tier holding a newer step is left as it is
        if not recovery:
            try:
                self.tier = LocalTier.create(self.config, self.world, self.durable, session=self.session, resumed=True)
            except CheckpointError as exc:  # housekeeping: the resumed state is loaded all the same
                log.warning("btckpt: the local tier %s is left as it is (%s); step %s stays only there", local, exc,
                            step)
                return None
        return step

    def _discard_stale(self, local: Path | None, step: int | None) -> None:
        """Remove this node's tier when it holds nothing newer than the resumed ``step``: only older steps, or that
        step when the dir holds a verified copy of it (a copy goes only when another verified durable copy, or a
        newer complete step, exists)."""
        if self.config.local_tier_dir is None:  # a crashed session's private folder, if the default was taken
            sweep_orphans(tier_dir(self.durable, None))
        if local is not None:
            newest = max((i.step for i in scan(local, own=True) if i.complete), default=None)
            if newest is not None and (step is None or newest > step):
                return
            if newest is not None and newest == step:  # goes only if the dir holds a verified copy of it
                info = inspect(self.durable / checkpoint_name(step))
                if not info.complete or verify(info):
                    return
        elif stale_tier(self.durable, self.config.local_tier_dir) is None:
            return
        try:  # its own lock and nobody's world: claim (which discards an earlier incarnation's), then remove
            tier = LocalTier.create(self.config, World(), self.durable, session=self.session, resumed=True)
            if tier is not None:
                tier.close(remove=True)
        except CheckpointError as exc:
            log.warning("btckpt: the stale local tier of %s is left as it is (%s)", self.durable, exc)
            return
        log.info("btckpt: removed the local tier of %s: it held nothing newer than the resumed step", self.durable)

    def resumed(self, step: int | None, *, key: Callable[[], str], timeout: float,
                promote: Callable[[int], None]) -> None:
        """After every rank resumed ``step``: a session without tier saves :meth:`adopt`-s (``key()``: the store
        key, drawn only then) and ``promote(step)``-s a step it adopted; then :meth:`remove_diverged`."""
        if not self.saving:
            adopted = self.adopt(step, key=key(), timeout=timeout)
            if adopted is not None:
                promote(adopted)
        self.remove_diverged(step)

    def remove_diverged(self, step: int | None) -> None:
        """After every rank resumed ``step`` (None: a fresh start): the tier's checkpoints newer than it go (a
        cache; promoting one would fail, and retention would drop this run's new saves of lower steps before
        them). The node's leader; the dir's are the retention's (:meth:`KeepLast.remove_diverged`)."""
        if self.world.is_local_leader and self.tier is not None and self.tier.root.is_dir():
            remove_diverged(self.tier.root, resumed=-1 if step is None else step)

    # -- the end -------------------------------------------------------------------------------------------
    def final_step(self, *, key: str, timeout: float) -> int | None:
        """At a clean close: the newest step every node's tier holds (saved by this run, or the step it resumed
        from), to promote so that nothing is lost when the tier folders go; None when there is none, when this
        run scheduled it already, or when no node's tier holds it. Every rank calls it (a node may have lost its
        tier: the step is agreed); whether this node's dir holds the step already is the promotion's business
        (it then copies nothing but joins the other nodes)."""
        if self.tier is None:
            return None
        mine = self.tier.steps()
        # a node whose tier lacks the step may hold it in its dir already (a promotion that committed on some nodes
        # only, then the tier wiped): it counts, or the other nodes' tier copies (their only ones) would go at close
        durable = [i.step for i in scan(self.durable, own=True) if i.complete and i.kind == "btckpt"]
        step = self.world.agree_step(key, sorted(set(mine) | set(durable)), timeout=timeout)
        if step < 0 or step == self.tier.scheduled:
            return None
        # promoted only when some node's tier holds it (the list is [0] on nodes that do, so the intersection is
        # [0] only when none does)
        held = self.world.agree_step(f"{key}/held", [] if step in mine else [0], timeout=timeout)
        return step if held != 0 else None

    def closing(self, *, crashed: bool, preempted: bool, key: Callable[[], str], timeout: float,
                promote: Callable[[int], None]) -> bool:
        """At close, the writes drained: ``promote(step)`` the :meth:`final_step` (``key()``: its store key, drawn
        only with a tier), unless the script crashed (the tier stays as it is, for the restart) or was preempted
        (the preemption save was the final promotion: every rank knows it, no agreement a rank past its grace would
        miss). Whether the tier may go at :meth:`close` (``clean``): after SIGTERM only once the promotion of its
        newest step was scheduled."""
        if not crashed and not preempted and self.tier is not None:
            step = self.final_step(key=key(), timeout=timeout)
            if step is not None:
                promote(step)
        return not preempted or self.newest_promoted()

    def newest_promoted(self) -> bool:
        """Whether the promotion of the tier's newest step was scheduled (or the tier holds none)."""
        if self.tier is None:
            return True
        newest = max(self.tier.steps(), default=None)
        return newest is None or newest == self.tier.scheduled

    def close(self, *, clean: bool, crashed: bool, errors: ErrorChannel, left: Callable[[], float | None]) -> bool:
        """The replicas' exchanges finish (they read tier checkpoints), then the promotions; the tier folder goes
        when everything reached the dir (``clean``, no error). ``left()``: the seconds each wait may take (None:
        no bound). False when work was still running when time ran out: it stays for the restart."""
        done = True
        if self.replicas is not None and not self.replicas.close(timeout=left()):
            done = False
        tier = self.tier
        if tier is None:
            return done
        if not tier.wait(left()):
            tier.close(remove=False, timeout=0.0)  # the promoter is still copying: the tier stays as it is
            return False
        err = tier.take_error()
        if err is not None:
            errors.keep(err)
        failed = errors.pending
        kept = ("the script died of an exception" if crashed else
                "a save or promotion failed" if failed else
                "its newest step was not promoted (close() did not finish, or SIGTERM came first)" if not clean
                else None)
        return tier.close(remove=kept is None, timeout=left(), kept=kept) and done
