"""This package's ``ModelCheckpoint`` (Lightning's, with the platform's defaults: :mod:`btckpt.lightning`'s
module doc) and the routing of Lightning's own ``ModelCheckpoint`` folder choice through
:meth:`SafetensorsCheckpointIO.placement <btckpt.lightning.SafetensorsCheckpointIO.placement>`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..adapters import (
    Checkpointer,
    PreemptionWatch,
    checkpoint_name,
    local_save_due,
    refuse_fresh_start,
    refuse_other_runs,
)
from ..config import CheckpointConfig, resolve_dir
from . import rng as _rng
from .plugin import SafetensorsCheckpointIO
from .state import platform_dir, safe_for_background_copy
from .strategies import check_strategy

__all__ = ["ModelCheckpoint"]

log = logging.getLogger("btckpt")


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with the platform's defaults (same arguments, same state key).

    ``dirpath`` defaults to ``$BT_CHECKPOINT_DIR``, else Lightning's own choice (``<default_root_dir>/checkpoints``,
    or the logger's ``<log_dir>/checkpoints``: two experiments never share a folder). A fit started fresh
    (no ``ckpt_path``) into a folder holding checkpoints, or resumed from elsewhere into one holding only another
    run's, is refused before its first step (:class:`ConfigError` naming the folder and the fixes; README "Run
    identity"). Under DDP it makes every
    rank's RNG state part of the checkpoint (module doc). With
    :class:`SafetensorsCheckpointIO`, a SIGTERM (preemption) saves ``last.ckpt`` at the next training batch
    end, waits for its commit, and stops the trainer cleanly (exit status 0); with several ranks, a SIGTERM
    on any of them makes every rank save and stop at the same step (agreed through the c10d store, no
    collective: :class:`btckpt.adapters.PreemptionWatch`). With the plugin's ``local_every_steps=K`` it also
    saves into the local tier every K training steps.
    """

    def __init__(self, dirpath: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(resolve_dir(dirpath) if dirpath is not None or platform_dir() else None, *args, **kwargs)
        self._ck: Checkpointer | None = None
        self._watch: PreemptionWatch | None = None  # several ranks: SIGTERM on any makes every rank stop
        self._local_step: int | None = None  # the newest step saved into the local tier

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """On every rank: hand this rank's RNG state to rank 0's plugin; at a mid-epoch training batch end,
        let rank 0's plugin copy parameters and moments behind the step gate (module doc)."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SafetensorsCheckpointIO):
            return
        if io.save_rng:
            _rng.note(checkpoint)
        if trainer.is_global_zero and safe_for_background_copy(trainer):
            io.gate_with(checkpoint, list(trainer.optimizers))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_strategy(trainer.strategy)
        if isinstance(trainer.strategy.checkpoint_io, SafetensorsCheckpointIO):
            trainer.strategy.checkpoint_io.attach(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SafetensorsCheckpointIO) or not self.dirpath:
            return
        if trainer.ckpt_path is None:  # every rank: all refuse together; a fresh fit would take earlier names
            refuse_fresh_start(self.dirpath, local_tier_dir=io.local_tier_dir)
        elif Path(os.path.abspath(trainer.ckpt_path)).parent != Path(os.path.abspath(self.dirpath)):
            # a warm start from elsewhere: the folder must not hold only another run's checkpoints
            refuse_other_runs(self.dirpath, run=io._run, local_tier_dir=io.local_tier_dir)
        # created after Lightning installed its SIGTERM handler: ours takes over until teardown
        if trainer.world_size == 1:
            self._ck = io.checkpointer(self.dirpath, handle_sigterm=True)
        else:  # every rank: Lightning saves on rank 0 only, so no Checkpointer is shared by the ranks
            self._watch = PreemptionWatch(f"lightning:{self.dirpath}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ck, watch = self._ck, self._watch
        if not ((ck is not None and ck.preempted) or (watch is not None and watch.due(trainer.global_step))):
            self._maybe_save_local(trainer)
            return
        assert self.dirpath is not None
        filepath = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self.last_model_path = filepath
        trainer.save_checkpoint(filepath)  # every rank (Lightning's save is collective)
        trainer.strategy.checkpoint_io.wait()
        if watch is not None:
            watch.stopped(timeout=CheckpointConfig.preemption_grace)
        log.warning("btckpt: preemption checkpoint for step %d committed; stopping", trainer.global_step)
        raise SIGTERMException()

    def _maybe_save_local(self, trainer: Any) -> None:
        """Every ``local_every_steps`` training steps (the plugin's), a save of this step into the local tier,
        unless this callback saved the step already; on every rank, as Lightning's own saves."""
        io = trainer.strategy.checkpoint_io
        step = trainer.global_step
        if not isinstance(io, SafetensorsCheckpointIO) or not self.dirpath or not local_save_due(
                io.local_every_steps, step, done=(self._last_global_step_saved, self._local_step)):
            return
        with io.into_local_tier():
            trainer.save_checkpoint(os.path.join(self.dirpath, checkpoint_name(step)))
        self._local_step = step

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._watch is not None:
            self._watch.close()
        self._ck, self._watch, self._local_step = None, None, None
        super().teardown(trainer, pl_module, stage)



_RESOLVE_DIR = "_ModelCheckpoint__resolve_ckpt_dir"  # Lightning >= 2.0: ModelCheckpoint's one folder choice


def _route_lightning_dir_choice() -> None:
    """Make Lightning's ``ModelCheckpoint`` ask :meth:`SafetensorsCheckpointIO.placement` for its folder.

    Lightning decides a ``ModelCheckpoint``'s folder in one private method, called by ``setup`` and by
    ``ckpt_path="last"`` (before any plugin call): for a trainer whose ``checkpoint_io`` is this plugin and
    with ``$BT_CHECKPOINT_DIR`` set, the answer becomes that folder; every other trainer keeps Lightning's.
    Without the method (a future Lightning), ``save_checkpoint`` still stores under ``$BT_CHECKPOINT_DIR``,
    with its warning; only ``ckpt_path="last"`` would no longer look there.
    """
    lightning_choice = getattr(_ModelCheckpoint, _RESOLVE_DIR, None)
    if lightning_choice is None or getattr(lightning_choice, "_btckpt", False):
        return

    def resolve_ckpt_dir(callback: _ModelCheckpoint, trainer: Any) -> Any:
        io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
        if isinstance(io, SafetensorsCheckpointIO):
            check_strategy(trainer.strategy)  # also for Lightning's own / the default ModelCheckpoint
            asked = callback.dirpath
            bt = io.placement(asked, what=f"{type(callback).__name__}(dirpath={asked!r})")
            if bt is not None:
                return str(bt)
        return lightning_choice(callback, trainer)

    resolve_ckpt_dir._btckpt = True  # type: ignore[attr-defined]
    setattr(_ModelCheckpoint, _RESOLVE_DIR, resolve_ckpt_dir)


_route_lightning_dir_choice()
