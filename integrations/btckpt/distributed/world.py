"""Who this process is (rank, world, node) and how ranks agree, without blocking training's collectives.

All coordination goes through the c10d *store* (thread-safe key/value, no collectives), so the background
writer can wait for peers without deadlocking with training's all-reduces. Every wait has a timeout and
turns into :class:`CoordinationError` naming the missing ranks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CoordinationError
from ..storage.nodes import node_rank

__all__ = ["World", "world", "StopAgreement"]

log = logging.getLogger("btckpt")

_STORE_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ConnectionError, OSError)


def _lost(rank: int, what: str, exc: BaseException) -> CoordinationError:
    return CoordinationError(f"rank {rank}: lost the coordination store during {what!r} ({exc}); the rank hosting "
                             "it (global rank 0) died or the network failed. Nothing was committed")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip().isdigit() else default


@dataclass(frozen=True, init=False)
class World:
    """This process's place: global ``rank``/``size``, ``local_rank``/``local_size`` and node index/count.

    ``store`` is the default process group's store while torch.distributed is initialised, else None
    (then every coordination call is a no-op for the single process). It is looked up at each use and
    never held, so nothing of btckpt keeps the store alive past ``destroy_process_group()``.
    ``World(..., store=s)`` coordinates through the c10d store ``s`` instead (any ``torch.distributed.Store``:
    a ``HashStore`` shared by threads lets a test run several ranks' agreements in one process).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_rank: int = 0
    nodes: int = 1
    distributed: bool = False
    _store: Any = field(default=None, repr=False, compare=False)

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1, node_rank: int = 0,
                 nodes: int = 1, distributed: bool = False, *, store: Any = None) -> None:
        for name, value in (("rank", rank), ("size", size), ("local_rank", local_rank), ("local_size", local_size),
                            ("node_rank", node_rank), ("nodes", nodes),
                            ("distributed", distributed or store is not None), ("_store", store)):
            object.__setattr__(self, name, value)

    @property
    def store(self) -> Any:
        """The c10d store coordination goes through: the one given to ``World(store=)``, else the default
        process group's (None when not distributed or already destroyed)."""
        if self._store is not None:
            return self._store
        if not self.distributed:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()

    def _st(self) -> Any:
        store = self.store
        if store is None:
            raise CoordinationError(f"rank {self.rank}: the process group was destroyed while btckpt was "
                                    "coordinating a save; call ckpt.close() before destroy_process_group()")
        return store

    @property
    def is_leader(self) -> bool:
        """Global rank 0: decides names, records a checkpoint complete."""
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        """Local rank 0: owns this node's folder (lock, temp folder, manifest, rename)."""
        return self.local_rank == 0

    def as_json(self) -> dict[str, int]:
        return {"size": self.size, "nodes": self.nodes, "node_rank": self.node_rank}

    # -- store-based agreement (safe from any thread) -------------------------------------------------
    def barrier(self, tag: str, *, timeout: float, ranks: int | None = None) -> None:
        """Wait until every rank (or ``ranks`` of them) called ``barrier(tag)``; raise after ``timeout`` s."""
        if self.store is None or self.size == 1:
            return
        try:
            self._barrier(tag, timeout=timeout, ranks=ranks)
        except CoordinationError:
            raise
        except _STORE_ERRORS as exc:
            raise _lost(self.rank, tag, exc) from exc

    def _barrier(self, tag: str, *, timeout: float, ranks: int | None) -> None:
        need = self.size if ranks is None else ranks
        key = f"btckpt/{tag}"
        self._st().add(f"{key}/arrived", 1)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            fail = self._check(f"{key}/fail")
            if fail is not None:
                raise CoordinationError(f"rank {fail} failed during {tag!r}; nothing was committed")
            n = int(self._st().add(f"{key}/arrived", 0))
            if n >= need:
                return
            if time.monotonic() > deadline:
                raise CoordinationError(
                    f"rank {self.rank}: only {n} of {need} ranks reached {tag!r} within {timeout:.0f}s; a peer "
                    "died or hung. Nothing was committed; raise barrier_timeout if saves are just slow")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def fail(self, tag: str) -> None:
        """Tell peers waiting in ``barrier(tag)`` that this rank failed (they raise at once)."""
        if self.store is not None and self.size > 1:
            try:
                self._st().set(f"btckpt/{tag}/fail", str(self.rank))
            except _STORE_ERRORS:  # the store is gone: peers find out on their own
                pass

    def _check(self, key: str) -> str | None:
        if self._st().check([key]):
            return bytes(self._st().get(key)).decode()
        return None

    def publish(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` for peers."""
        if self.store is not None and self.size > 1:
            try:
                self._st().set(f"btckpt/{key}", json.dumps(value))
            except _STORE_ERRORS as exc:
                raise _lost(self.rank, key, exc) from exc

    def collect(self, key: str, *, timeout: float) -> Any:
        """Wait for and return the JSON value published under ``key``."""
        full = f"btckpt/{key}"
        deadline = time.monotonic() + timeout
        try:
            while not self._st().check([full]):
                if time.monotonic() > deadline:
                    raise CoordinationError(f"rank {self.rank}: no value for {key!r} within {timeout:.0f}s; "
                                            "a peer died or hung")
                time.sleep(0.002)
            return json.loads(bytes(self._st().get(full)).decode())
        except _STORE_ERRORS as exc:
            raise _lost(self.rank, key, exc) from exc

    def propose(self, key: str, value: Any) -> Any:
        """Set ``key`` to ``value`` unless a peer set it first (atomic); return the value that holds."""
        if self.store is None or self.size == 1:
            return value
        full = f"btckpt/{key}"
        try:
            return json.loads(bytes(self._st().compare_set(full, "", json.dumps(value))).decode())
        except _STORE_ERRORS as exc:
            raise _lost(self.rank, key, exc) from exc

    def peek(self, key: str) -> Any:
        """The JSON value published under ``key``, or None when there is none yet (never waits)."""
        if self.store is None or self.size == 1:
            return None
        try:
            raw = self._check(f"btckpt/{key}")
        except _STORE_ERRORS as exc:
            raise _lost(self.rank, key, exc) from exc
        return None if raw is None else json.loads(raw)

    def agree_step(self, key: str, steps: list[int], *, timeout: float) -> int:
        """The newest step that every rank lists in ``steps`` (its complete checkpoints), or -1.

        Each rank publishes its list; global rank 0 intersects them and publishes the answer. A multi-node
        checkpoint whose part is missing (or incomplete) on some node is therefore never picked.
        """
        if self.store is None or self.size == 1:
            return max(steps, default=-1)
        self.publish(f"{key}/steps/{self.rank}", sorted(set(steps)))
        if self.is_leader:
            common = set(steps)
            for r in range(1, self.size):
                common &= set(self.collect(f"{key}/steps/{r}", timeout=timeout))
            self.publish(f"{key}/agreed", max(common, default=-1))
        return int(self.collect(f"{key}/agreed", timeout=timeout))


class StopAgreement:
    """The step every rank stops (and saves) at after a SIGTERM reached any of them, agreed through the c10d
    store: no collective, no device sync, safe to call at every step boundary.

    The first rank to see its signal proposes the next step (peers in lockstep, e.g. DDP, are at most one step
    apart and have not passed it); every rank checks the store at each call (one key lookup) and stops once
    it reaches the agreed step. ``key`` must be the same on every rank and new for each run of a store
    (the core keys it by its session; integrations by :class:`btckpt.adapters.PreemptionWatch`)."""

    def __init__(self, world: World, key: str) -> None:
        self.world, self.key = world, key
        self.at: int | None = None  # the agreed step, once known

    def due(self, step: int, *, local: bool) -> bool:
        """Whether this rank stops at ``step``; ``local``: this rank got SIGTERM."""
        if self.world.size == 1 or self.world.store is None:
            return local
        if self.at is None:
            found = self.world.propose(self.key, step + 1) if local else self.world.peek(self.key)
            if found is not None:
                self.at = int(found)
                log.warning("btckpt: rank %d: preemption agreed: every rank saves and stops at step %d",
                            self.world.rank, self.at)
        return self.at is not None and step >= self.at


def world() -> World:
    """Describe this process from torch.distributed (when initialised) and the launcher's environment."""
    try:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover
        initialized = False
    if not initialized:
        return World(node_rank=node_rank(), nodes=max(1, _env_int("BT_GROUP_SIZE", 1)))
    rank, size = dist.get_rank(), dist.get_world_size()
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    local_rank = _env_int("LOCAL_RANK", rank % max(local_size, 1))
    nodes = max(1, size // max(local_size, 1))
    # $BT_NODE_RANK names this node's folder (the platform uploads it as rank-<node>); torchrun's
    # GROUP_RANK follows rendezvous arrival order under --rdzv-backend=c10d, so it is only the fallback.
    node = _env_int("BT_NODE_RANK", _env_int("GROUP_RANK", rank // max(local_size, 1)))
    return World(rank, size, local_rank, local_size, node, nodes, distributed=True)
