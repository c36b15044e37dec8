"""What a run resumes from: the folder (:func:`resume_checkpoint`, the ``train(resume_from_checkpoint=...)``
argument under btckpt), the run's identity, a finished run, the best model's folder, the resumed epoch's order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput

from ..adapters import (
    CheckpointInfo,
    open_checkpoint,
    refuse_fresh_start,
    refuse_other_runs,
    resume_folder,
    run_fingerprint,
    tensor_shapes,
    unwrap_model,
)
from ..adapters import inspect as inspect_folder
from ..config import resolve_dir

__all__ = ["resume_checkpoint", "run_identity", "RUN_ARGS", "btckpt_info", "resume_arg", "finished_run",
           "find_best", "pin_resumed_epoch"]

log = logging.getLogger("btckpt")

# TrainingArguments that make a run a different run when they change (max_steps / num_train_epochs are left out:
# raising them continues the same run; so are where and how often it saves, logs and evaluates)
RUN_ARGS = ("seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
            "max_grad_norm", "optim", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "label_smoothing_factor")


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


def run_identity(trainer: Trainer) -> str:
    """The run identity of ``trainer``'s run (README "Run identity"): the model's config (without bookkeeping
    keys such as ``transformers_version``) and tensor names, shapes and dtypes, and the training arguments in
    ``RUN_ARGS``."""
    model = unwrap_model(trainer.model)
    cfg: Any = getattr(model, "config", None)
    config = {k: v for k, v in (cfg.to_dict() if hasattr(cfg, "to_dict") else {}).items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    args = {k: getattr(trainer.args, k, None) for k in RUN_ARGS}
    return run_fingerprint({"integration": "transformers", "model": type(model).__name__, "config": config,
                            "tensors": tensor_shapes(model), "args": args})


def _resumable(info: CheckpointInfo) -> bool:
    if not info.complete:
        return False
    if info.kind == "btckpt":
        return info.manifest is not None and "trainer_state.json" in info.manifest.files
    return (info.path / "trainer_state.json").is_file()


def btckpt_info(path: str | os.PathLike[str] | None) -> CheckpointInfo | None:
    """The checkpoint at ``path`` when it is a btckpt folder (raises when it is one but is damaged)."""
    return open_checkpoint(path, btckpt_only=True)


def resume_arg(value: Any, *, auto_resume: bool, find: Callable[[], str | None], dir: str | None, ckpt: Any,
               local_tier_dir: str | os.PathLike[str] | None) -> Any:
    """What ``train(resume_from_checkpoint=value)`` resumes from under btckpt: ``True`` and (``auto_resume``)
    None: this run's newest checkpoint (``find()``, the callback's :func:`resume_checkpoint`); ``False`` (or
    None without ``auto_resume``): a fresh start, refused in a ``dir`` that holds checkpoints (its saves would
    take their names; README "Run identity"); a path: that folder (from elsewhere: refused when the own dir
    holds only another run's checkpoints). ``ckpt``: the callback's Checkpointer (None: not made yet)."""
    if value is True:  # HF would look in output_dir only; look where btckpt saves
        found = find()
        if found is None:
            raise ValueError("resume_from_checkpoint=True, but there is no complete checkpoint in "
                             f"{resolve_dir(dir)} or the load dir")
        return found
    if value is None and auto_resume:
        found = find()
        if found is not None:
            log.warning("btckpt: resuming from %s", found)
        return found
    if value is None or value is False:
        refuse_fresh_start(dir, local_tier_dir=local_tier_dir)
    elif ckpt is not None and Path(value).resolve().parent != ckpt.root.resolve():
        # a warm start from a folder elsewhere: the own dir must not hold only another run's checkpoints
        refuse_other_runs(dir, run=ckpt.config.run_id, local_tier_dir=local_tier_dir)
    return value


def finished_run(trainer: Trainer, folder: str, *, load_model: Callable[[str], Any],
                 load_best: Callable[[], Any]) -> TrainOutput | None:
    """When ``folder`` (a btckpt checkpoint) is this run's last step (``global_step >= max_steps``), a re-run
    has nothing to train: its weights (``load_model(path)``; with ``load_best_model_at_end``, the best model,
    ``load_best()``) are loaded and the TrainOutput returned without a step (the plain Trainer would train
    one step past ``max_steps``). None otherwise."""
    tr = trainer
    info = btckpt_info(folder)
    if info is None or tr.args.max_steps <= 0 or "trainer_state.json" not in (info.manifest.files if
                                                                              info.manifest else {}):
        return None
    state = TrainerState.load_from_json(str(info.path / "trainer_state.json"))
    if state.global_step < tr.args.max_steps:
        return None
    log.warning("btckpt: %s is step %d, and max_steps=%d: this run is finished, nothing to train; its "
                "weights are loaded (raise max_steps to train on)", info.path, state.global_step,
                tr.args.max_steps)
    load_model(str(info.path))
    tr.state = state
    find_best(tr, str(info.path))
    if tr.args.load_best_model_at_end and state.best_model_checkpoint is not None:
        load_best()
    loss = next((float(e["train_loss"]) for e in reversed(state.log_history) if "train_loss" in e), 0.0)
    return TrainOutput(state.global_step, loss, {})


def find_best(trainer: Trainer | None, resumed: str | None) -> None:
    """After the Trainer's state came back from ``resumed``: a best-model record naming a folder that is not
    here (the previous job's path, for a warm start from the load dir; transformers 5 drops such a record,
    4.x keeps the dead path) names the best step's folder beside ``resumed`` when it is there, else it warns
    (``load_best_model_at_end`` would end with the last model)."""
    tr = trainer
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


def pin_resumed_epoch(loader: Any) -> None:
    """transformers 4.x, first epoch of a resumed run (``on_epoch_begin``): keep the sampler on this epoch's order.

    4.x calls ``set_epoch(epoch)`` on the train loader, then ``skip_first_batches`` wraps it in a new
    accelerate ``DataLoaderShard`` whose first iteration calls ``set_epoch(0)`` on the same sampler; a
    resume inside epoch >= 1 would then replay epoch 0's shuffle order (the Trainer's own checkpoints have
    this bug; 5.x calls ``set_epoch`` after the wrap). The sampler's epoch, set just before this event,
    is pinned for that one call.
    """
    if int(transformers.__version__.split(".")[0]) >= 5:
        return
    for sampler in _epoch_samplers(loader):
        _pin_next_set_epoch(sampler, sampler.epoch)


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
