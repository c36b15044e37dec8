"""Hugging Face ``Trainer`` integration: one callback, async safetensors checkpoints, exact resume.

Usage::

    from btckpt.hf import CheckpointCallback, resume_checkpoint
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume_checkpoint())   # None when there is nothing to resume

(``trainer.train()`` alone resumes too: the callback fills in ``resume_checkpoint()`` for this run's identity
when the argument is not given; pass ``resume_from_checkpoint=False`` to start fresh, in a dir that holds no
checkpoints. Off the platform, without ``$BT_CHECKPOINT_DIR``, the callback saves into ``output_dir``. Run
identity: README "Run identity", :func:`run_identity`.)

How it plugs in: when the Trainer is built, the callback finds it (the callback API hands callbacks no
Trainer) and replaces a few of its checkpoint methods on that instance only (``REPLACED`` in
:mod:`btckpt.hf.trainer_api`: each one's presence and parameters are checked at that moment, so an
unsupported transformers release fails at once with :class:`ConfigError`, not mid-training; the
replacements: :mod:`btckpt.hf.patches`). ``_save_checkpoint`` becomes one async btckpt save of the same
step at the same moment HF would save (after logging, evaluation and the best-metric update), so HF writes
nothing itself. The model (``_load_from_checkpoint``) and the RNG streams (``_load_rng_state``) are read
from a btckpt folder, verified, at the points where HF loads its own files; optimizer, scheduler and scaler
state load in place at the public ``on_train_begin`` event (HF's own loaders find none of their files in a
btckpt folder and do nothing). Data position, RNG streams and gradient accumulation come out exactly as in
an uninterrupted run, on transformers 4.x too (see :func:`btckpt.hf.resume.pin_resumed_epoch`), where the
Trainer's own checkpoints are not exact. Folders without ``btckpt.json`` go to HF's own loaders.

Each ``checkpoint-<step>`` folder is servable (``model.safetensors`` or shards + index with the model's
own keys, ``config.json``, ``generation_config.json``, tokenizer/processor files; for PEFT models
``adapter_model.safetensors`` + ``adapter_config.json``) and resumable (``optimizer.safetensors``,
``scheduler``/``scaler`` state in the manifest, ``rng_state_<rank>.json``, ``trainer_state.json``).
``push_to_hub=True`` is refused (:class:`ConfigError`): the Trainer pushes from the saving replaced here.
Supported: one process, DDP (torchrun, several nodes), FSDP2 (accelerate ``fsdp_version: 2``: each rank
writes its own shards, resume reshards to any world size, ``consolidate=True`` adds a servable folder; see
:mod:`btckpt.hf.sharded`), FSDP1 (``fsdp="full_shard"`` / ``"shard_grad_op"``) the same way, DeepSpeed ZeRO
1-3 (each rank writes its partition: :mod:`btckpt.hf.deepspeed`).

Package: this module (the callback, a thin adapter over the core), ``trainer_api`` (the Trainer methods replaced
and the checks when the callback attaches), ``patches`` (the replacements, ``_p_*``), ``resume`` (what a run
resumes from: ``resume_checkpoint``, ``run_identity``, a finished run, the best model's folder), ``save`` (what one
save holds: state groups, the Trainer's files, meta), ``sharded`` (which Trainer sharding modes are supported)
and ``deepspeed`` (ZeRO). An adapter: of btckpt it imports only ``btckpt.adapters`` (the Checkpointer and
everything else of the core it uses come through it), ``btckpt.errors``, ``btckpt.config`` and its own modules;
never ``btckpt.lightning`` or ``btckpt.cli`` (``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ..adapters import Checkpointer, unwrap_model
from ..errors import ConfigError
from .patches import TrainerPatches
from .resume import find_best, pin_resumed_epoch, resume_checkpoint, run_identity
from .save import is_peft, processor_files, state_groups, trainer_files
from .sharded import refuse_unsupported
from .trainer_api import REPLACED, check_trainer_api, find_trainer, patch_name, refuse_push_to_hub

__all__ = ["CheckpointCallback", "resume_checkpoint", "run_identity"]

log = logging.getLogger("btckpt")


class CheckpointCallback(TrainerPatches, TrainerCallback):
    """Takes over the Trainer's checkpoint saving (async btckpt saves into ``$BT_CHECKPOINT_DIR``, else the
    Trainer's ``output_dir``) and resume.

    Saves happen when the Trainer's own save would (``save_strategy`` steps/epoch/best, ``save_steps``);
    ``save_total_limit`` becomes ``keep_last`` (unset: every checkpoint is kept, as the Trainer does, not a
    plain Checkpointer's default 3) and the best checkpoint is protected from retention.
    A SIGTERM saves at the next step boundary, waits for the commit and exits the process with status 0
    (``exit_on_preemption=False``: ``train()`` returns instead). ``auto_resume``: ``train()`` without
    ``resume_from_checkpoint`` resumes from :func:`resume_checkpoint`. ``local_every_steps=K`` (and
    ``local_tier_dir``): every K optimizer steps a save into the node-local tier, with the Trainer's files
    like any save; the saves above go through the tier and are promoted into the dir (see README "Tiers").
    Other keyword options go to :class:`btckpt.Checkpointer` (``dir``, ``load_dir``, ``keep_last``,
    ``async_save``, ``max_shard_size``...). The replaced Trainer methods: :class:`btckpt.hf.patches.TrainerPatches`.
    """

    def __init__(self, *, auto_resume: bool = True, exit_on_preemption: bool = True, **options: Any) -> None:
        self.options = dict(options)
        self.auto_resume = auto_resume
        self.exit_on_preemption = exit_on_preemption
        self.trainer: Trainer | None = None
        self.ckpt: Any = None
        self.preempted_at: int | None = None
        self._orig: dict[str, Callable[..., Any]] = {}
        self._best: Path | None = None
        self._saved: set[int] = set()
        self._local_step: int | None = None  # the newest step saved into the local tier
        self._static_files: dict[str, bytes] | None = None
        self._resume_from: str | None = None  # the folder train() resumes from, until its state is loaded
        self._resumed_epoch_pending = False
        self.stats: dict[str, float] = {}  # the last Checkpointer's stats (save_block_s, gate_wait_s, ...)

    # -- wiring ----------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = find_trainer()
        if trainer is None:
            raise ConfigError("CheckpointCallback could not find its Trainer; pass it in Trainer(callbacks=[...])")
        self.attach(trainer)

    def attach(self, trainer: Trainer) -> None:
        """Bind to ``trainer`` (done automatically when the Trainer is built with this callback)."""
        if self.trainer is trainer:
            return
        refuse_unsupported(trainer, peft=is_peft(unwrap_model(getattr(trainer, "model", None))))
        check_trainer_api(trainer)
        refuse_push_to_hub(trainer.args)
        self.trainer = trainer
        if getattr(trainer, "is_deepspeed_enabled", False):
            from .deepspeed import install_load_hook

            install_load_hook(self._zero_loader)
        for name in REPLACED:
            self._orig[name] = getattr(trainer, name)
            setattr(trainer, name, getattr(self, patch_name(name)))

    def _dir(self) -> str | None:
        """Where this callback saves: ``dir=``, else ``$BT_CHECKPOINT_DIR``, else the Trainer's ``output_dir``
        (as the Trainer's own checkpoints: two experiments never share a folder)."""
        given = self.options.get("dir")
        if given is not None or os.environ.get("BT_CHECKPOINT_DIR") or self.trainer is None:
            return given
        return str(self.trainer.args.output_dir) if self.trainer.args.output_dir else None

    def _checkpointer(self) -> Any:
        if self.ckpt is None:
            opts = dict(self.options)
            limit = self.trainer.args.save_total_limit if self.trainer is not None else None
            opts.setdefault("keep_last", limit if limit and limit > 0 else None)
            opts["dir"] = self._dir()
            if self.trainer is not None:
                opts.setdefault("run_id", run_identity(self.trainer))
            self.ckpt = Checkpointer(**opts)
            self._best, self._saved, self._local_step, self.preempted_at = None, set(), None, None
        return self.ckpt

    def close(self) -> None:
        """Wait for pending saves and release the Checkpointer (done at the end of ``train()``)."""
        ckpt, self.ckpt = self.ckpt, None
        if ckpt is not None:
            try:
                ckpt.close()
            finally:
                self.stats = ckpt.stats.as_dict()

    def _resume_checkpoint(self) -> str | None:
        """:func:`resume_checkpoint` with this callback's ``dir`` / ``load_dir`` / ``on_missing`` options."""
        return resume_checkpoint(dir=self._dir(), load_dir=self.options.get("load_dir"),
                                 on_missing=self.options.get("on_missing", "raise"),
                                 local_tier_dir=self.options.get("local_tier_dir"),
                                 run_id=self.ckpt.config.run_id if self.ckpt is not None else None)

    # -- events --------------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checkpointer()
        checkpoint, self._resume_from = self._resume_from, None
        find_best(self.trainer, checkpoint)
        self._load_training_state(checkpoint)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The first epoch of a resumed run keeps its sampler order (transformers 4.x: :func:`pin_resumed_epoch`)."""
        if self._resumed_epoch_pending:
            self._resumed_epoch_pending = False
            pin_resumed_epoch(kwargs.get("train_dataloader"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.wait()

    # -- what a save holds (btckpt.hf.save) ------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        assert self.trainer is not None
        return state_groups(self.trainer)

    def _files(self) -> dict[str, bytes]:
        """config.json, generation_config.json, tokenizer/processor files, trainer_state.json, training_args.json."""
        assert self.trainer is not None
        if self._static_files is None:
            self._static_files = processor_files(self.trainer)
        return trainer_files(self.trainer, self._static_files)
