"""Preemption: SIGTERM on any rank becomes one step every rank stops and saves at, and a grace every wait fits in.

The one agreement (:class:`~btckpt.distributed.world.StopAgreement` over the c10d store: no collective, no
device sync per step) for the Checkpointer (``maybe_save``), the HF callback (``preemption_due``) and Lightning
(``PreemptionWatch``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..distributed.world import StopAgreement, World

if TYPE_CHECKING:
    from ..saving.engine import SaveEngine
    from ..tiers.session import TierSession

__all__ = ["Preemption"]

log = logging.getLogger("btckpt")


class Preemption:
    """SIGTERM handling and the stop step, for one session of ranks.

    Call order, on every rank: :meth:`install` on the main thread (a no-op elsewhere: Python delivers signals
    there only); :meth:`due` at every step boundary (the same answer on every rank at the same step); once it
    is due, :meth:`begin` when the preemption save starts, then every wait is bounded by :meth:`left` /
    :meth:`timeout` (the Checkpointer's: :meth:`commit` for the save, :meth:`settled` at close); :meth:`close`
    gives SIGTERM back to the handler it had (not during the preemption save: the process is on its way out, and
    a second SIGTERM must not kill it mid-exit).

    ``watched=False`` (the Checkpointer): until something reads :attr:`preempted` (``maybe_save``, an
    integration), a SIGTERM is passed on to the previous handler, since no step boundary would ever save.
    ``watched=True``: the caller polls :meth:`due` from the start (Lightning's watch).
    """

    def __init__(self, world: World, key: str, *, grace: float, watched: bool = False) -> None:
        self.world, self.key, self.grace = world, key, grace
        self._agreement = StopAgreement(world, key)
        self._signalled = threading.Event()
        self._watched = watched
        self.deadline: float | None = None  # set by begin(): when the grace runs out
        self._prev: Any = None
        self._installed = False

    def install(self) -> None:
        """Take SIGTERM over (main thread only; elsewhere nothing is installed and :meth:`due` still agrees with
        the ranks that did)."""
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.saving:
            log.warning("btckpt: SIGTERM again; the preemption checkpoint is being saved (or was), exiting after it")
            return
        if not self._watched:  # nothing checks `preempted` yet: no step boundary will ever save
            log.warning("btckpt: SIGTERM received, but nothing checks for it (maybe_save() was never called), so "
                        "btckpt cannot save a final checkpoint; passing the signal on")
            prev, self._prev, self._installed = self._prev, None, False
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
            if callable(prev):
                prev(signum, frame)
            elif prev in (None, signal.SIG_DFL):
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if not self._signalled.is_set():
            log.warning("btckpt: rank %d: SIGTERM received; every rank saves a final checkpoint at the next step "
                        "boundary", self.world.rank)
        self._signalled.set()

    @property
    def preempted(self) -> bool:
        """True once SIGTERM reached this rank. Reading it marks the signal as acted upon (see the class doc)."""
        self._watched = True
        return self._signalled.is_set()

    def due(self, step: int) -> bool:
        """Whether every rank stops (and saves) at ``step``: one store lookup; call it on every rank at every step
        boundary."""
        return self._agreement.due(step, local=self.preempted)

    def begin(self) -> float:
        """The preemption save starts now: the grace runs from here; its deadline (``time.monotonic()``)."""
        self.deadline = time.monotonic() + self.grace
        return self.deadline

    @property
    def saving(self) -> bool:
        """Whether :meth:`begin` was called (the process saves its last checkpoint and exits)."""
        return self.deadline is not None

    def left(self) -> float | None:
        """Seconds left of the grace (never below 0); None before :meth:`begin`."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def timeout(self, base: float) -> float:
        """How long ranks wait for each other (``base``: ``barrier_timeout``): after :meth:`begin`, the grace left
        less a reserve for the exit (a tenth of the grace, at most 1 s), so a save that cannot finish fails (and
        says why) before the exit's deadline."""
        left = self.left()
        if left is None:
            return base
        return max(0.1, min(base, left - min(1.0, self.grace / 10)))

    def settled(self, engine: SaveEngine) -> bool:
        """After :meth:`begin`: wait for ``engine``'s save still writing until the grace runs out; False (logged)
        when it is still running then."""
        if engine.settled(self.left()):
            return True
        log.error("btckpt: the save still writing did not commit within %.0fs (preemption_grace); exiting without "
                  "it, not waiting for it (older checkpoints are intact)", self.grace)
        return False

    def commit(self, step: int, *, engine: SaveEngine, tiers: TierSession, save: Callable[[], None] | None) -> bool:
        """After :meth:`begin`, the Checkpointer's preemption checkpoint ``step`` within the grace: the save still
        writing settles, then ``save()`` (None: ``step`` is saved already), then its write settles and (local tier)
        its promotion commits. False (logged) when the grace ran out first: the process exits without it."""
        if save is not None:
            if not self.settled(engine):  # an earlier save still writing (e.g. waiting for a dead peer)
                return False
            save()
        if not self.settled(engine):
            return False
        if tiers.wait(self.left(), replicas=False):
            return True
        log.error("btckpt: the promotion of step %d did not commit within %.0fs (preemption_grace); exiting "
                  "without it (the local tier keeps it for a restart on this node)", step, self.grace)
        return False

    def stopped(self, *, timeout: float) -> None:
        """After the preemption save committed: wait (at most ``timeout`` s) until every rank got here, so no rank
        exits while another still writes."""
        self.world.barrier(f"{self.key}/stopped", timeout=timeout)

    def close(self) -> None:
        """Give SIGTERM back to the handler it had before (main thread; kept during the preemption save)."""
        if not self._installed or self.saving or threading.current_thread() is not threading.main_thread():
            return
        self._installed = False
        try:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
        except (ValueError, TypeError):  # pragma: no cover
            pass
