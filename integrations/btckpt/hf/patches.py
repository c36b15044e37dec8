"""The Trainer methods the callback replaces on its Trainer instance (:data:`btckpt.hf.trainer_api.REPLACED`):
the ``_p_*`` methods of :class:`TrainerPatches`, which :class:`btckpt.hf.CheckpointCallback` inherits.

``_p_train`` adds auto resume, the Checkpointer's lifetime and the preemption exit; ``_p_save_checkpoint`` is
one async btckpt save of the step (HF writes nothing); ``_p_maybe_log_save_evaluate`` adds the SIGTERM save
and the local tier's saves; the loaders read a btckpt folder (model, RNG, best model) and pass anything else
to HF's own. The optimizer, scheduler and scaler state load at ``on_train_begin`` (:meth:`_load_training_state`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer

from ..adapters import load_groups, local_save_due, preemption_due, restore_rank_rng, unwrap_model
from .resume import btckpt_info, finished_run, resume_arg
from .save import is_peft, record_best, record_callback_states, save_meta

__all__ = ["TrainerPatches"]

log = logging.getLogger("btckpt")


class TrainerPatches:
    """The replacements of the Trainer's checkpoint methods, bound to the callback that holds this state."""

    trainer: Trainer | None
    ckpt: Any
    preempted_at: int | None
    options: dict[str, Any]
    auto_resume: bool
    exit_on_preemption: bool
    _orig: dict[str, Callable[..., Any]]
    _best: Path | None
    _saved: set[int]
    _local_step: int | None
    _resume_from: str | None
    _resumed_epoch_pending: bool

    if TYPE_CHECKING:  # the callback's own (btckpt.hf.CheckpointCallback)
        def _checkpointer(self) -> Any: ...
        def close(self) -> None: ...
        def _dir(self) -> str | None: ...
        def _resume_checkpoint(self) -> str | None: ...
        def _state(self) -> dict[str, Any]: ...
        def _files(self) -> dict[str, bytes]: ...

    # -- train(): auto resume, lifetime, preemption exit --------------------------------------------------
    def _p_train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._checkpointer()  # first: with peer replicas, a node that lost its memory fetches its part back here
        try:
            resume_from_checkpoint = resume_arg(resume_from_checkpoint, auto_resume=self.auto_resume,
                                                find=self._resume_checkpoint, dir=self._dir(), ckpt=self.ckpt,
                                                local_tier_dir=self.options.get("local_tier_dir"))
            resuming = isinstance(resume_from_checkpoint, str | os.PathLike)
            if resuming:
                assert self.trainer is not None
                done = finished_run(self.trainer, os.fspath(resume_from_checkpoint),
                                    load_model=self._p_load_from_checkpoint, load_best=self._p_load_best_model)
                if done is not None:
                    return done
            self._resume_from = os.fspath(resume_from_checkpoint) if resuming else None
            self._resumed_epoch_pending = resuming
            out = self._orig["train"](resume_from_checkpoint, *args, **kwargs)
        finally:
            self.close()
        if self.preempted_at is not None and self.exit_on_preemption:
            log.warning("btckpt: preempted; checkpoint-%d is committed, exiting with status 0", self.preempted_at)
            raise SystemExit(0)
        return out

    # -- saving --------------------------------------------------------------------------------------------
    def _p_save_checkpoint(self, model: Any, trial: Any = None, *args: Any, **kwargs: Any) -> None:
        """Replaces ``Trainer._save_checkpoint``: the same bookkeeping, one async btckpt save, no HF write."""
        self._save_step(trial, local=False)

    def _save_step(self, trial: Any, *, local: bool) -> None:
        """The Trainer's save bookkeeping and files, then a btckpt save of this step: durable (``save``,
        through the local tier when there is one) or ``local`` (``save_local``: the tier only, no best-model
        record, since the step may never reach the dir)."""
        tr = self.trainer
        assert tr is not None
        ckpt = self._checkpointer()
        step = int(tr.state.global_step)
        if tr.hp_search_backend is None and trial is None:
            tr.store_flos()
        if not local:
            self._best = record_best(tr, ckpt, step=step, saved=self._saved, previous=self._best)
        record_callback_states(tr)
        files = self._files() if ckpt.world.is_local_leader else {}
        save = ckpt.save_local if local else ckpt.save
        meta, optimizers = save_meta(tr)
        save(step, self._state(), extra_files=files, meta=meta, optimizers=optimizers)
        if local:
            self._local_step = step
        else:
            self._saved.add(step)

    def _p_maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig["_maybe_log_save_evaluate"](*args, **kwargs)
        tr = self.trainer
        if tr is None or self.ckpt is None or self.preempted_at is not None:
            return out
        step = int(tr.state.global_step)
        if preemption_due(self.ckpt, step):  # the store: no collective, no device sync per step
            if step not in self._saved:
                self._p_save_checkpoint(tr.model_wrapped, None)
            self.ckpt.finish_preemption(step, self._state())
            self.preempted_at = step
            tr.control.should_training_stop = True
            log.warning("btckpt: SIGTERM: saved checkpoint-%d; stopping training", step)
        elif local_save_due(self.options.get("local_every_steps"), step, done=(*self._saved, self._local_step)):
            self._save_step(None, local=True)
        return out

    def _p_load_best_model(self, *args: Any, **kwargs: Any) -> Any:
        if self.preempted_at is not None:
            return None
        if self.ckpt is not None:
            self.ckpt.wait()  # the best checkpoint may still be writing
        best = self.trainer.state.best_model_checkpoint  # type: ignore[union-attr]
        if best and getattr(self.trainer, "is_fsdp_enabled", False) and btckpt_info(best) is not None:
            return self._p_load_from_checkpoint(best)  # HF's FSDP loader looks for its own files
        return self._orig["_load_best_model"](*args, **kwargs)

    # -- resuming -----------------------------------------------------------------------------------------
    def _p_load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> Any:
        info = btckpt_info(resume_from_checkpoint)
        if info is not None and getattr(self.trainer, "is_deepspeed_enabled", False):
            from .deepspeed import load_engine

            load_engine(self.trainer, info)
            return None
        target = unwrap_model(model if model is not None else self.trainer.model)  # type: ignore[union-attr]
        if info is None or is_peft(target) or "model" not in (info.manifest.state if info.manifest else {}):
            return self._orig["_load_from_checkpoint"](resume_from_checkpoint, model)
        load_groups(info, {"model": target}, ["model"], rank=self.trainer.args.process_index)  # type: ignore[union-attr]
        log.info("btckpt: loaded model weights from %s", info.path)
        return None

    def _p_load_rng_state(self, checkpoint: str | None) -> Any:
        info = btckpt_info(checkpoint)
        if info is None:
            return self._orig["_load_rng_state"](checkpoint)
        restore_rank_rng(info, self.trainer.args.process_index)  # type: ignore[union-attr]
        return None

    def _load_training_state(self, checkpoint: str | None) -> None:
        """Optimizer, scheduler and scaler state from a btckpt folder, in place (at ``on_train_begin``)."""
        info = btckpt_info(checkpoint)
        if info is None:
            return  # not resuming, or an HF folder: the Trainer's own loaders handled it
        tr = self.trainer
        assert tr is not None and info.manifest is not None
        groups = info.manifest.state
        if getattr(tr, "is_deepspeed_enabled", False):  # the engine's state came in through the DeepSpeed hook
            if "scheduler" in groups and tr.lr_scheduler is not None:
                load_groups(info, {"scheduler": tr.lr_scheduler}, ["scheduler"], rank=tr.args.process_index)
            return
        if "optimizer" not in groups:
            log.warning("btckpt: %s holds no optimizer state (save_only_model?); the optimizer starts fresh", info.path)
            return
        # the model is in the state because a sharded (FQN-keyed) optimizer state maps through it
        state = {"model": tr.model, "optimizer": getattr(tr.optimizer, "optimizer", tr.optimizer)}
        if "scheduler" in groups and tr.lr_scheduler is not None:
            state["scheduler"] = tr.lr_scheduler
        scaler = getattr(tr.accelerator, "scaler", None)
        if scaler is not None and "scaler" in groups:
            state["scaler"] = scaler
        load_groups(info, state, [n for n in state if n != "model"], rank=tr.args.process_index)

    def _zero_loader(self, engine: Any, path: str) -> Callable[[], None] | None:
        """For the DeepSpeed load hook: the loader of a btckpt folder into this Trainer's engine, else None."""
        tr = self.trainer
        if tr is None or tr.model_wrapped is not engine:
            return None
        info = btckpt_info(path)
        if info is None:
            return None
        from .deepspeed import load_engine

        return lambda: load_engine(tr, info)
