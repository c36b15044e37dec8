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
Trainer) and replaces a few of its checkpoint methods on that instance only (``_REPLACED``: each one's
presence and parameters are checked at that moment, so an unsupported transformers release fails at once
with :class:`ConfigError`, not mid-training). ``_save_checkpoint`` becomes one async btckpt save of the same
step at the same moment HF would save (after logging, evaluation and the best-metric update), so HF writes
nothing itself. The model (``_load_from_checkpoint``) and the RNG streams (``_load_rng_state``) are read
from a btckpt folder, verified, at the points where HF loads its own files; optimizer, scheduler and scaler
state load in place at the public ``on_train_begin`` event (HF's own loaders find none of their files in a
btckpt folder and do nothing). Data position, RNG streams and gradient accumulation come out exactly as in
an uninterrupted run, on transformers 4.x too (see ``on_epoch_begin``), where the Trainer's own checkpoints
are not exact. Folders without ``btckpt.json`` go to HF's own loaders.

Each ``checkpoint-<step>`` folder is servable (``model.safetensors`` or shards + index with the model's
own keys, ``config.json``, ``generation_config.json``, tokenizer/processor files; for PEFT models
``adapter_model.safetensors`` + ``adapter_config.json``) and resumable (``optimizer.safetensors``,
``scheduler``/``scaler`` state in the manifest, ``rng_state_<rank>.json``, ``trainer_state.json``).
``push_to_hub=True`` is refused (:class:`ConfigError`): the Trainer pushes from the saving replaced here.
Supported: one process, DDP (torchrun, several nodes), FSDP2 (accelerate ``fsdp_version: 2``: each rank
writes its own shards, resume reshards to any world size, ``consolidate=True`` adds a servable folder; see
:mod:`btckpt.hf.sharded`), FSDP1 (``fsdp="full_shard"`` / ``"shard_grad_op"``) the same way, DeepSpeed ZeRO
1-3 (each rank writes its partition: :mod:`btckpt.hf.deepspeed`).

