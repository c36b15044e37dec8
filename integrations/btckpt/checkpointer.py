"""The Checkpointer: the public facade that wires the save engine, the policies, the tiers and the resume.

Mechanism lives in :mod:`btckpt.saving.engine` (snapshot, write, commit, the one error channel); policy in
:mod:`btckpt.policies` (:class:`SaveSchedule`, :class:`Preemption`, :class:`KeepLast`) and
:mod:`btckpt.restore.policy`; the local tier and peer replicas in :mod:`btckpt.tiers.session`. Each rank creates
one Checkpointer with the same arguments. ``save()`` is called by every rank at the same step; it returns once
the snapshot is safe and the background worker writes and commits. A background error is logged at once and
raised exactly once, from the next ``save()``, ``wait()`` or ``close()``.

Public through ``btckpt``: :class:`Checkpointer` (``btckpt.Checkpointer``); import it from there. The module
itself is internal: its path and its other names may change without notice.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointConfig, default_budget
from .consolidate import Consolidator
from .distributed.session import agree_session, session_identity
from .distributed.world import World
from .distributed.world import world as _world
from .errors import CheckpointError, ConfigError
from .policies import KeepLast, Preemption, SaveSchedule
from .publish.staging import finish_upload, remote_target, staging_root
from .publish.supervisor import UploadSupervisor
from .restore.load import RestoreReport, restore_reports
from .restore.resume import Resume
from .restore.rng import capture_rng
from .saving.commit import DirLock
from .saving.engine import SaveEngine, SaveRequest, Target
from .saving.snapshot import Stager, StepGate
from .stats import CheckpointStats
from .storage.discovery import CheckpointInfo
from .storage.local import is_url, unwritable
from .tiers.session import TierSession

__all__ = ["Checkpointer", "default_budget", "session_identity"]

log = logging.getLogger("btckpt")


def _close_at_exit(ref: Any) -> None:
    """Commit what was saved when the script ends without ``close()``; a save that fails here is fatal.

    Registered with ``threading._register_atexit`` (runs when the main thread ends, before
    ``concurrent.futures`` stops taking work and joins its workers) and ``atexit`` as a backstop.
    """
    ckpt = ref()
    if ckpt is None:
        return
    if not ckpt._closed:
        ckpt._crashed = getattr(sys, "last_value", None) is not None  # the script died of an uncaught exception
        try:
            ckpt.close()
        except BaseException as exc:  # noqa: BLE001 - the process must not exit 0 over a lost checkpoint
            log.error("btckpt: the save still in flight at exit failed, its checkpoint is lost: %s", exc)
            _exit_now(1)
    if ckpt._abandoned:  # after SIGTERM, work still running when the grace ran out: exit now, not after it
        log.warning("btckpt: exiting with work still running (preemption_grace ran out); what is not committed is "
                    "lost, older checkpoints and the local tier are intact")
        _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process at once (no joining the threads still writing): flush the log and the streams first."""
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _register_exit(ref: Any) -> None:
    try:
        threading._register_atexit(_close_at_exit, ref)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # pragma: no cover - private API missing, or already shutting down
        pass
    atexit.register(_close_at_exit, ref)


