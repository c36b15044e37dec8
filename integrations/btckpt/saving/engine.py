"""The save engine: snapshot, write, commit, and the one error channel. Mechanism only.

When to save, what to keep and when to stop are the caller's policies (:mod:`btckpt.policies`); where a save
goes is a :class:`Target` the caller hands over per save (the durable dir, or a local tier with its arena).
Every collaborator comes in explicitly: the :class:`~btckpt.saving.snapshot.Stager` (the arena), the
:class:`~btckpt.saving.snapshot.StepGate`, the :class:`~btckpt.distributed.world.World` and the options.

Call order, on the training thread of every rank that saves, in the same order on every rank (the writer's
collectives pair up by the ``tag`` the caller draws per save)::

    engine.save(request, target, tag=..., barrier_timeout=...)   # returns once the snapshot is safe
    engine.drain()                # waits for the write still running; its error is kept, then raised
    engine.errors.raise_once()    # the first background error, once (also from save() and drain())
    engine.close(abandon=False)   # after the last drain: the writer thread and the arena go

Guarantees: one write at a time (a save waits for the previous one to finish writing); a background error
(the writer's, or a service's registered with :meth:`ErrorChannel.watch`) is logged where it happens and
raised exactly once, from the next ``save``/``drain``/``raise_once``; with ``on_error='warn'`` it is logged
instead, and training goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CheckpointConfig, default_budget
from ..distributed.shards import prepare, sharded_groups
from ..distributed.world import World
from ..distributed.zero import ZeroState, prepare_zero
from ..errors import CheckpointError, ConfigError, InsufficientSpace
from ..format.layout import rank_groups
from ..format.manifest import RUN_META
from ..format.state import optimizers_in
from ..stats import CheckpointStats, StatsRecorder
from ..storage.discovery import inspect, same_run, verify
from ..storage.local import space_error
from .commit import checkpoint_name
from .job import SaveJob, checked_extra_files, run_save
from .plan import SavePlans, paused_gc, prepare_flat
from .priority import background_thread, leave, urgent
from .snapshot import Stager, StepGate

__all__ = ["SaveEngine", "SaveRequest", "Target", "ErrorChannel"]

log = logging.getLogger("btckpt")


@dataclass(frozen=True)
class SaveRequest:
    """One ``save()`` as the caller asked for it (the keywords of :meth:`btckpt.Checkpointer.save`)."""

    step: int
    state: Mapping[str, Any]
    extra_files: Mapping[str, bytes] | None = None
    meta: Mapping[str, Any] | None = None
    on_commit: Callable[[Path], None] | None = None
    peer_rng: Mapping[int, Mapping[str, Any]] | None = None
    optimizers: Sequence[torch.optim.Optimizer] = ()


@dataclass(frozen=True)
class Target:
    """Where a save goes. ``committed(job, folder)`` runs on the writer once every node committed (before the
    request's ``on_commit``); ``arena``: stage into files there (they become the checkpoint's own: a local
    tier's leader); ``check(total_bytes)``: refuses a save that does not fit (a tier's memory), whatever
    ``on_error`` says."""

    root: Path
    committed: Callable[[SaveJob, Path], None]
    arena: Path | None = None
    check: Callable[[int], None] | None = None


@dataclass
class ErrorChannel:
    """Background errors, kept and raised once. The writer's error is :meth:`keep`-ed; services with their own
    threads (a tier's promoter, the consolidator) are :meth:`watch`-ed and polled at each :meth:`take`."""

    warn: bool = False  # on_error='warn': raise_once() logs instead of raising
    _kept: BaseException | None = None
    _sources: list[Callable[[], BaseException | None]] = field(default_factory=list)

    def watch(self, take_error: Callable[[], BaseException | None]) -> None:
        """Poll ``take_error()`` (returns a service's pending error once, or None) at every :meth:`take`."""
        self._sources.append(take_error)

    def keep(self, exc: BaseException) -> None:
        """Keep ``exc`` to raise later (the first kept error wins)."""
        self._kept = self._kept or exc

    @property
    def pending(self) -> bool:
        """Whether a kept error waits to be raised (watched services are not polled)."""
        return self._kept is not None

    def take(self) -> BaseException | None:
        """The first pending error (kept, else a watched service's), removed from the channel."""
        if self._kept is None:
            for take_error in self._sources:
                self._kept = take_error()
                if self._kept is not None:
                    break
        err, self._kept = self._kept, None
        return err

    def raise_once(self) -> None:
        """Raise the first pending error (``warn``: log it instead)."""
        err = self.take()
        if err is None:
            return
        if self.warn:
            log.warning("btckpt: a background save failed (continuing, on_error='warn'): %s", err)
            return
        raise err


class SaveEngine:
    """Snapshot on the training thread, write and commit on one writer thread (module doc: call order)."""

    def __init__(self, *, config: CheckpointConfig, world: World, stager: Stager, gate: StepGate,
                 rng: Callable[[], dict[str, Any]] | None) -> None:
        self.config, self.world, self.stager, self.gate, self._rng = config, world, stager, gate, rng
        self.errors = ErrorChannel(warn=config.on_error == "warn")
        self.pending: Future[Path] | None = None  # the write still running (or done, not drained yet)
        self._plans = SavePlans()
        self._stats = StatsRecorder()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btckpt-writer",
                                        initializer=background_thread)

    @classmethod
    def create(cls, config: CheckpointConfig, world: World, *,
               rng: Callable[[], dict[str, Any]] | None) -> SaveEngine:
        """The engine with its own arena (``memory_budget``, else the node's share of the default) and step gate."""
        stager = Stager(budget=config.memory_budget or default_budget(world.local_size),
                        small_bytes=config.copy_inline_bytes)
        return cls(config=config, world=world, stager=stager, gate=StepGate(), rng=rng)

    # -- the snapshot (training thread) --------------------------------------------------------------------
    def save(self, request: SaveRequest, target: Target, *, tag: str, barrier_timeout: float) -> bool:
        """Snapshot ``request.state`` as checkpoint ``request.step`` into ``target`` and hand it to the writer
        (``async_save=False``: write it now). False when nothing was saved: the step is there already, complete
        and verified (logged), or (``on_error='warn'``) the disk is too small."""
        with paused_gc():  # a save makes many short-lived objects
            return self._save(request, target, tag=tag, barrier_timeout=barrier_timeout)

    def _save(self, request: SaveRequest, target: Target, *, tag: str, barrier_timeout: float) -> bool:
        t0 = time.perf_counter()
        step, state = request.step, request.state
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step={step!r}: must be a non-negative integer")
        if not isinstance(state, Mapping) or not state:
            raise ConfigError("state must be a non-empty dict of named groups, e.g. {'model': model}")
        self.raise_pending()
        if self.pending is not None and not self.pending.done():
            log.warning("btckpt: save at step %d waits for the previous save to finish writing; the save "
                        "interval is shorter than the write time", step)
        self.drain()
        root, cfg = target.root, self.config
        damaged = self._existing(root / checkpoint_name(step), step)
        if damaged is None:
            return False
        writes_groups = self.world.is_local_leader
        part = self._sharded_part(state)
        skip = set(part.groups) | set(getattr(part, "sources", ())) if part is not None else set()
        groups = [(name, obj) for name, obj in state.items() if name not in skip] if writes_groups else []
        own_plain, tensor_groups = ({}, []) if writes_groups else rank_groups(state, skip=skip)
        flat, layout = prepare_flat(self._plans, groups, extra=part.flat if part is not None else [],
                                    max_shard_size=cfg.max_shard_size)
        extra_files = request.extra_files
        staged = None
        if layout is not None:
            if target.check is not None:
                target.check(layout.total_bytes)
            try:
                extra_files = checked_extra_files(layout, extra_files, root=root, margin=cfg.space_margin)
            except InsufficientSpace as exc:
                if cfg.on_error != "warn":
                    raise
                log.warning("btckpt: step %d not saved (continuing, on_error='warn'): %s", step, exc)
                return False
            async_keys = self._plans.gated(state, flat, request.optimizers) if cfg.async_save else set()
            if part is not None and cfg.async_save:
                async_keys = async_keys | part.async_keys  # a new set: the plan's is reused
            try:
                # ``into`` only when staging into a target's files: the call is otherwise what it always was
                # (tests and tools wrap Stager.stage with its original signature)
                staged = self.stager.stage(flat, layout, async_keys=async_keys, sync=not cfg.async_save,
                                           **({"into": target.arena} if target.arena is not None else {}))
            except OSError as exc:
                raise space_error(exc, root / checkpoint_name(step)) from exc
            self.gate.watch([*optimizers_in(state), *request.optimizers])
            self.gate.arm(staged)
        meta = dict(request.meta or {})
        if cfg.run_id is not None:
            meta[RUN_META] = cfg.run_id
        peer_rng = {int(r): dict(v) for r, v in (request.peer_rng or {}).items() if int(r) != self.world.rank}
        job = SaveJob(step=step, root=root, tag=tag, world=self.world, flat=flat, staged=staged,
                      rng=self._rng() if self._rng is not None else None, extra_files=dict(extra_files or {}),
                      meta=meta, barrier_timeout=barrier_timeout, sharded=part, rank_state=own_plain,
                      tensor_groups=tensor_groups, io_threads=cfg.io_threads, on_commit=request.on_commit,
                      peer_rng=peer_rng, supersede=bool(damaged))
        reused = self._plans.reused
        if cfg.async_save:
            self.pending = self._pool.submit(self._background, job, target)
            self._stats.saved(time.perf_counter() - t0, plan_reused=reused)
            return True
        try:
            self._finish(job, target)
        except CheckpointError as exc:
            if cfg.on_error != "warn":
                raise
            log.warning("btckpt: saving step %d failed (continuing, on_error='warn'): %s", step, exc)
        finally:
            self._stats.saved(time.perf_counter() - t0, plan_reused=reused)
        return True

    def _existing(self, final: Path, step: int) -> list[str] | None:
        """What is at ``final`` already: [] (nothing), the damage of a btckpt checkpoint of this step whose bytes do
        not verify (it is replaced once the new one committed), or None (complete and verified: not saved again).
        Refuses anything else: btckpt never overwrites a folder in place, nor another run's checkpoint."""
        if not final.exists():
            return []
        info = inspect(final)
        if info.complete and not same_run(info, self.config.run_id):
            raise CheckpointError(f"{final} was committed by another run (its btckpt.run differs from this run's "
                                  "run_id); btckpt never overwrites it, and skipping this save would lose it: give "
                                  "this run a dir of its own, or move the other run's checkpoints away")
        damaged = verify(info) if info.complete and info.kind == "btckpt" else []
        if info.complete and not damaged:
            log.warning("btckpt: %s already exists; not saving step %d again", final, step)
            return None
        if not damaged:
            raise CheckpointError(f"{final} exists but is not a complete btckpt checkpoint ({info.reason}); btckpt "
                                  "never overwrites a folder in place: move or delete it")
        log.warning("btckpt: %s is damaged (%s); saving step %d again over it", final, damaged[0], step)
        return damaged

    def _sharded_part(self, state: Mapping[str, Any]) -> Any:
        """This rank's shards of the FSDP2/DTensor groups of ``state`` (None when nothing is sharded)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None  # a DTensor needs a device mesh, hence an initialized process group
        zero = [name for name, obj in state.items() if isinstance(obj, ZeroState)]
        if zero:  # DeepSpeed ZeRO: each rank's partition, in the same sharded format (btckpt.distributed.zero)
            return prepare_zero(state[zero[0]], self.world, source=zero[0])
        groups = sharded_groups(state)
        return prepare(state, self.world, groups) if groups else None

    # -- the write (writer thread) ---------------------------------------------------------------------------
    def _background(self, job: SaveJob, target: Target) -> Path:
        try:
            return self._finish(job, target)
        except BaseException as exc:
            log.error("btckpt: background save of step %d failed: %s", job.step, exc)
            raise

    def _finish(self, job: SaveJob, target: Target) -> Path:
        path = run_save(job)
        self._stats.committed(job.step, job.written_bytes, time.perf_counter() - job.started)
        target.committed(job, path)
        if job.on_commit is not None:
            job.on_commit(path)
        return path

    # -- waiting, errors, the end -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for the write still running; keep its error, then raise the first pending one (once)."""
        fut, self.pending = self.pending, None
        if fut is None:
            return
        self.gate.wait()
        with urgent():  # training waits for the writer now: it gets the CPU (btckpt.saving.priority)
            exc = fut.exception()
        if exc is not None:
            self.errors.keep(exc)
        self.raise_pending()

    def raise_pending(self) -> None:
        """Raise the first background error (once): a finished write's, else a watched service's."""
        if self.pending is not None and self.pending.done():
            self.drain()
            return
        self.errors.raise_once()

    def settled(self, timeout: float | None) -> bool:
        """Wait at most ``timeout`` s for the write still running (its error stays for :meth:`drain`); False
        when it is still running then."""
        fut = self.pending
        if fut is None:
            return True
        try:
            with urgent():
                fut.exception(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def fence(self) -> None:
        """Block until the current snapshot's copies are done."""
        self.gate.wait()

    def stats(self) -> CheckpointStats:
        """This rank's save figures so far (a frozen snapshot)."""
        st = self.stager
        return self._stats.snapshot(gate_wait_s=self.gate.waited, gate_waits=self.gate.waits,
                                    arena_bytes=st.arena_bytes, arena_pinned=st.arena_pinned,
                                    arena_allocations=st.allocations)

    def close(self, *, abandon: bool) -> None:
        """End the writer thread and free the arena (after :meth:`drain`). ``abandon``: the writer may still be
        reading the arena (a preemption grace ran out): the thread, the arena and the process end together."""
        self.gate.close()
        if abandon:
            self._pool.shutdown(wait=False)
            return
        self.stager.close()
        self._pool.submit(leave).result()  # unmark the writer thread before it ends (btckpt.saving.priority)
        self._pool.shutdown(wait=True)