Package: this module (the callback and ``resume_checkpoint``) and ``sharded`` (which Trainer sharding modes
are supported). An adapter: of btckpt it imports only ``btckpt.adapters`` (the Checkpointer and everything
else of the core it uses come through it), ``btckpt.errors``, ``btckpt.config`` and its own modules; never
``btckpt.lightning`` or ``btckpt.cli`` (``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import inspect as _inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer, TrainerCallback, trainer_utils
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput

from ..adapters import (
    Checkpointer,
    CheckpointInfo,
    files_written_by,
    load_groups,
    local_save_due,
    model_config_files,
    open_checkpoint,
    preemption_due,
    refuse_fresh_start,
    refuse_other_runs,
    restore_rank_rng,
    resume_folder,
    run_fingerprint,
    tensor_shapes,
    unwrap_model,
)
from ..adapters import inspect as inspect_folder
from ..config import resolve_dir
from ..errors import ConfigError
from .sharded import refuse_unsupported

__all__ = ["CheckpointCallback", "resume_checkpoint", "run_identity"]

log = logging.getLogger("btckpt")

# The private Trainer methods replaced on the instance -> the leading parameters the replacement relies on
# (None: arguments are passed through unchanged, only the method's presence matters). One table, checked by
# _check_trainer_api when the callback attaches.
_REPLACED: dict[str, tuple[str, ...] | None] = {
    "train": ("resume_from_checkpoint",),
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_rng_state": ("checkpoint",),
    "_load_best_model": (),
    "_maybe_log_save_evaluate": None,
}
SUPPORTED_TRANSFORMERS = "4.57 - 5.x"


def _check_trainer_api(trainer: Trainer) -> None:
    """Raise ConfigError naming the transformers version and the method when ``_REPLACED`` does not fit."""
    problems = []
    for name, params in _REPLACED.items():
        method = getattr(trainer, name, None)
        if not callable(method):
            problems.append(f"Trainer.{name} does not exist")
            continue
        if params is None:
            continue
        sig = _inspect.signature(method)
        got = [p.name for p in sig.parameters.values()
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:len(params)]
        if got != list(params):
            problems.append(f"Trainer.{name}{sig} does not take ({', '.join(params)}) first")
    if not hasattr(trainer_utils, "SaveStrategy"):
        problems.append("transformers.trainer_utils.SaveStrategy does not exist")
    if "best_global_step" not in getattr(TrainerState, "__dataclass_fields__", {}):
        problems.append("TrainerState.best_global_step does not exist")
    if problems:
        raise ConfigError(f"btckpt.hf.CheckpointCallback cannot attach to transformers {transformers.__version__}: "
                          + "; ".join(problems) + f". Install a supported transformers ({SUPPORTED_TRANSFORMERS}) "
                          "or remove the callback to use the Trainer's own checkpointing")


def _refuse_push_to_hub(args: Any) -> None:
    """ConfigError for ``push_to_hub=True``: the Trainer pushes from the checkpoint saving this callback
    replaces, so with it nothing would reach the Hub, silently."""
    if getattr(args, "push_to_hub", False):
        raise ConfigError(
            "TrainingArguments(push_to_hub=True) with btckpt.hf.CheckpointCallback: the Trainer pushes to the Hub "
            "from its own checkpoint saving (hub_strategy), which the callback replaces, so nothing would be "
            "pushed. Set push_to_hub=False and push the final model yourself (trainer.push_to_hub() after "
            "train(), or upload a servable checkpoint-<N> folder), or remove the callback to keep the "
            "Trainer's own checkpointing and Hub pushes")


def _epoch_samplers(loader: Any) -> list[Any]:
    """The objects under a (prepared) data loader's batch sampler that have ``set_epoch``."""
    out, node, seen = [], getattr(loader, "batch_sampler", None), set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if callable(getattr(node, "set_epoch", None)) and isinstance(getattr(node, "epoch", None), int):
            out.append(node)
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
    return out


def _pin_next_set_epoch(sampler: Any, epoch: int) -> None:
    """Make the sampler's next ``set_epoch(...)`` call set ``epoch``, once; later calls behave as usual."""
    def once(_requested: int) -> None:
        del sampler.set_epoch  # back to the class's method
        sampler.set_epoch(epoch)

    sampler.set_epoch = once


def resume_checkpoint(*, dir: str | os.PathLike[str] | None = None,
                      load_dir: str | os.PathLike[str] | None = None, on_missing: str = "raise",
                      local_tier_dir: str | os.PathLike[str] | None = None, run_id: str | None = None) -> str | None:
    """Path of the newest complete, verified checkpoint to resume from, or None.

    Looks in ``dir`` (default ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``: a restarted job's own
    checkpoints, the ``checkpoint-<N>`` folders directly in it) first, then in ``load_dir`` (default
    ``$BT_LOAD_CHECKPOINT_DIR``, in any of its layouts, nested ``<job>/rank-<node>/checkpoint-<step>/``
    included). The same policy as ``Checkpointer.restore`` (:func:`btckpt.adapters.resume_folder`): incomplete
    folders are skipped; checksums are verified and a damaged checkpoint is skipped with a warning naming
    the file; a plain HF Trainer checkpoint (with ``trainer_state.json``, no ``btckpt.json``) counts too.
    The node-local tier of ``dir`` (``local_tier_dir``, default ``/dev/shm/btckpt/<job>``) is searched with it:
    its newer step wins. Raises :class:`btckpt.NoCheckpointFound` when ``load_dir`` is set and nothing was
    found anywhere, unless ``on_missing="start_fresh"`` (then None). ``run_id``: only ``dir``'s checkpoints of
    that run (:func:`run_identity`; the callback passes its Trainer's) are taken, and a ``dir`` holding only
    another run's raises :class:`ConfigError` (README "Run identity").
    """
    return resume_folder(dir=dir, load_dir=load_dir, on_missing=on_missing, accept=_resumable,
                         helper="resume_checkpoint()", local_tier_dir=local_tier_dir, run=run_id)


# TrainingArguments that make a run a different run when they change (max_steps / num_train_epochs are left out:
# raising them continues the same run; so are where and how often it saves, logs and evaluates)
_RUN_ARGS = ("seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
             "max_grad_norm", "optim", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "label_smoothing_factor")


def run_identity(trainer: Trainer) -> str:
    """The run identity of ``trainer``'s run (README "Run identity"): the model's config (without bookkeeping
    keys such as ``transformers_version``) and tensor names, shapes and dtypes, and the training arguments in
    ``_RUN_ARGS``."""
    model = unwrap_model(trainer.model)
    cfg: Any = getattr(model, "config", None)
    config = {k: v for k, v in (cfg.to_dict() if hasattr(cfg, "to_dict") else {}).items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    args = {k: getattr(trainer.args, k, None) for k in _RUN_ARGS}
    return run_fingerprint({"integration": "transformers", "model": type(model).__name__, "config": config,
                            "tensors": tensor_shapes(model), "args": args})


def _resumable(info: CheckpointInfo) -> bool:
    if not info.complete:
        return False
    if info.kind == "btckpt":
        return info.manifest is not None and "trainer_state.json" in info.manifest.files
    return (info.path / "trainer_state.json").is_file()


def _btckpt_info(path: str | os.PathLike[str] | None) -> CheckpointInfo | None:
    """The checkpoint at ``path`` when it is a btckpt folder (raises when it is one but is damaged)."""
    return open_checkpoint(path, btckpt_only=True)


def _find_trainer() -> Trainer | None:
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")


class CheckpointCallback(TrainerCallback):
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
    ``async_save``, ``max_shard_size``...).
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
        trainer = _find_trainer()
        if trainer is None:
            raise ConfigError("CheckpointCallback could not find its Trainer; pass it in Trainer(callbacks=[...])")
        self.attach(trainer)

    def attach(self, trainer: Trainer) -> None:
        """Bind to ``trainer`` (done automatically when the Trainer is built with this callback)."""
        if self.trainer is trainer:
            return
        refuse_unsupported(trainer, peft=_is_peft(unwrap_model(getattr(trainer, "model", None))))
        _check_trainer_api(trainer)
        _refuse_push_to_hub(trainer.args)
        self.trainer = trainer
        if getattr(trainer, "is_deepspeed_enabled", False):
            from .deepspeed import install_load_hook

            install_load_hook(self._zero_loader)
        for name in _REPLACED:
            self._orig[name] = getattr(trainer, name)
            setattr(trainer, name, getattr(self, f"_p{name}" if name.startswith("_") else f"_p_{name}"))

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

    # -- train(): auto resume, lifetime, preemption exit --------------------------------------------------
    def _resume_checkpoint(self) -> str | None:
        """:func:`resume_checkpoint` with this callback's ``dir`` / ``load_dir`` / ``on_missing`` options."""
        return resume_checkpoint(dir=self._dir(), load_dir=self.options.get("load_dir"),
                                 on_missing=self.options.get("on_missing", "raise"),
                                 local_tier_dir=self.options.get("local_tier_dir"),
                                 run_id=self.ckpt.config.run_id if self.ckpt is not None else None)

    def _p_train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._checkpointer()  # first: with peer replicas, a node that lost its memory fetches its part back here
        try:
            resume_from_checkpoint = self._resume_arg(resume_from_checkpoint)
            resuming = isinstance(resume_from_checkpoint, str | os.PathLike)
            done = self._finished_run(os.fspath(resume_from_checkpoint)) if resuming else None
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

    def _resume_arg(self, resume_from_checkpoint: Any) -> Any:
        """What ``train(resume_from_checkpoint=...)`` resumes from under btckpt: ``True`` and (``auto_resume``)
        None: this run's newest checkpoint (:meth:`_resume_checkpoint`); ``False`` (or None without
        ``auto_resume``): a fresh start, refused in a dir that holds checkpoints (its saves would take their
        names; README "Run identity"); a path: that folder (from elsewhere: refused when the own dir holds
        only another run's checkpoints)."""
        if resume_from_checkpoint is True:  # HF would look in output_dir only; look where btckpt saves
            found = self._resume_checkpoint()
            if found is None:
                raise ValueError("resume_from_checkpoint=True, but there is no complete checkpoint in "
                                 f"{resolve_dir(self._dir())} or the load dir")
            return found
        if resume_from_checkpoint is None and self.auto_resume:
            found = self._resume_checkpoint()
            if found is not None:
                log.warning("btckpt: resuming from %s", found)
            return found
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            refuse_fresh_start(self._dir(), local_tier_dir=self.options.get("local_tier_dir"))
        elif self.ckpt is not None and Path(resume_from_checkpoint).resolve().parent != self.ckpt.root.resolve():
            # a warm start from a folder elsewhere: the own dir must not hold only another run's checkpoints
            refuse_other_runs(self._dir(), run=self.ckpt.config.run_id,
                              local_tier_dir=self.options.get("local_tier_dir"))
        return resume_from_checkpoint

    def _finished_run(self, folder: str) -> Any:
        """When ``folder`` (a btckpt checkpoint) is this run's last step (``global_step >= max_steps``), a re-run
        has nothing to train: its weights (and, with ``load_best_model_at_end``, the best model) are loaded and
        the TrainOutput returned without a step (the plain Trainer would train one step past ``max_steps``).
        None otherwise."""
        tr = self.trainer
        assert tr is not None
        info = _btckpt_info(folder)
        if info is None or tr.args.max_steps <= 0 or "trainer_state.json" not in (info.manifest.files if
                                                                                  info.manifest else {}):
            return None
        state = TrainerState.load_from_json(str(info.path / "trainer_state.json"))
        if state.global_step < tr.args.max_steps:
            return None
        log.warning("btckpt: %s is step %d, and max_steps=%d: this run is finished, nothing to train; its "
                    "weights are loaded (raise max_steps to train on)", info.path, state.global_step,
                    tr.args.max_steps)
        self._p_load_from_checkpoint(str(info.path))
        tr.state = state
        self._find_best(str(info.path))
        if tr.args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self._p_load_best_model()
        loss = next((float(e["train_loss"]) for e in reversed(state.log_history) if "train_loss" in e), 0.0)
        return TrainOutput(state.global_step, loss, {})

    def _find_best(self, resumed: str | None) -> None:
        """After the Trainer's state came back from ``resumed``: a best-model record naming a folder that is not
        here (the previous job's path, for a warm start from the load dir; transformers 5 drops such a record,
        4.x keeps the dead path) names the best step's folder beside ``resumed`` when it is there, else it warns
        (``load_best_model_at_end`` would end with the last model)."""
        tr = self.trainer
        if tr is None or resumed is None or not tr.state.best_global_step:
            return
        best = tr.state.best_model_checkpoint
        if best and Path(best).is_dir():
            return
        here = Path(resumed).parent / f"checkpoint-{tr.state.best_global_step}"
        if here.is_dir() and inspect_folder(here).complete:
            tr.state.best_model_checkpoint = str(here)
            log.info("btckpt: the best checkpoint so far is %s", here)
        else:
            tr.state.best_model_checkpoint = None
            log.warning("btckpt: the best checkpoint so far (step %d, %s) is not there, nor beside %s: "
                        "load_best_model_at_end cannot load it unless a later checkpoint becomes the best",
                        tr.state.best_global_step, best or "its folder", resumed)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checkpointer()
        checkpoint, self._resume_from = self._resume_from, None
        self._find_best(checkpoint)
        self._load_training_state(checkpoint)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """transformers 4.x, first epoch of a resumed run: keep the sampler on this epoch's order.

        4.x calls ``set_epoch(epoch)`` on the train loader, then ``skip_first_batches`` wraps it in a new
        accelerate ``DataLoaderShard`` whose first iteration calls ``set_epoch(0)`` on the same sampler; a
        resume inside epoch >= 1 would then replay epoch 0's shuffle order (the Trainer's own checkpoints have
        this bug; 5.x calls ``set_epoch`` after the wrap). The sampler's epoch, set just before this event,
        is pinned for that one call.
        """
        if not self._resumed_epoch_pending:
            return
        self._resumed_epoch_pending = False
        if int(transformers.__version__.split(".")[0]) >= 5:
            return
        for sampler in _epoch_samplers(kwargs.get("train_dataloader")):
            _pin_next_set_epoch(sampler, sampler.epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.wait()

    # -- saving --------------------------------------------------------------------------------------------
    def _zero_loader(self, engine: Any, path: str) -> Callable[[], None] | None:
        """For the DeepSpeed load hook: the loader of a btckpt folder into this Trainer's engine, else None."""
        tr = self.trainer
        if tr is None or tr.model_wrapped is not engine:
            return None
        info = _btckpt_info(path)
        if info is None:
            return None
        from .deepspeed import load_engine

        return lambda: load_engine(tr, info)

    def _state(self) -> dict[str, Any]:
        tr = self.trainer
        assert tr is not None
        if getattr(tr, "is_deepspeed_enabled", False):
            from .deepspeed import zero_groups

            return zero_groups(tr)[0]
        model = unwrap_model(tr.model)
        groups: dict[str, Any] = {}
        if _is_peft(model):
            from peft import get_peft_model_state_dict  # peft is optional: only a PEFT model gets here

            groups["adapter_model"] = get_peft_model_state_dict(model)
        else:
            groups["model"] = model
        if not tr.args.save_only_model:
            opt = tr.optimizer
            groups["optimizer"] = getattr(opt, "optimizer", opt)
            if tr.lr_scheduler is not None:
                groups["scheduler"] = tr.lr_scheduler
            scaler = getattr(tr.accelerator, "scaler", None)
            if scaler is not None:
                groups["scaler"] = scaler
        return groups

    def _files(self) -> dict[str, bytes]:
        """config.json, generation_config.json, tokenizer/processor files, trainer_state.json, training_args.json."""
        tr = self.trainer
        assert tr is not None
        model = unwrap_model(tr.model)
        if _is_peft(model):
            out = files_written_by(model.peft_config[model.active_adapter].save_pretrained)
        else:
            out = model_config_files(model)
        out.update(files_written_by(lambda d: tr.state.save_to_json(os.path.join(d, "trainer_state.json"))))
        if self._static_files is None:
            save = getattr(getattr(tr, "processing_class", None), "save_pretrained", None)
            self._static_files = files_written_by(save) if callable(save) else {}
        out.update(self._static_files)
        out["training_args.json"] = tr.args.to_json_string().encode()
        return out

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
        best_step = tr.state.best_global_step
        if not local and tr.args.save_strategy in (trainer_utils.SaveStrategy.STEPS, trainer_utils.SaveStrategy.EPOCH,
                                      trainer_utils.SaveStrategy.BEST) and best_step:
            best = ckpt.root / f"checkpoint-{best_step}"
            if best_step == step or best_step in self._saved or best.exists():
                tr.state.best_model_checkpoint = str(best)
                if self._best is not None and self._best != best:
                    ckpt.unprotect(self._best)
                ckpt.protect(best)
                self._best = best
        stateful: Any = tr.state.stateful_callbacks  # as HF's _save_checkpoint records callback state
        for cb in [c for c in tr.callback_handler.callbacks + [tr.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(stateful.get(name), list):
                stateful[name].append(cb.state())
            else:
                stateful[name] = cb.state()
        files = self._files() if ckpt.world.is_local_leader else {}
        save = ckpt.save_local if local else ckpt.save
        meta: dict[str, Any] = {"integration": "transformers", "transformers_version": transformers.__version__}
        optimizers: list[Any] = []
        if getattr(tr, "is_deepspeed_enabled", False):
            from .deepspeed import zero_groups

            _, optimizers, zmeta = zero_groups(tr)
            meta.update(zmeta)
        save(step, self._state(), extra_files=files, meta=meta, optimizers=optimizers)
        if local:
            self._local_step = step
        else:
            self._saved.add(step)

    def _p_maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig["_maybe_log_save_evaluate"](*args, **kwargs)
        tr = self.trainer
        if tr is not None and self.ckpt is not None and self.preempted_at is None and preemption_due(
                self.ckpt, int(tr.state.global_step)):  # the store: no collective, no device sync per step
            step = int(tr.state.global_step)
            if step not in self._saved:
                self._p_save_checkpoint(tr.model_wrapped, None)
            self.ckpt.finish_preemption(step, self._state())
            self.preempted_at = step
            tr.control.should_training_stop = True
            log.warning("btckpt: SIGTERM: saved checkpoint-%d; stopping training", step)
        elif tr is not None and self.ckpt is not None and self.preempted_at is None and local_save_due(
                self.options.get("local_every_steps"), int(tr.state.global_step),
                done=(*self._saved, self._local_step)):
            self._save_step(None, local=True)
        return out

    def _p_load_best_model(self, *args: Any, **kwargs: Any) -> Any:
        if self.preempted_at is not None:
            return None
        if self.ckpt is not None:
            self.ckpt.wait()  # the best checkpoint may still be writing
        best = self.trainer.state.best_model_checkpoint  # type: ignore[union-attr]
        if best and getattr(self.trainer, "is_fsdp_enabled", False) and _btckpt_info(best) is not None:
            return self._p_load_from_checkpoint(best)  # HF's FSDP loader looks for its own files
        return self._orig["_load_best_model"](*args, **kwargs)

    # -- resuming -----------------------------------------------------------------------------------------
    def _p_load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> Any:
        info = _btckpt_info(resume_from_checkpoint)
        if info is not None and getattr(self.trainer, "is_deepspeed_enabled", False):
            from .deepspeed import load_engine

            load_engine(self.trainer, info)
            return None
        target = unwrap_model(model if model is not None else self.trainer.model)  # type: ignore[union-attr]
        if info is None or _is_peft(target) or "model" not in (info.manifest.state if info.manifest else {}):
            return self._orig["_load_from_checkpoint"](resume_from_checkpoint, model)
        load_groups(info, {"model": target}, ["model"], rank=self.trainer.args.process_index)  # type: ignore[union-attr]
        log.info("btckpt: loaded model weights from %s", info.path)
        return None

    def _load_training_state(self, checkpoint: str | None) -> None:
        """Optimizer, scheduler and scaler state from a btckpt folder, in place (at ``on_train_begin``)."""
        info = _btckpt_info(checkpoint)
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

    def _p_load_rng_state(self, checkpoint: str | None) -> Any:
        info = _btckpt_info(checkpoint)
        if info is None:
            return self._orig["_load_rng_state"](checkpoint)
        restore_rank_rng(info, self.trainer.args.process_index)  # type: ignore[union-attr]
        return None
