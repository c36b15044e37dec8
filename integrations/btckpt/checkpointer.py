"""The Checkpointer: the public facade wiring the save engine, the policies, the tiers and the resume.

Mechanism: :mod:`btckpt.saving.engine` (snapshot, write, commit, the one error channel). Policy: :mod:`btckpt.policies`
(schedule, routing, preemption, retention, exit) and :mod:`btckpt.restore.policy`. Tiers and replicas:
:mod:`btckpt.tiers.session`; what follows a durable commit: :mod:`btckpt.publish.publication`.

Public through ``btckpt``: :class:`Checkpointer` (``btckpt.Checkpointer``); import it from there. The module
itself is internal: its path and its other names may change without notice.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointConfig, default_budget
from .consolidate import Consolidator
from .distributed.session import OpTags, agree_session, session_identity
from .distributed.world import World
from .distributed.world import world as _world
from .errors import CheckpointError, ConfigError
from .policies import KeepLast, Preemption, SaveRouting, SaveSchedule
from .policies.exit import close_at_exit as _close_at_exit  # noqa: F401 - tests run the at-exit close themselves
from .policies.exit import register_exit
from .publish.publication import Publication
from .publish.staging import commit_root
from .restore.load import RestoreReport, restore_reports
from .restore.resume import Resume
from .restore.rng import capture_rng
from .saving.commit import DirLock
from .saving.engine import SaveEngine, SaveRequest
from .stats import CheckpointStats
from .storage.discovery import CheckpointInfo
from .tiers.session import TierSession

__all__ = ["Checkpointer", "default_budget", "session_identity"]

log = logging.getLogger("btckpt")


class Checkpointer:
    """Saves and restores training state; see :class:`~btckpt.config.CheckpointConfig` for the options.

    Usage: ``step = ckpt.restore(state)`` once at start (None: nothing to resume), then ``ckpt.save(step, state)``
    (or ``ckpt.maybe_save(step, state)`` every step), and ``ckpt.close()`` at the end (or use it as a context
    manager). Every rank creates one with the same arguments and calls every method (``save`` at the same step).
    ``save`` returns once the snapshot is safe; a background worker writes and commits it, and a background error
    is logged at once and raised exactly once, from the next ``save()``, ``wait()`` or ``close()``. Retention is on
    by default: ``keep_last=3`` keeps the 3 newest committed checkpoints and deletes this writer's older
    ``checkpoint-<N>`` folders in ``dir`` (``keep_last=None`` keeps all). ``world`` overrides the process's place
    (default: from torch.distributed); ``World()`` coordinates with nobody (frameworks where only rank 0 saves).

    Ranks find each other's Checkpointer by ``name``, else the ``dir`` argument as passed (:func:`session_identity`):
    ones on different dirs may be created in any order; ones with the same identity one after another, in the same
    order on every rank (a second one open at once is refused). Pass the same ``name`` on every rank when ranks pass
    different ``dir`` strings for one Checkpointer (e.g. one folder per node on shared storage).
    """

    def __init__(self, *, world: World | None = None, name: str | None = None, **options: Any) -> None:
        self._identity = session_identity(options.get("dir"), name)
        self.config = cfg = CheckpointConfig(**options)
        self.world: World = _world() if world is None else world
        # dir=URL: this node's checkpoints are committed into a staging root, then published at self.remote
        self.remote, self.root = commit_root(cfg, nodes=self.world.nodes, node_rank=self.world.node_rank)
        self._lock: DirLock | None = None
        self._closed = False
        self._crashed = False  # closed at exit after an uncaught exception: the local tier stays for the restart
        self._abandoned = False  # after SIGTERM, close() left work running when the grace ran out (exit now)
        self._busy = threading.Lock()  # one save / restore / wait at a time (threads share one Checkpointer)
        self.last_restore: RestoreReport | None = None  # what the last restore() loaded and skipped, per group
        self._session = agree_session(self.world, self._identity, owner=self, timeout=cfg.barrier_timeout)
        self._tags = OpTags(self._session)  # per-Checkpointer collective counter: same sequence on every rank
        self._preemption = Preemption(self.world, f"{self._session}/preempt", grace=cfg.preemption_grace)
        consolidator = Consolidator.create(cfg, self.world, self.root)
        retention = KeepLast(self.root, keep_last=cfg.keep_last, protected=set(map(Path, cfg.protect)),
                             busy=lambda: self._publication.consolidating)
        self._publication = Publication(self.world, self.root, retention=retention, consolidator=consolidator,
                                        upload_to=cfg.upload_to, remote=self.remote)
        if self.world.is_local_leader:
            self._lock = DirLock(self.root)
            if self._lock.removed:
                log.warning("btckpt: removed %d unfinished checkpoint folder(s) from an earlier run: %s",
                            len(self._lock.removed), ", ".join(p.name for p in self._lock.removed))
        try:  # retention hands a retired tier step's files back to the arena they came from
            self._tiers = TierSession.create(cfg, self.world, self.root, session=self._session,
                                             salvage=lambda path: self._engine.stager.reclaim(path))
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        # threads start only once nothing above can fail (a failed constructor leaks nothing)
        self._engine = SaveEngine.create(cfg, self.world, rng=capture_rng if cfg.save_rng else None)
        self._schedule = SaveSchedule(every_steps=cfg.every_steps, every_seconds=cfg.every_seconds,
                                      local_every_steps=cfg.local_every_steps)
        self._route = SaveRouting(engine=self._engine, tiers=self._tiers, publication=self._publication,
                                  schedule=self._schedule, tags=self._tags, timeout=self._barrier_timeout,
                                  busy=self._busy, check=self._check_open)
        self._publication.start(self._engine.errors)  # the uploader (node's leader); consolidation errors
        self._tiers.watch(self._engine.errors)
        if cfg.handle_sigterm:
            self._preemption.install()
        register_exit(weakref.ref(self))

    def _resumer(self, session: str) -> Resume:
        return Resume(config=self.config, world=self.world, root=self.root, remote=self.remote, session=session,
                      local=self._tiers.resumable())

    def _barrier_timeout(self) -> float:
        return self._preemption.timeout(self.config.barrier_timeout)

    # the collaborators, for tests and tools that inspect or replace them
    _stager = property(lambda self: self._engine.stager,
                       lambda self, stager: setattr(self._engine, "stager", stager))
    _gate = property(lambda self: self._engine.gate)
    _pending = property(lambda self: self._engine.pending)
    _tier = property(lambda self: self._tiers.tier, lambda self, tier: setattr(self._tiers, "tier", tier))
    _consolidator = property(lambda self: self._publication.consolidator)

    # -- saving -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    @property
    def stats(self) -> CheckpointStats:
        """This rank's save figures so far (a frozen snapshot; see :class:`~btckpt.CheckpointStats`)."""
        return self._engine.stats()

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next :meth:`maybe_save` saves and exits).

        Reading it marks the SIGTERM handler as acted upon: before anything reads it (e.g. no
        :meth:`maybe_save` call yet), a SIGTERM is passed on to the previous handler (default: exit).
        """
        return self._preemption.preempted

    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never delete this checkpoint in retention (e.g. the best model so far)."""
        self._publication.retention.protect(path)

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect` (e.g. when a newer checkpoint became the best); retention may delete it again."""
        self._publication.retention.unprotect(path)

    def save(self, step: int, state: Mapping[str, Any], *, extra_files: Mapping[str, bytes] | None = None,
             meta: Mapping[str, Any] | None = None, on_commit: Callable[[Path], None] | None = None,
             peer_rng: Mapping[int, Mapping[str, Any]] | None = None,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Snapshot ``state`` as checkpoint ``step``; returns once the snapshot is safe (see the class doc).

        ``extra_files`` (name -> bytes) are written into the folder too (integrations: ``config.json`` and the
        like); ``meta`` is stored in the manifest. ``on_commit(folder)`` runs on the writer after the commit
        (integrations publish names that point at the folder); its error counts as the save's error. ``peer_rng``
        (rank -> :func:`~btckpt.restore.rng.capture_rng` data) adds ``rng_state_<rank>.json``, inside the same
        commit, for ranks that do not call ``save`` (frameworks where only rank 0 saves, e.g. Lightning).
        ``optimizers``: for states given as plain tensors (framework dicts), the optimizers whose ``step()`` alone
        writes their parameters and state; tensors of ``state`` sharing storage with those copy in the background
        behind their step gate.

        With a local tier (``local_every_steps``) the checkpoint goes through it: a tier save of ``step`` (unless
        the tier already holds it), then its promotion into ``dir`` in the background (one device copy);
        ``on_commit`` then gets the folder in ``dir`` once the promotion committed (on the node's leader, the rank
        that promotes).

        Saves from several threads are serialized (each one's snapshot is taken alone). Plain-data groups (no
        tensors) are saved per rank: another rank's ``{"shard": 1}`` goes to its ``state_<rank>.json`` and comes
        back to that rank at restore; groups holding tensors are taken from local rank 0.
        """
        self._route.durable(SaveRequest(step, state, extra_files, meta, on_commit, peer_rng, tuple(optimizers)))

    def save_local(self, step: int, state: Mapping[str, Any], *, extra_files: Mapping[str, bytes] | None = None,
                   meta: Mapping[str, Any] | None = None, on_commit: Callable[[Path], None] | None = None,
                   peer_rng: Mapping[int, Mapping[str, Any]] | None = None,
                   optimizers: Sequence[torch.optim.Optimizer] = ()) -> bool:
        """Snapshot ``state`` as checkpoint ``step`` into the local tier only (``local_every_steps``; the
        keywords as in :meth:`save`, ``on_commit`` gets the tier folder).

        Called like :meth:`save`: by every rank that calls ``save``, at the same step, between two
        training steps. It guarantees what a save guarantees, in the tier: returns once the snapshot is
        safe, the checkpoint commits in the background, and a restart on this node resumes from it (the
        tier keeps the newest step; :meth:`save`, the durable cadence of :meth:`maybe_save` and
        ``close()`` promote it into ``dir``). A step the tier already holds from this Checkpointer is not
        saved again (returns False; True when it saved). Raises ConfigError without a tier.
        """
        if not self._tiers.saving:
            raise ConfigError("save_local() needs a local tier: pass local_every_steps=K (and optionally "
                              "local_tier_dir=) to the Checkpointer, or call save()")
        return self._route.local(SaveRequest(step, state, extra_files, meta, on_commit, peer_rng, tuple(optimizers)))

    @property
    def consolidating(self) -> frozenset[Path]:
        """Committed checkpoints whose servable copy (``consolidate=...``) is being written or waits to be:
        global rank 0's view (always empty on other ranks and without ``consolidate``). Poll it to know
        when the newest servable folder is ready; errors are raised at the next save/wait/close."""
        return frozenset(self._publication.consolidating)

    def maybe_save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Call every step: saves when ``every_steps``/``every_seconds`` says so, or at preemption.

        With a local tier, also saves into it every ``local_every_steps`` steps (:meth:`save_local`); the
        durable saves go through the tier (:meth:`save`). After SIGTERM it saves, waits for the commit (up
        to ``preemption_grace`` seconds) and exits the process with status 0. With several ranks, a SIGTERM
        on any rank makes every rank stop at the same step (agreed through the store, so ranks signalled at
        different times still save one checkpoint together). Returns True when it saved.
        """
        if self._preemption.due(step):
            self.finish_preemption(step, state)
            raise SystemExit(0)
        if self._schedule.durable_due(step):
            self.save(step, state)
            return True
        return self._schedule.local_due(step) and self.save_local(step, state)

    def finish_preemption(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``step`` and wait for its commit within ``preemption_grace`` seconds (integrations call this).

        The grace covers everything: a save still writing from before, this save, and every wait for peers.
        """
        pre = self._preemption
        pre.begin()
        save = None if step == self._schedule.last_step else lambda: self._route.durable(SaveRequest(step, state))
        if not pre.commit(step, engine=self._engine, tiers=self._tiers, save=save):
            return  # the grace ran out (logged): the process exits without it
        self.wait()
        if self._tiers.tier is not None and not self.world.is_local_leader:  # the node's leader promotes
            log.warning("btckpt: preemption checkpoint for step %d saved into the local tier; local rank 0 promotes "
                        "it into the dir", step)
        else:
            log.warning("btckpt: preemption checkpoint for step %d committed", step)

    def fence(self) -> None:
        """Block until the current snapshot's copies are done: call before writing into saved tensors in
        place outside ``optimizer.step()`` (EMA updates, manual weight edits)."""
        self._engine.fence()

    def wait(self) -> None:
        """Block until every save so far is committed; raise the first background error (once).

        With ``dir=URL`` that includes publishing: the uploader's pass over every commit so far.
        """
        self._check_open()
        with self._busy:
            self._engine.drain()
            self._tiers.wait()
            self._engine.raise_pending()
        self._publication.wait()

    def close(self) -> None:
        """Wait for pending saves, release the arena, the lock and the hooks. Idempotent."""
        if self._closed:
            return
        clean, pre = False, self._preemption
        try:
            with self._busy:
                if pre.saving and not pre.settled(self._engine):
                    self._abandoned = True  # after SIGTERM: the save still writing outlived the grace
                else:
                    self._engine.drain()
                    clean = self._route.closing(crashed=self._crashed, preempted=pre.saving)
        finally:
            self._closed = True
            # after SIGTERM every wait below ends when the grace does (pre.left()); what is cut short stays for the
            # restart (a tier, a replica exchange, a consolidation, the uploader's journal)
            errors = self._engine.errors
            if not self._tiers.close(clean=clean, crashed=self._crashed, errors=errors, left=pre.left):
                self._abandoned = True
            if not self._publication.close(errors=errors, left=pre.left):
                self._abandoned = True
            # abandoned: the writer may still read the arena; it, the thread and the lock end with the process
            self._engine.close(abandon=self._abandoned)
            if not self._abandoned and self._lock is not None:
                self._lock.release()
            pre.close()  # after a preemption save the process is on its way out: SIGTERM stays handled
        self._engine.raise_pending()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed; create a new one")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restoring (policy in btckpt.restore.resume) -----------------------------------------------------------
    def candidates(self) -> list[CheckpointInfo]:
        """Complete checkpoints to resume from, in order of preference: own (local tier and dir) newest first, then
        load_dir."""
        return self._resumer(self._session).candidates()  # fresh: the local tier may have appeared since

    def latest(self) -> Path | None:
        """The checkpoint :meth:`restore` would load on this rank (the resume policy's newest complete and
        verified one), or None. With several ranks, :meth:`restore` also agrees on a step every rank has."""
        found = self._resumer(self._session).policy.select()  # fresh: the local tier may have appeared since
        return found[0].path if found else None

    def restore(self, state: MutableMapping[str, Any], *, strict: bool = True) -> int | None:
        """Load the newest complete checkpoint into ``state`` in place; return its step, or None.

        Every rank calls it. Groups of the checkpoint that ``state`` does not name are left alone. A
        damaged checkpoint is skipped with a warning (older ones are tried). ``strict=False`` loads what
        matches and says what it skipped: a warning per restore, and :attr:`last_restore` (a
        :class:`~btckpt.RestoreReport`: per group, the keys loaded and skipped); it refuses
        (``StateMismatch``) a load that matches nothing of a model, or that would load optimizer state for
        parameters it did not load. Saves still writing are committed first. Raises ``NoCheckpointFound``
        when ``load_dir`` is set but nothing is found anywhere (unless ``on_missing='start_fresh'``).
        """
        self._check_open()
        with self._busy:
            self._engine.drain()  # a save still writing is committed (or its error raised) before anything is read
            with restore_reports() as reports:
                step = self._resumer(self._tags("r")).restore(state, strict=strict)
            self.last_restore = reports[-1] if reports else None
            self._route.resumed(step)  # adopts the tier it came from; drops the node's newer, abandoned steps
        return step
