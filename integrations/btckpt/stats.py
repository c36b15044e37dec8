"""The figures a Checkpointer publishes about its saves (``Checkpointer.stats``), for logs and benchmarks.

Public through ``btckpt``: :class:`CheckpointStats` (``btckpt.CheckpointStats``); import it from there.
The module itself is internal: its path and its other names may change without notice.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["CheckpointStats", "StatsRecorder"]


@dataclass(frozen=True)
class CheckpointStats:
    """A snapshot of one Checkpointer's save figures (this rank), read through ``Checkpointer.stats``.

    Stall is what training pays: ``save_block_s`` (time ``save()`` blocked) plus ``gate_wait_s`` (time
    ``optimizer.step()`` or :meth:`~btckpt.Checkpointer.fence` waited for the snapshot's background copies).

    - ``saves``: ``save()`` calls that took a snapshot; ``commits``: checkpoints committed (this rank's part).
    - ``save_block_s`` / ``last_save_block_s``: seconds ``save()`` blocked, in total / in the last save.
    - ``gate_wait_s`` / ``gate_waits``: seconds the step gate held training in total / how many times it
      found the copies unfinished.
    - ``bytes_written`` / ``last_bytes``: bytes this rank wrote (files, headers included), total / last commit.
    - ``last_write_s``: seconds from the last committed ``save()`` call to its commit; ``last_mb_s``: its
      ``last_bytes`` per second (MB = 10^6 bytes).
    - ``last_committed_step``: the step of the newest checkpoint committed by this Checkpointer (None: none yet).
    - ``plan_reuses``: saves that reused the cached save plan (the state's structure was unchanged).
    - ``arena_bytes`` / ``arena_pinned`` / ``arena_allocations``: host memory of the reusable staging arena
      (0 before the first async save), whether it is pinned (page-locked, for device copies), and how many
      times it was allocated (1 while the state's size stays the same). With a local tier, saves stage into
      two file arenas in the tier (they become its checkpoints' files; ``arena_bytes`` counts both): 2
      allocations, plus one each time a step still being promoted or sent kept an arena's files.
    """

    saves: int = 0
    commits: int = 0
    save_block_s: float = 0.0
    last_save_block_s: float = 0.0
    gate_wait_s: float = 0.0
    gate_waits: int = 0
    bytes_written: int = 0
    last_bytes: int = 0
    last_write_s: float = 0.0
    last_mb_s: float = 0.0
    last_committed_step: int | None = None
    plan_reuses: int = 0
    arena_bytes: int = 0
    arena_pinned: bool = False
    arena_allocations: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain dict (for JSON logs)."""
        return dataclasses.asdict(self)


class StatsRecorder:
    """The mutable side: the training thread records saves, the writer records commits (under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = CheckpointStats()

    def saved(self, block_s: float, *, plan_reused: bool) -> None:
        with self._lock:
            s = self._s
            self._s = dataclasses.replace(s, saves=s.saves + 1, save_block_s=s.save_block_s + block_s,
                                          last_save_block_s=block_s, plan_reuses=s.plan_reuses + plan_reused)

    def committed(self, step: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            s = self._s
            self._s = dataclasses.replace(s, commits=s.commits + 1, bytes_written=s.bytes_written + nbytes,
                                          last_bytes=nbytes, last_write_s=seconds,
                                          last_mb_s=nbytes / 1e6 / max(seconds, 1e-9), last_committed_step=step)

    def snapshot(self, **live: Any) -> CheckpointStats:
        """The figures so far, with ``live`` ones read from their owners now (gate waits, arena)."""
        with self._lock:
            return dataclasses.replace(self._s, **live)
