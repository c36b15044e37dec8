"""The Checkpointer: when to save, the async worker, retention, resume discovery, error hand-off.

Policy lives here; mechanism in snapshot (copy), saving (write + commit), loading (read + verify).
Each rank creates one Checkpointer with the same arguments. ``save()`` is called by every rank at the
same step; it returns once the snapshot is safe (small tensors copied, large ones copying behind the
step gate) and the background worker writes and commits. A background error is logged at once and
raised exactly once, from the next ``save()``, ``wait()`` or ``close()``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointConfig, default_budget
from .consolidate import Consolidator
from .distributed.shards import prepare, sharded_groups
from .distributed.world import StopAgreement, World
from .distributed.world import world as _world
from .distributed.zero import ZeroState, prepare_zero
from .errors import CheckpointError, ConfigError, InsufficientSpace
from .format.layout import rank_groups
from .format.manifest import RUN_META
from .format.state import optimizers_in
from .publish.staging import finish_upload, remote_target, staging_root
from .publish.supervisor import UploadSupervisor
from .restore.load import RestoreReport, restore_reports
from .restore.policy import same_run
from .restore.resume import Resume
from .restore.rng import capture_rng
from .saving.commit import DirLock, checkpoint_name
from .saving.job import SaveJob, checked_extra_files, run_save
from .saving.plan import SavePlans, paused_gc, prepare_flat
from .saving.priority import background_thread, leave, urgent
from .saving.retention import apply_retention, remove_diverged
from .saving.snapshot import Stager, StepGate
from .stats import CheckpointStats, StatsRecorder
from .storage.discovery import CheckpointInfo, inspect, scan, verify
from .storage.local import is_url, local_path, new_tag, space_error, unwritable
from .tiers import LocalTier, local_save_due, resumable_tier, stale_tier, sweep_orphans, tier_dir
from .tiers.replicas import PeerReplicas, recovery_needed

__all__ = ["Checkpointer", "default_budget"]

log = logging.getLogger("btckpt")
_SESSIONS: dict[str, itertools.count[int]] = {}  # session identity -> Checkpointers created on it so far
_OPEN: dict[str, weakref.ref[Checkpointer]] = {}  # session identity -> the coordinating Checkpointer using it
_SESSIONS_LOCK = threading.Lock()
_SAVE_DEFAULTS: dict[str, Any] = {"extra_files": None, "meta": None, "on_commit": None, "peer_rng": None,
                                  "optimizers": ()}  # save()'s keywords as _save takes them


def session_identity(dir: str | os.PathLike[str] | None, name: str | None) -> str:
    """What names a Checkpointer among the ranks of a job: ``name`` when given, else ``dir`` as the caller
    passed it (normalised, not resolved), else ``$BT_CHECKPOINT_DIR`` (the variable, whatever its value on
    each node: every node reads its own). Raises ConfigError for an empty or non-string ``name``."""
    if name is not None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string, the same on every rank")
        return f"name:{name}"
    if dir is None:
        return "env:BT_CHECKPOINT_DIR"
    raw = os.fspath(dir)
    return f"dir:{raw.rstrip('/')}" if is_url(raw) else f"dir:{os.path.normpath(local_path(raw))}"


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
        self.config = CheckpointConfig(**options)
        self.world: World = _world() if world is None else world
        self.remote: str | None = None  # dir=URL: this node's checkpoints are published there
        if is_url(self.config.dir or ""):
            self.remote = remote_target(str(self.config.dir), nodes=self.world.nodes, node_rank=self.world.node_rank)
            self.root = staging_root(self.remote)
        else:
            self.root = self.config.local_dir
        why = unwritable(self.root)  # refused here, not at the first save
        if why:
            raise ConfigError(f"checkpoint dir {str(self.root)!r}: {why}; give it write access (chmod/chown), or "
                              "point dir= / $BT_CHECKPOINT_DIR at a writable folder")
        self._lock: DirLock | None = None
        self._pending: Future[Path] | None = None
        self._error: BaseException | None = None
        self._plans = SavePlans()
        self._protected: set[Path] = {Path(p) for p in self.config.protect}
        self._closed = False
        self._crashed = False  # closed at exit after an uncaught exception: the local tier stays for the restart
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        self._preempted = threading.Event()
        self._watched = False  # something polls `preempted` (maybe_save, an integration): SIGTERM can be acted on
        self._grace = False  # in the preemption save: waits are bounded by preemption_grace
        self._deadline: float | None = None  # after SIGTERM: when the grace runs out (every wait ends by then)
        self._abandoned = False  # after SIGTERM, close() left work running when the grace ran out (exit now)
        self._prev_handler: Any = None
        self._busy = threading.Lock()  # one save / restore / wait at a time (threads share one Checkpointer)
        self._ops = itertools.count()  # per-Checkpointer collective counter: same sequence on every rank
        self._stats = StatsRecorder()
        self.last_restore: RestoreReport | None = None  # what the last restore() loaded and skipped, per group
        self._session = self._agree_session()
        self._stop = StopAgreement(self.world, f"{self._session}/preempt")  # the step every rank stops at
        self._consolidator = Consolidator.create(self.config, self.world, self.root)
        if self.world.is_local_leader:
            self._lock = DirLock(self.root)
            if self._lock.removed:
                log.warning("btckpt: removed %d unfinished checkpoint folder(s) from an earlier run: %s",
                            len(self._lock.removed), ", ".join(p.name for p in self._lock.removed))
        self._tier: LocalTier | None = None
        try:
            # None without local_every_steps
            self._tier = LocalTier.create(self.config, self.world, self.root, session=self._session)
            if self._tier is None and recovery_needed(self.config, self.world, self.root,
                                                      key=f"{self._session}/replicas/tiers"):
                # a tier-less restart of a replicated job: the node that lost its copy fetches it back into its
                # tier (the session owns the tiers it resumes from: _adopt promotes, a clean close removes them)
                self._tier = LocalTier.create(self.config, self.world, self.root, session=self._session,
                                              resumed=True)
            # with several nodes: connect to the peer nodes, fetch back this node's part if its memory was lost
            self._replicas = PeerReplicas.create(self.config, self.world, self._tier, session=self._session)
        except BaseException:
            if self._tier is not None:
                self._tier.close(remove=False)
            if self._lock is not None:
                self._lock.release()
            raise
        # threads start only once nothing above can fail (a failed constructor leaks nothing)
        self._stager = Stager(budget=self.config.memory_budget or default_budget(self.world.local_size),
                              small_bytes=self.config.copy_inline_bytes)
        if self._tier is not None:  # retention hands a retired tier step's files back to the arena they came from
            self._tier.salvage = self._stager.reclaim
        self._gate = StepGate()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btckpt-writer",
                                        initializer=background_thread)
        self._uploader: Any = None
        dest = self.config.upload_to or self.remote
        if dest and self.world.is_local_leader:
            self._uploader = UploadSupervisor(self.root, dest, extra_args=["--mirror-retention"] if self.remote else [])
            self._uploader.start()
        if self.config.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        _register_exit(weakref.ref(self))

    # -- setup ------------------------------------------------------------------------------------------
    def _agree_session(self) -> str:
        """The session every rank's Checkpointer of this identity shares (a random tag global rank 0 picks).

        Its store key is the identity (hashed) and how many Checkpointers of that identity this process
        created before; every agreement after it is keyed by the session and this Checkpointer's own
        counter (:meth:`_op_tag`).
        """
        mine = new_tag()
        if self.world.size == 1 or self.world.store is None:
            return mine
        with _SESSIONS_LOCK:
            other = _OPEN.get(self._identity)
            held = other() if other is not None else None
            if held is not None and not held._closed:
                raise ConfigError(f"another Checkpointer for {self._identity.split(':', 1)[1]!r} is still open in "
                                  "this process; close it first, or give each its own name= (the same on every "
                                  "rank)")
            _OPEN[self._identity] = weakref.ref(self)
            seq = next(_SESSIONS.setdefault(self._identity, itertools.count()))
        digest = hashlib.sha256(self._identity.encode()).hexdigest()[:16]
        # torchrun --max-restarts may keep its store across restarts: a restarted worker must never pick up the
        # previous attempt's session (its keys hold that attempt's answers)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"session/{digest}/{attempt}/{seq}"
        if self.world.is_leader:
            self.world.publish(key, mine)
        return str(self.world.collect(key, timeout=self.config.barrier_timeout))

    def _op_tag(self, op: str) -> str:
        """A tag of its own for one collective call (store keys, temp folder name): the session plus this
        Checkpointer's counter, which every rank advances identically (every rank calls every method)."""
        return f"{self._session}-{op}{next(self._ops)}"

    def _resumer(self, session: str) -> Resume:
        # the tier this session claimed (a fresh private folder when the default path was taken: a replica fetched
        # from a peer lands there), else the one a restart finds at its path
        local = self._tier.root if self._tier is not None else resumable_tier(self.root, self.config.local_tier_dir)
        return Resume(config=self.config, world=self.world, root=self.root, remote=self.remote, session=session,
                      local=local)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._grace:
            log.warning("btckpt: SIGTERM again; the preemption checkpoint is being saved (or was), exiting after it")
            return
        if not self._watched:  # nothing checks `preempted` yet: no step boundary will ever save
            log.warning("btckpt: SIGTERM received, but nothing checks for it (maybe_save() was never called), so "
                        "btckpt cannot save a final checkpoint; passing the signal on")
            prev, self._prev_handler = self._prev_handler, None
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
            if callable(prev):
                prev(signum, frame)
            elif prev in (None, signal.SIG_DFL):
                os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("btckpt: SIGTERM received; a final checkpoint will be saved at the next step boundary")
        self._preempted.set()

    # -- saving -----------------------------------------------------------------------------------------
    @property
    def stats(self) -> CheckpointStats:
        """This rank's save figures so far (a frozen snapshot; see :class:`~btckpt.CheckpointStats`)."""
        st = self._stager
        return self._stats.snapshot(gate_wait_s=self._gate.waited, gate_waits=self._gate.waits,
                                    arena_bytes=st.arena_bytes, arena_pinned=st.arena_pinned,
                                    arena_allocations=st.allocations)

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next :meth:`maybe_save` saves and exits).

        Reading it marks the SIGTERM handler as acted upon: before anything reads it (e.g. no
        :meth:`maybe_save` call yet), a SIGTERM is passed on to the previous handler (default: exit).
        """
        self._watched = True
        return self._preempted.is_set()

    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never delete this checkpoint in retention (e.g. the best model so far)."""
        self._protected = self._protected | {Path(path)}  # rebind: the writer thread may be reading the set

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect` (e.g. when a newer checkpoint became the best); retention may delete it again."""
        self._protected = self._protected - {Path(path)}

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
        self._save_durable(step, state, extra_files=extra_files, meta=meta, on_commit=on_commit, peer_rng=peer_rng,
                           optimizers=optimizers)

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
        if self._tier is None or self.config.local_every_steps is None:
            raise ConfigError("save_local() needs a local tier: pass local_every_steps=K (and optionally "
                              "local_tier_dir=) to the Checkpointer, or call save()")
        return self._save_local(step, state, extra_files=extra_files, meta=meta, on_commit=on_commit,
                                peer_rng=peer_rng, optimizers=optimizers)

    def _save_local(self, step: int, state: Mapping[str, Any], **keywords: Any) -> bool:
        """Save ``step`` into the local tier (same save path, the tier's folder; :mod:`btckpt.tiers`) unless this
        Checkpointer saved it there already; whether it saved."""
        assert self._tier is not None
        if self._tier.last_step == step:
            return False
        with self._busy, paused_gc():
            self._save(step, state, root=self._tier.root, **{**_SAVE_DEFAULTS, **keywords})
        return True

    def _save(self, step: int, state: Mapping[str, Any], *, extra_files: Mapping[str, bytes] | None,
              meta: Mapping[str, Any] | None, on_commit: Callable[[Path], None] | None,
              peer_rng: Mapping[int, Mapping[str, Any]] | None, optimizers: Sequence[torch.optim.Optimizer],
              root: Path) -> None:
        t0 = time.perf_counter()
        self._check_open()
        tag = self._op_tag("s")  # first: every rank advances the counter, even one that returns early below
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step={step!r}: must be a non-negative integer")
        if not isinstance(state, Mapping) or not state:
            raise ConfigError("state must be a non-empty dict of named groups, e.g. {'model': model}")
        self._raise_pending()
        if self._pending is not None and not self._pending.done():
            log.warning("btckpt: save at step %d waits for the previous save to finish writing; the save "
                        "interval is shorter than the write time", step)
        self._drain()
        final = root / checkpoint_name(step)
        damaged: list[str] = []  # a btckpt checkpoint of this step there whose bytes do not verify: replaced
        if final.exists():
            info = inspect(final)
            if info.complete and not same_run(info, self.config.run_id):
                raise CheckpointError(f"{final} was committed by another run (its btckpt.run differs from this "
                                      "run's run_id); btckpt never overwrites it, and skipping this save would "
                                      "lose it: give this run a dir of its own, or move the other run's "
                                      "checkpoints away")
            damaged = verify(info) if info.complete and info.kind == "btckpt" else []
            if info.complete and not damaged:
                log.warning("btckpt: %s already exists; not saving step %d again", final, step)
                return
            if damaged:
                log.warning("btckpt: %s is damaged (%s); saving step %d again over it", final, damaged[0], step)
            else:
                raise CheckpointError(f"{final} exists but is not a complete btckpt checkpoint ({info.reason}); "
                                      "btckpt never overwrites a folder in place: move or delete it")
        writes_groups = self.world.is_local_leader
        part = self._sharded_part(state)
        skip = set(part.groups) | set(getattr(part, "sources", ())) if part is not None else set()
        groups = [(name, obj) for name, obj in state.items() if name not in skip] if writes_groups else []
        own_plain, tensor_groups = ({}, []) if writes_groups else rank_groups(state, skip=skip)
        flat, layout = prepare_flat(self._plans, groups, extra=part.flat if part is not None else [],
                                    max_shard_size=self.config.max_shard_size)
        if layout is not None:
            if self._tier is not None and root == self._tier.root:
                self._tier.check(layout.total_bytes)  # a tier too small is refused whatever on_error says
            try:
                extra_files = checked_extra_files(layout, extra_files, root=root, margin=self.config.space_margin)
            except InsufficientSpace as exc:
                if self.config.on_error != "warn":
                    raise
                log.warning("btckpt: step %d not saved (continuing, on_error='warn'): %s", step, exc)
                return
        staged = None
        if layout is not None:
            async_keys = self._plans.gated(state, flat, optimizers) if self.config.async_save else set()
            if part is not None and self.config.async_save:
                async_keys = async_keys | part.async_keys  # a new set: the plan's is reused
            try:
                into = self._arena_for(root)
                # ``into`` only when staging into the tier's files: the call is otherwise what it always was
                # (tests and tools wrap Stager.stage with its original signature)
                staged = self._stager.stage(flat, layout, async_keys=async_keys, sync=not self.config.async_save,
                                            **({"into": into} if into is not None else {}))
            except OSError as exc:
                raise space_error(exc, root / checkpoint_name(step)) from exc
            self._gate.watch([*optimizers_in(state), *optimizers])
            self._gate.arm(staged)
        meta = dict(meta or {})
        if self.config.run_id is not None:
            meta[RUN_META] = self.config.run_id
        job = SaveJob(step=step, root=root, tag=tag, world=self.world, flat=flat, staged=staged,
                      rng=capture_rng() if self.config.save_rng else None, extra_files=dict(extra_files or {}),
                      meta=meta, barrier_timeout=self._barrier_timeout(), sharded=part,
                      rank_state=own_plain, tensor_groups=tensor_groups, io_threads=self.config.io_threads,
                      on_commit=on_commit, peer_rng={int(r): dict(v) for r, v in (peer_rng or {}).items()
                                                     if int(r) != self.world.rank}, supersede=bool(damaged))
        if root == self.root:
            self._last_save_step, self._last_save_time = step, time.monotonic()
        elif self._tier is not None:
            self._tier.last_step = step
        reused = self._plans.reused
        if self.config.async_save:
            self._pending = self._pool.submit(self._background, job)
            self._stats.saved(time.perf_counter() - t0, plan_reused=reused)
        else:
            try:
                self._finish(job)
            except CheckpointError as exc:
                if self.config.on_error != "warn":
                    raise
                log.warning("btckpt: saving step %d failed (continuing, on_error='warn'): %s", step, exc)
            finally:
                self._stats.saved(time.perf_counter() - t0, plan_reused=reused)

    def _arena_for(self, root: Path) -> Path | None:
        """Where a save into ``root`` stages: into files in the local tier (they become the tier checkpoint's:
        one host copy, :mod:`btckpt.saving.arena`) when ``root`` is the tier and this rank is its node's leader,
        whose retention gives the files back for reuse; else (None) the anonymous arena. Other local ranks
        (FSDP shards) would get fresh files at every save: their files are retired by the leader's process."""
        if self._tier is None or root != self._tier.root or not self.world.is_local_leader:
            return None
        return self._tier.arena(self.world.rank)

    def _sharded_part(self, state: Mapping[str, Any]) -> Any:
        """This rank's shards of the FSDP2/DTensor groups of ``state`` (None when nothing is sharded)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None  # a DTensor needs a device mesh, hence an initialized process group
        zero = [name for name, obj in state.items() if isinstance(obj, ZeroState)]
        if zero:  # DeepSpeed ZeRO: each rank's partition, in the same sharded format (btckpt.distributed.zero)
            return prepare_zero(state[zero[0]], self.world, source=zero[0])
        groups = sharded_groups(state)
        return prepare(state, self.world, groups) if groups else None

    def _background(self, job: SaveJob) -> Path:
        try:
            return self._finish(job)
        except BaseException as exc:
            log.error("btckpt: background save of step %d failed: %s", job.step, exc)
            raise

    def _finish(self, job: SaveJob) -> Path:
        path = run_save(job)
        self._stats.committed(job.step, job.written_bytes, time.perf_counter() - job.started)
        if job.root != self.root:
            if self._tier is not None and self.world.is_local_leader:
                self._tier.retain(committed=path)  # run_save returned: every node committed it
            if self._replicas is not None:  # node leaders: a copy into the next node's tier, in the background
                self._replicas.schedule(job.step)
        else:
            self._published(path)
        if job.on_commit is not None:
            job.on_commit(path)
        return path

    def _published(self, path: Path) -> None:
        """After a durable commit (a save, or a promotion from the local tier): retention, upload, consolidation."""
        if self.world.is_local_leader:
            self._apply_retention(keep=path)
            if self._uploader is not None:
                self._uploader.poke()
        if self._consolidator is not None:  # global rank 0 only; runs on its own thread
            self._consolidator.submit(path, protected=self._protected)

    def _apply_retention(self, *, keep: Path) -> None:
        apply_retention(self.root, keep_last=self.config.keep_last,
                        protected=self._protected | {keep} | self._reading())

    @property
    def consolidating(self) -> frozenset[Path]:
        """Committed checkpoints whose servable copy (``consolidate=...``) is being written or waits to be:
        global rank 0's view (always empty on other ranks and without ``consolidate``). Poll it to know
        when the newest servable folder is ready; errors are raised at the next save/wait/close."""
        return frozenset(self._reading())

    def _reading(self) -> set[Path]:
        return self._consolidator.busy if self._consolidator is not None else set()

    def _drain(self) -> None:
        """Wait for the pending save; keep its error for :meth:`_raise_pending`."""
        fut, self._pending = self._pending, None
        if fut is None:
            return
        self._gate.wait()
        with urgent():  # training waits for the writer now: it gets the CPU (btckpt.saving.priority)
            exc = fut.exception()
        if exc is not None:
            self._error = exc
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._pending is not None and self._pending.done():
            self._drain()
            return
        err, self._error = self._error, None
        if err is None and self._consolidator is not None:
            err = self._consolidator.take_error()
        if err is None and self._tier is not None:
            err = self._tier.take_error()
        if err is not None:
            if self.config.on_error == "warn":
                log.warning("btckpt: a background save failed (continuing, on_error='warn'): %s", err)
                return
            raise err

    def maybe_save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Call every step: saves when ``every_steps``/``every_seconds`` says so, or at preemption.

        With a local tier, also saves into it every ``local_every_steps`` steps (:meth:`save_local`); the
        durable saves go through the tier (:meth:`save`). After SIGTERM it saves, waits for the commit (up
        to ``preemption_grace`` seconds) and exits the process with status 0. With several ranks, a SIGTERM
        on any rank makes every rank stop at the same step (agreed through the store, so ranks signalled at
        different times still save one checkpoint together). Returns True when it saved.
        """
        if self._stop_step(step):
            self.finish_preemption(step, state)
            raise SystemExit(0)
        due = False
        if self.config.every_steps is not None and step % self.config.every_steps == 0 and step > 0:
            due = True
        secs = self.config.every_seconds
        if secs is not None and time.monotonic() - self._last_save_time >= secs:
            due = True
        if due and step != self._last_save_step:
            self.save(step, state)
            return True
        k = self.config.local_every_steps
        return local_save_due(k, step, done=()) and self.save_local(step, state)

    def _save_durable(self, step: int, state: Mapping[str, Any], **keywords: Any) -> None:
        """The durable checkpoint of ``step`` (:meth:`save`): a save into ``dir``, or with a local tier, a tier
        save of ``step`` (unless done) promoted into ``dir`` in the background (:meth:`_promote`), which then
        runs ``on_commit`` with the promoted folder."""
        kw = {**_SAVE_DEFAULTS, **keywords}
        if self._tier is None or self.config.local_every_steps is None:  # no tier, or only one resumed from
            with self._busy, paused_gc():
                self._save(step, state, root=self.root, **kw)
            return
        on_commit = kw.pop("on_commit")
        self._save_local(step, state, **kw)
        self._promote(step, on_commit=on_commit)

    def _promote(self, step: int, *, on_commit: Callable[[Path], None] | None = None) -> None:
        """Queue the promotion of tier step ``step`` (after its save, still writing, committed); after the
        durable commit: retention, upload, consolidation (:meth:`_published`), then ``on_commit(folder)``."""
        assert self._tier is not None
        tag = self._op_tag("p")  # every rank draws it: the counter stays in step

        def committed(path: Path) -> None:
            self._published(path)
            if on_commit is not None:
                on_commit(path)

        self._tier.schedule(step, after=self._pending, tag=tag, timeout=self._barrier_timeout(), on_commit=committed)
        self._last_save_step, self._last_save_time = step, time.monotonic()

    def _stop_step(self, step: int) -> bool:
        """Whether this rank stops (and saves) at ``step`` because some rank got SIGTERM (agreed through the
        store: :class:`~btckpt.distributed.world.StopAgreement`)."""
        return self._stop.due(step, local=self.preempted)

    def _barrier_timeout(self) -> float:
        """How long ranks wait for each other: after SIGTERM, the grace left less a reserve for the exit (a tenth
        of the grace, at most 1 s), so a save that cannot finish fails (and says why) before the exit's deadline."""
        t = self.config.barrier_timeout
        left = self._left()
        if left is None:
            return t
        return max(0.1, min(t, left - min(1.0, self.config.preemption_grace / 10)))

    def _left(self) -> float | None:
        """Seconds left of ``preemption_grace`` after SIGTERM (never below 0); None before any SIGTERM save."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def finish_preemption(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``step`` and wait for its commit within ``preemption_grace`` seconds (integrations call this).

        The grace covers everything: a save still writing from before, this save, and every wait for peers.
        """
        self._grace = True
        deadline = self._deadline = time.monotonic() + self.config.preemption_grace
        if step != self._last_save_step:
            if not self._settled(deadline):  # an earlier save still writing (e.g. waiting for a dead peer)
                return
            self._save_durable(step, state)
        if not self._settled(deadline):
            return
        if self._tier is not None and not self._tier.wait(max(0.0, deadline - time.monotonic())):
            log.error("btckpt: the promotion of step %d did not commit within %.0fs (preemption_grace); exiting "
                      "without it (the local tier keeps it for a restart on this node)", step,
                      self.config.preemption_grace)
            return
        self.wait()
        if self._tier is not None and not self.world.is_local_leader:  # the node's leader promotes: it knows
            log.warning("btckpt: preemption checkpoint for step %d saved into the local tier; local rank 0 promotes "
                        "it into the dir", step)
            return
        log.warning("btckpt: preemption checkpoint for step %d committed", step)

    def _done_in_time(self) -> bool:
        """After SIGTERM: wait for the pending save until the grace runs out; False when it is still running."""
        fut = self._pending
        if fut is None:
            return True
        try:
            with urgent():
                fut.exception(timeout=self._left())
        except TimeoutError:
            log.error("btckpt: the save still writing did not commit within preemption_grace; not waiting for it")
            return False
        return True

    def _settled(self, deadline: float) -> bool:
        """Wait for the pending save until ``deadline``; False (logged) when it is still running then."""
        fut = self._pending
        if fut is None:
            return True
        try:
            with urgent():
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.error("btckpt: the preemption save did not commit within %.0fs (preemption_grace); exiting "
                      "without it (older checkpoints are intact)", self.config.preemption_grace)
            return False
        except BaseException:  # noqa: BLE001 - raised from save()/wait() through the usual path
            pass
        return True

    def fence(self) -> None:
        """Block until the current snapshot's copies are done: call before writing into saved tensors in
        place outside ``optimizer.step()`` (EMA updates, manual weight edits)."""
        self._gate.wait()

    def wait(self) -> None:
        """Block until every save so far is committed; raise the first background error (once).

        With ``dir=URL`` that includes publishing: the uploader's pass over every commit so far.
        """
        self._check_open()
        with self._busy:
            self._drain()
            if self._tier is not None:
                self._tier.wait()
            if self._replicas is not None:
                self._replicas.wait()
            self._raise_pending()
        if self.remote is not None and self._uploader is not None:
            finish_upload(self._uploader, self.remote, restart=True)

    def close(self) -> None:
        """Wait for pending saves, release the arena, the lock and the hooks. Idempotent."""
        if self._closed:
            return
        clean = False
        try:
            with self._busy:
                if self._deadline is not None and not self._done_in_time():
                    self._abandoned = True  # after SIGTERM: the save still writing outlived the grace
                else:
                    self._drain()
                    # after a crash the tier stays as it is, for the restart; after SIGTERM the preemption save was
                    # the final promotion (every rank knows it: no agreement that a rank past its grace would miss)
                    if not self._crashed and self._deadline is None:
                        self._final_promotion()
                    clean = True
                    if self._deadline is not None and self._tier is not None:
                        # the tier goes only once the promotion of its newest step was scheduled
                        newest = max(self._tier.steps(), default=None)
                        clean = newest is None or newest == self._tier.scheduled
        finally:
            self._closed = True
            # after SIGTERM every wait below ends when the grace does (self._left()); what is cut short stays for
            # the restart (a tier, a replica exchange, a consolidation, the uploader's journal)
            if self._replicas is not None:  # its exchanges read tier checkpoints: they finish first
                if not self._replicas.close(timeout=self._left()):
                    self._abandoned = True
            if self._tier is not None:
                self._close_tier(clean)
            if self._consolidator is not None:
                if not self._consolidator.close(timeout=self._left()):
                    self._abandoned = True
                elif self.world.is_local_leader:  # what it was still reading when a newer one committed
                    apply_retention(self.root, keep_last=self.config.keep_last, protected=self._protected)
            if self._uploader is not None:
                if self.remote is None:
                    self._uploader.stop(timeout=self._left())
                else:
                    try:
                        finish_upload(self._uploader, self.remote, restart=False, timeout=self._left())
                    except CheckpointError as exc:
                        self._error = self._error or exc
                self._uploader = None
            self._gate.close()
            if self._abandoned:  # the writer may still read the arena: it, the thread and the lock end with the process
                self._pool.shutdown(wait=False)
            else:
                self._stager.close()
                self._pool.submit(leave).result()  # unmark the writer thread before it ends (btckpt.saving.priority)
                self._pool.shutdown(wait=True)
                if self._lock is not None:
                    self._lock.release()
            # after a preemption save the process is on its way out: a second SIGTERM must not kill it mid-exit
            if (self._prev_handler is not None and not self._grace
                    and threading.current_thread() is threading.main_thread()):
                try:
                    signal.signal(signal.SIGTERM, self._prev_handler)
                except (ValueError, TypeError):  # pragma: no cover
                    pass
        self._raise_pending()

    def _final_promotion(self) -> None:
        """At close: promote the newest step every node's tier holds (saved by this run, or the step it resumed
        from) unless this run scheduled it already, so nothing is lost when the tier folders go. Every rank
        calls it and the step is agreed (a node may have lost its tier); whether this node's dir holds that
        step already is promote()'s business (it then copies nothing but joins the other nodes; a folder of
        that name that is not complete fails the close and keeps the tier, the only good copy)."""
        if self._tier is None:
            return
        key = f"{self._op_tag('f')}/tiers"
        mine = self._tier.steps()
        # a node whose tier lacks the step may hold it in its dir already (a promotion that committed on some nodes
        # only, then the tier wiped): it counts, or the other nodes' tier copies (their only ones) would go at close
        durable = [i.step for i in scan(self.root, own=True) if i.complete and i.kind == "btckpt"]
        step = self.world.agree_step(key, sorted(set(mine) | set(durable)), timeout=self._barrier_timeout())
        if step < 0 or step == self._tier.scheduled:
            return
        # promoted only when some node's tier holds it (the list above is [0] on nodes that do, so the
        # intersection is [0] only when none does); promote() joins without copying where the dir has it verified
        if self.world.agree_step(f"{key}/held", [] if step in mine else [0], timeout=self._barrier_timeout()) != 0:
            self._promote(step)

    def _close_tier(self, clean: bool) -> None:
        """Wait for the promotions (after SIGTERM: until the grace runs out), then remove the tier folder when
        everything reached ``dir``."""
        assert self._tier is not None
        if not self._tier.wait(self._left()):
            self._abandoned = True
            self._tier.close(remove=False, timeout=0.0)  # the promoter is still copying: the tier stays as it is
            return
        err = self._tier.take_error()
        if err is not None:
            self._error = self._error or err
        kept = ("the script died of an exception" if self._crashed else
                "a save or promotion failed" if err is not None or self._error is not None else
                "its newest step was not promoted (close() did not finish, or SIGTERM came first)" if not clean
                else None)
        if not self._tier.close(remove=kept is None, timeout=self._left(), kept=kept):
            self._abandoned = True

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
            self._drain()  # a save still writing is committed (or its error raised) before anything is read
            with restore_reports() as reports:
                step = self._resumer(self._op_tag("r")).restore(state, strict=strict)
            self.last_restore = reports[-1] if reports else None
            self._adopt(step)
            if step is not None:
                self._last_save_step = step
            self._remove_diverged(step)
        return step

    def _adopt(self, step: int | None) -> None:
        """Without a tier of its own, a session owns the local tier of its dir (DESIGN.md "Lifetimes"; otherwise
        it would stay in RAM for good). When it resumed ``step`` from it on every node, the step is promoted into
        ``dir`` now and a clean close removes the tier. A tier holding nothing newer than what was resumed (a
        crashed run's tier with no complete step, or only steps older than ``step``: a newer verified step
        exists), or one an earlier incarnation of the dir left (never resumed from), is removed now by its
        node's leader. A session that claimed the tiers at start for the replica exchange (``__init__``) promotes
        the same way and removes them at its clean close. Every rank calls it after the resume, with the same
        ``step``."""
        if self._tier is not None and self.config.local_every_steps is not None:
            return  # a tier session: its promotions run as scheduled
        recovery = self._tier is not None  # claimed for the replica exchange at start (see __init__)
        local = self._tier.root if self._tier is not None else resumable_tier(self.root, self.config.local_tier_dir)
        held = step is not None and local is not None and inspect(local / checkpoint_name(step)).complete
        if self.world.agree_step(f"{self._op_tag('a')}/adopt", [step] if held and step is not None else [],
                                 timeout=self._barrier_timeout()) != step or not held:
            if self.world.is_local_leader and not recovery:  # a claimed tier goes at the clean close
                self._discard_stale_tier(local, step)
            return  # some node resumed it from elsewhere: a tier holding a newer step is left as it is
        if recovery:
            assert step is not None
            self._promote(step)
            return
        try:
            self._tier = LocalTier.create(self.config, self.world, self.root, session=self._session, resumed=True)
        except CheckpointError as exc:  # housekeeping: the resumed state is loaded all the same
            log.warning("btckpt: the local tier %s is left as it is (%s); step %d stays only there", local, exc, step)
            return
        assert step is not None
        self._promote(step)

    def _discard_stale_tier(self, local: Path | None, step: int | None) -> None:
        """Remove this node's tier when it holds nothing newer than the resumed ``step`` (see :meth:`_adopt`): only
        older steps, or that step when the dir holds a verified copy of it (a copy goes only when another verified
        durable copy, or a newer complete step, exists)."""
        if self.config.local_tier_dir is None:  # a crashed session's private folder, if the default was taken
            sweep_orphans(tier_dir(self.root, None))
        if local is not None:
            newest = max((i.step for i in scan(local, own=True) if i.complete), default=None)
            if newest is not None and (step is None or newest > step):
                return
            if newest is not None and newest == step:  # goes only if the dir holds a verified copy of it
                info = inspect(self.root / checkpoint_name(step))
                if not info.complete or verify(info):
                    return
        elif stale_tier(self.root, self.config.local_tier_dir) is None:
            return
        try:  # its own lock and nobody's world: claim (which discards an earlier incarnation's), then remove
            tier = LocalTier.create(self.config, World(), self.root, session=self._session, resumed=True)
            if tier is not None:
                tier.close(remove=True)
        except CheckpointError as exc:
            log.warning("btckpt: the stale local tier of %s is left as it is (%s)", self.root, exc)
            return
        log.info("btckpt: removed the local tier of %s: it held nothing newer than the resumed step", self.root)

    def _remove_diverged(self, step: int | None) -> None:
        """After every rank resumed from ``step``: the node's own checkpoints newer than it are an abandoned
        future; the tier's always go (a cache; promoting one would fail, and retention would drop this run's new
        saves of lower steps before them), the dir's when there are several nodes (a step complete on some nodes
        only: saving it again must not find the name taken on those alone). ``step`` None (a fresh start, every
        copy damaged or incomplete): the tier's only."""
        if not self.world.is_local_leader:
            return
        if self._tier is not None and self._tier.root.is_dir():
            remove_diverged(self._tier.root, resumed=-1 if step is None else step)
        if self.world.nodes > 1 and step is not None:
            remove_diverged(self.root, resumed=step, protected=self._protected)