class Checkpointer:
    """Saves and restores training state; see :class:`~btckpt.config.CheckpointConfig` for the options.

    Retention is on by default: ``keep_last=3`` keeps the 3 newest committed checkpoints and deletes this
    writer's older ``checkpoint-<N>`` folders in ``dir`` (pass ``keep_last=None`` to keep all).

    Usage: ``step = ckpt.restore(state)`` once at start (None: nothing to resume), then
    ``ckpt.save(step, state)`` (or ``ckpt.maybe_save(step, state)`` every step), and ``ckpt.close()``
    at the end (or use it as a context manager). All ranks call every method.

    ``world`` overrides the process's place (default: from torch.distributed); ``World()`` makes a
    Checkpointer that coordinates with nobody, for frameworks where only rank 0 saves (Lightning).

    Ranks find each other's Checkpointer by its identity (:func:`session_identity`): ``name`` when given,
    else the ``dir`` argument as passed (unset: ``$BT_CHECKPOINT_DIR`` on every rank, whatever its value per
    node). Checkpointers on different dirs may therefore be created in any order on each rank. Ones with
    the same identity are told apart by how many came before in this process, so create those one after
    another, in the same order on every rank (a second one open at the same time is refused). Pass the same
    ``name`` on every rank when ranks pass different ``dir`` strings for one Checkpointer (e.g. one folder
    per node on shared storage).
    """

    def __init__(self, *, world: World | None = None, name: str | None = None, **options: Any) -> None:
        self._identity = session_identity(options.get("dir"), name)
        self.config = cfg = CheckpointConfig(**options)
        self.world: World = _world() if world is None else world
        self.remote: str | None = None  # dir=URL: this node's checkpoints are published there
        if is_url(cfg.dir or ""):
            self.remote = remote_target(str(cfg.dir), nodes=self.world.nodes, node_rank=self.world.node_rank)
            self.root = staging_root(self.remote)
        else:
            self.root = cfg.local_dir
        why = unwritable(self.root)  # refused here, not at the first save
        if why:
            raise ConfigError(f"checkpoint dir {str(self.root)!r}: {why}; give it write access (chmod/chown), or "
                              "point dir= / $BT_CHECKPOINT_DIR at a writable folder")
        self._lock: DirLock | None = None
        self._closed = False
        self._crashed = False  # closed at exit after an uncaught exception: the local tier stays for the restart
        self._abandoned = False  # after SIGTERM, close() left work running when the grace ran out (exit now)
        self._busy = threading.Lock()  # one save / restore / wait at a time (threads share one Checkpointer)
        self._ops = itertools.count()  # per-Checkpointer collective counter: same sequence on every rank
        self.last_restore: RestoreReport | None = None  # what the last restore() loaded and skipped, per group
        self._session = agree_session(self.world, self._identity, owner=self, timeout=cfg.barrier_timeout)
        self._preemption = Preemption(self.world, f"{self._session}/preempt", grace=cfg.preemption_grace)
        self._schedule = SaveSchedule(every_steps=cfg.every_steps, every_seconds=cfg.every_seconds,
                                      local_every_steps=cfg.local_every_steps)
        self._consolidator = Consolidator.create(cfg, self.world, self.root)
        self._retention = KeepLast(self.root, keep_last=cfg.keep_last, protected=set(map(Path, cfg.protect)),
                                   busy=self._reading)
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
        stager = Stager(budget=cfg.memory_budget or default_budget(self.world.local_size),
                        small_bytes=cfg.copy_inline_bytes)
        self._engine = SaveEngine(config=cfg, world=self.world, stager=stager, gate=StepGate(),
                                  rng=capture_rng if cfg.save_rng else None)
        if self._consolidator is not None:
            self._engine.errors.watch(self._consolidator.take_error)
        self._tiers.watch(self._engine.errors)
        self._durable = Target(root=self.root, committed=lambda job, path: self._published(path))
        self._uploader: Any = None
        dest = cfg.upload_to or self.remote
        if dest and self.world.is_local_leader:
            self._uploader = UploadSupervisor(self.root, dest, extra_args=["--mirror-retention"] if self.remote else [])
            self._uploader.start()
        if cfg.handle_sigterm:
            self._preemption.install()
        _register_exit(weakref.ref(self))

    def _op_tag(self, op: str) -> str:
        """A tag of its own for one collective call (store keys, temp folder name): the session plus this
        Checkpointer's counter, which every rank advances identically (every rank calls every method)."""
        return f"{self._session}-{op}{next(self._ops)}"

    def _resumer(self, session: str) -> Resume:
        return Resume(config=self.config, world=self.world, root=self.root, remote=self.remote, session=session,
                      local=self._tiers.resumable())

    # the engine's collaborators, for tests and tools that inspect or replace them
    _stager = property(lambda self: self._engine.stager,
                       lambda self, stager: setattr(self._engine, "stager", stager))
    _gate = property(lambda self: self._engine.gate)
    _pending = property(lambda self: self._engine.pending)
    _tier = property(lambda self: self._tiers.tier, lambda self, tier: setattr(self._tiers, "tier", tier))

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
        self._retention.protect(path)

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect` (e.g. when a newer checkpoint became the best); retention may delete it again."""
        self._retention.unprotect(path)

    def save(self, step: int, state: Mapping[str, Any], *, extra_files: Mapping[str, bytes] | None = None,
             meta: Mapping[str, Any] | None = None, on_commit: Callable[[Path], None] | None = None,
             peer_rng: Mapping[int, Mapping[str, Any]] | None = None,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Snapshot ``state`` as checkpoint ``step``; returns once the snapshot is safe (see module doc).

        ``extra_files`` (name -> bytes) are written into the folder too (integrations use it for
        ``config.json`` and the like); ``meta`` is stored in the manifest. ``on_commit(folder)`` runs on
        the writer after the commit (integrations use it to publish names that point at the folder);
        its error counts as the save's error. ``peer_rng`` (rank -> :func:`~btckpt.restore.rng.capture_rng` data)
        adds ``rng_state_<rank>.json`` for ranks that do not call ``save`` (frameworks where only rank 0
        saves, e.g. Lightning), written inside the same commit. ``optimizers``: for states given as plain
        tensors (framework dicts), the optimizers whose ``step()`` alone writes their parameters and
        state; tensors of ``state`` sharing storage with those copy in the background behind their step gate.

        With a local tier (``local_every_steps``) the checkpoint goes through it: a tier save of ``step``
        (unless the tier already holds it), then its promotion into ``dir`` in the background (one device
        copy); ``on_commit`` then gets the folder in ``dir`` once the promotion committed (on the node's
        leader, the rank that promotes).

        Saves from several threads are serialized (each one's snapshot is taken alone). Plain-data groups
        (no tensors) are saved per rank: another rank's ``{"shard": 1}`` goes to its ``state_<rank>.json``
        and comes back to that rank at restore; groups holding tensors are taken from local rank 0.
        """
        self._save_durable(SaveRequest(step, state, extra_files, meta, on_commit, peer_rng, tuple(optimizers)))

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
        return self._save_local(SaveRequest(step, state, extra_files, meta, on_commit, peer_rng, tuple(optimizers)))

    def _save_local(self, request: SaveRequest) -> bool:
        """Save into the local tier unless this Checkpointer saved that step there already; whether it saved."""
        if self._tiers.saved(request.step):
            return False
        with self._busy:
            if self._snapshot(request, self._tiers.target()):
                self._tiers.saved_into(request.step)
        return True

    def _save_durable(self, request: SaveRequest) -> None:
        """The durable checkpoint (:meth:`save`): a save into ``dir``, or with a local tier, a tier save of the
        step (unless done) promoted into ``dir`` in the background, which then runs ``on_commit``."""
        if not self._tiers.saving:  # no tier, or only one resumed from
            with self._busy:
                if self._snapshot(request, self._durable):
                    self._schedule.saved(request.step)
            return
        self._save_local(replace(request, on_commit=None))
        self._promote(request.step, on_commit=request.on_commit)

    def _snapshot(self, request: SaveRequest, target: Target) -> bool:
        self._check_open()
        tag = self._op_tag("s")  # first: every rank advances the counter, even one that returns early
        return self._engine.save(request, target, tag=tag, barrier_timeout=self._barrier_timeout())

    def _promote(self, step: int, *, on_commit: Callable[[Path], None] | None = None) -> None:
        """Queue the promotion of tier step ``step`` (after its save, still writing, committed); after the
        durable commit: retention, upload, consolidation (:meth:`_published`), then ``on_commit(folder)``."""
        tag = self._op_tag("p")  # every rank draws it: the counter stays in step

        def committed(path: Path) -> None:
            self._published(path)
            if on_commit is not None:
                on_commit(path)

        self._tiers.promote(step, after=self._engine.pending, tag=tag, timeout=self._barrier_timeout(),
                            on_commit=committed)
        self._schedule.saved(step)

    def _published(self, path: Path) -> None:
        """After a durable commit (a save, or a promotion from the local tier): retention, upload, consolidation."""
        if self.world.is_local_leader:
            self._retention.committed(path)
            if self._uploader is not None:
                self._uploader.poke()
        if self._consolidator is not None:  # global rank 0 only; runs on its own thread
            self._consolidator.submit(path, protected=self._retention.protected)

    @property
    def consolidating(self) -> frozenset[Path]:
        """Committed checkpoints whose servable copy (``consolidate=...``) is being written or waits to be:
        global rank 0's view (always empty on other ranks and without ``consolidate``). Poll it to know
        when the newest servable folder is ready; errors are raised at the next save/wait/close."""
        return frozenset(self._reading())

    def _reading(self) -> set[Path]:
        return self._consolidator.busy if self._consolidator is not None else set()

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

    def _barrier_timeout(self) -> float:
        return self._preemption.timeout(self.config.barrier_timeout)

    def finish_preemption(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``step`` and wait for its commit within ``preemption_grace`` seconds (integrations call this).

        The grace covers everything: a save still writing from before, this save, and every wait for peers.
        """
        self._preemption.begin()
        if step != self._schedule.last_step:
            if not self._settled():  # an earlier save still writing (e.g. waiting for a dead peer)
                return
            self._save_durable(SaveRequest(step, state))
        if not self._settled():
            return
        if not self._tiers.wait(self._preemption.left(), replicas=False):
            log.error("btckpt: the promotion of step %d did not commit within %.0fs (preemption_grace); exiting "
                      "without it (the local tier keeps it for a restart on this node)", step,
                      self.config.preemption_grace)
            return
        self.wait()
        if self._tiers.tier is not None and not self.world.is_local_leader:  # the node's leader promotes
            log.warning("btckpt: preemption checkpoint for step %d saved into the local tier; local rank 0 promotes "
                        "it into the dir", step)
            return
        log.warning("btckpt: preemption checkpoint for step %d committed", step)

    def _settled(self) -> bool:
        """After SIGTERM: wait for the save still writing until the grace runs out; False (logged) when it is
        still running then."""
        if self._engine.settled(self._preemption.left()):
            return True
        log.error("btckpt: the save still writing did not commit within %.0fs (preemption_grace); exiting without "
                  "it, not waiting for it (older checkpoints are intact)", self.config.preemption_grace)
        return False

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
        if self.remote is not None and self._uploader is not None:
            finish_upload(self._uploader, self.remote, restart=True)

    def close(self) -> None:
        """Wait for pending saves, release the arena, the lock and the hooks. Idempotent."""
        if self._closed:
            return
        clean, pre = False, self._preemption
        try:
            with self._busy:
                if pre.saving and not self._settled():
                    self._abandoned = True  # after SIGTERM: the save still writing outlived the grace
                else:
                    self._engine.drain()
                    # after a crash the tier stays as it is, for the restart; after SIGTERM the preemption save was
                    # the final promotion (every rank knows it: no agreement that a rank past its grace would miss)
                    if not self._crashed and not pre.saving:
                        self._final_promotion()
                    # after SIGTERM the tier goes only once the promotion of its newest step was scheduled
                    clean = not pre.saving or self._tiers.newest_promoted()
        finally:
            self._closed = True
            # after SIGTERM every wait below ends when the grace does (pre.left()); what is cut short stays for the
            # restart (a tier, a replica exchange, a consolidation, the uploader's journal)
            if not self._tiers.close(clean=clean, crashed=self._crashed, errors=self._engine.errors, left=pre.left):
                self._abandoned = True
            if self._consolidator is not None:
                if not self._consolidator.close(timeout=pre.left()):
                    self._abandoned = True
                elif self.world.is_local_leader:  # what it was still reading when a newer one committed
                    self._retention.sweep()
            if self._uploader is not None:
                if self.remote is None:
                    self._uploader.stop(timeout=pre.left())
                else:
                    try:
                        finish_upload(self._uploader, self.remote, restart=False, timeout=pre.left())
                    except CheckpointError as exc:
                        self._engine.errors.keep(exc)
                self._uploader = None
            # abandoned: the writer may still read the arena; it, the thread and the lock end with the process
            self._engine.close(abandon=self._abandoned)
            if not self._abandoned and self._lock is not None:
                self._lock.release()
            pre.close()  # after a preemption save the process is on its way out: SIGTERM stays handled
        self._engine.raise_pending()

    def _final_promotion(self) -> None:
        """At close: promote the newest step every node's tier holds unless this run scheduled it already, so
        nothing is lost when the tier folders go (:meth:`TierSession.final_step`)."""
        if self._tiers.tier is None:
            return
        step = self._tiers.final_step(key=f"{self._op_tag('f')}/tiers", timeout=self._barrier_timeout())
        if step is not None:
            self._promote(step)

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
                step = self._resumer(self._op_tag("r")).restore(state, strict=strict)
            self.last_restore = reports[-1] if reports else None
            if not self._tiers.saving:  # a tier it resumed from is adopted (TierSession.adopt)
                adopted = self._tiers.adopt(step, key=f"{self._op_tag('a')}/adopt", timeout=self._barrier_timeout())
                if adopted is not None:
                    self._promote(adopted)
            if step is not None:
                self._schedule.saved(step)
            # the node's own checkpoints newer than the resumed step are an abandoned future: the tier's always
            # go, the dir's with several nodes (a step complete on some nodes only)
            self._tiers.remove_diverged(step)
            if self.world.is_local_leader and self.world.nodes > 1 and step is not None:
                self._retention.remove_diverged(step)
        return step
