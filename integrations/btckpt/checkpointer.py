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
from .errors import ConfigError
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
        self._crashed = False  # closed at exit after an uncaught exception: the local tier stays for the restart
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
            self._lock = DirLock.taken(self.root)
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
                                  schedule=self._schedule, preemption=self._preemption, tags=self._tags,
                                  timeout=lambda: self._preemption.timeout(cfg.barrier_timeout), busy=self._busy)
        self._publication.start(self._engine.errors)  # the uploader (node's leader); consolidation errors
        self._tiers.watch(self._engine.errors)
        if cfg.handle_sigterm:
            self._preemption.install()
        register_exit(weakref.ref(self))

    def _resumer(self, session: str) -> Resume:
        return Resume(config=self.config, world=self.world, root=self.root, remote=self.remote, session=session,
                      local=self._tiers.resumable())

    # the collaborators, for tests and tools that inspect or replace them
    _stager = property(lambda self: self._engine.stager,
                       lambda self, stager: setattr(self._engine, "stager", stager))
    _gate = property(lambda self: self._engine.gate)
    _pending = property(lambda self: self._engine.pending)
    _tier = property(lambda self: self._tiers.tier, lambda self, tier: setattr(self._tiers, "tier", tier))
    _consolidator = property(lambda self: self._publication.consolidator)
    _closed = property(lambda self: self._route.closed)  # read by the at-exit close (policies.exit)
    _abandoned = property(lambda self: self._route.abandoned)

    # -- saving -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._route.closed

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

        ``extra_files`` (name -> bytes) go into the folder too (``config.json`` and the like); ``meta`` into the
        manifest. ``on_commit(folder)`` runs on the writer after the commit; its error is the save's error.
        ``peer_rng`` (rank -> :func:`~btckpt.restore.rng.capture_rng` data) adds ``rng_state_<rank>.json`` in the
        same commit, for ranks that do not call ``save`` (only rank 0 saves, e.g. Lightning). ``optimizers``: for
        plain-tensor states, the optimizers whose ``step()`` alone writes their parameters and state; tensors
        sharing storage with those copy in the background behind their step gate. With a local tier
        (``local_every_steps``) it is a tier save of ``step`` (unless the tier holds it) promoted into ``dir`` in
        the background; ``on_commit`` then gets the folder in ``dir`` (on the node's leader, which promotes).

        Saves from several threads are serialized. Plain-data groups (no tensors) are saved per rank (another
        rank's ``{"shard": 1}`` goes to its ``state_<rank>.json`` and back to it at restore); groups holding
        tensors are taken from local rank 0.
        """
        self._route.durable(SaveRequest(step, state, extra_files, meta, on_commit, peer_rng, tuple(optimizers)))

    def save_local(self, step: int, state: Mapping[str, Any], *, extra_files: Mapping[str, bytes] | None = None,
                   meta: Mapping[str, Any] | None = None, on_commit: Callable[[Path], None] | None = None,
                   peer_rng: Mapping[int, Mapping[str, Any]] | None = None,
                   optimizers: Sequence[torch.optim.Optimizer] = ()) -> bool:
        """Snapshot ``state`` as checkpoint ``step`` into the local tier only (``local_every_steps``; keywords as
        in :meth:`save`, ``on_commit`` gets the tier folder). Called like :meth:`save` (every rank, same step).

        What a save guarantees, in the tier: returns once the snapshot is safe, commits in the background, and a
        restart on this node resumes from it (:meth:`save`, the durable cadence of :meth:`maybe_save` and
        ``close()`` promote it into ``dir``). A step the tier holds from this Checkpointer is not saved again
        (returns False; True when it saved). Raises ConfigError without a tier.
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
        """Call every step: saves when ``every_steps``/``every_seconds`` says so, or at preemption; True when it saved.

        With a local tier, also saves into it every ``local_every_steps`` steps (:meth:`save_local`). After SIGTERM
        it saves, waits for the commit (up to ``preemption_grace`` seconds) and exits with status 0; a SIGTERM on any
        rank makes every rank stop at the same step (agreed through the store: ranks signalled at different times
        still save one checkpoint together).
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
        save = None if step == self._schedule.last_step else lambda: self._route.durable(SaveRequest(step, state))
        self._route.preempt(step, save)

    def fence(self) -> None:
        """Block until the current snapshot's copies are done: call before writing into saved tensors in
        place outside ``optimizer.step()`` (EMA updates, manual weight edits)."""
        self._engine.fence()

    def wait(self) -> None:
        """Block until every save so far is committed; raise the first background error (once).

        With ``dir=URL`` that includes publishing: the uploader's pass over every commit so far.
        """
        self._route.wait()

    def close(self) -> None:
        """Wait for pending saves, release the arena, the lock and the hooks; raise a background error not raised
        yet (once). Idempotent."""
        if not self._route.closed:
            self._route.shutdown(crashed=self._crashed, lock=self._lock)

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

        Every rank calls it. Groups of the checkpoint that ``state`` does not name are left alone. A damaged
        checkpoint is skipped with a warning (older ones are tried). ``strict=False`` loads what matches and says
        what it skipped: a warning, and :attr:`last_restore` (a :class:`~btckpt.RestoreReport`: per group, the keys
        loaded and skipped); it refuses (``StateMismatch``) a load that matches nothing of a model, or optimizer
        state for parameters it did not load. Saves still writing are committed first. Raises
        ``NoCheckpointFound`` when ``load_dir`` is set but nothing is found (unless ``on_missing='start_fresh'``).
        """
        self._route.check()
        with self._busy:
            self._engine.drain()  # a save still writing is committed (or its error raised) before anything is read
            with restore_reports() as reports:
                step = self._resumer(self._tags("r")).restore(state, strict=strict)
            self.last_restore = reports[-1] if reports else None
            self._route.resumed(step)  # adopts the tier it came from; drops the node's newer, abandoned steps
        return step
