"""When to save: the durable cadence and the local tier's (policy only; the engine does the saving)."""

from __future__ import annotations

import time
from collections.abc import Container

__all__ = ["SaveSchedule", "local_save_due"]


def local_save_due(every: int | None, step: int, *, done: Container[int | None]) -> bool:
    """Whether a tier save of ``step`` is due every ``every`` steps (None: no tier cadence), unless ``step`` is
    in ``done`` (saved already: a durable save of it, or this tier cadence at that step)."""
    return every is not None and step > 0 and step % every == 0 and step not in done


class SaveSchedule:
    """The cadence of :meth:`~btckpt.Checkpointer.maybe_save`: a durable save every ``every_steps`` steps and
    every ``every_seconds`` seconds since the last one, a tier save every ``local_every_steps``.

    Call order: the training thread asks :meth:`durable_due` / :meth:`local_due` at each step boundary (the
    same on every rank for step-based cadences; ``every_seconds`` reads each rank's clock, so the rank-wide
    decision is the caller's, through the save's collective) and reports each durable save with
    :meth:`saved` (a restore reports the resumed step the same way: it is not saved again)."""

    def __init__(self, *, every_steps: int | None, every_seconds: float | None,
                 local_every_steps: int | None) -> None:
        self.every_steps, self.every_seconds, self.local_every_steps = every_steps, every_seconds, local_every_steps
        self.last_step: int | None = None  # the newest durable save (or the resumed step)
        self.last_time = time.monotonic()

    def durable_due(self, step: int) -> bool:
        """Whether a durable save of ``step`` is due (never the step saved last)."""
        due = self.every_steps is not None and step > 0 and step % self.every_steps == 0
        due = due or (self.every_seconds is not None and time.monotonic() - self.last_time >= self.every_seconds)
        return due and step != self.last_step

    def local_due(self, step: int) -> bool:
        """Whether a tier save of ``step`` is due (``local_every_steps``)."""
        return local_save_due(self.local_every_steps, step, done=())

    def saved(self, step: int) -> None:
        """A durable save of ``step`` was made (or resumed from): the cadence counts from it."""
        self.last_step, self.last_time = step, time.monotonic()
