"""What one save of a Trainer step holds: the state groups, the Trainer's files, the manifest's meta, the
callback states recorded in ``trainer_state.json`` and the best-model record (as HF's ``_save_checkpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer, trainer_utils
from transformers.trainer_callback import ExportableState

from ..adapters import files_written_by, model_config_files, unwrap_model

__all__ = ["is_peft", "state_groups", "trainer_files", "processor_files", "save_meta", "record_callback_states",
           "record_best"]


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")


def _is_deepspeed(trainer: Trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def state_groups(trainer: Trainer) -> dict[str, Any]:
    """The groups saved for ``trainer``: the model (or a PEFT model's adapter state), and unless
    ``save_only_model`` the optimizer, scheduler and scaler (under DeepSpeed: the ZeRO partition's groups)."""
    tr = trainer
    if _is_deepspeed(tr):
        from .deepspeed import zero_groups

        return zero_groups(tr)[0]
    model = unwrap_model(tr.model)
    groups: dict[str, Any] = {}
    if is_peft(model):
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


def processor_files(trainer: Trainer) -> dict[str, bytes]:
    """The tokenizer/processor files (what ``processing_class.save_pretrained`` writes; the same every save)."""
    save = getattr(getattr(trainer, "processing_class", None), "save_pretrained", None)
    return files_written_by(save) if callable(save) else {}


def trainer_files(trainer: Trainer, processor: Mapping[str, bytes]) -> dict[str, bytes]:
    """config.json, generation_config.json (a PEFT model: its adapter_config.json), the ``processor`` files
    (:func:`processor_files`), trainer_state.json, training_args.json."""
    tr = trainer
    model = unwrap_model(tr.model)
    if is_peft(model):
        out = files_written_by(model.peft_config[model.active_adapter].save_pretrained)
    else:
        out = model_config_files(model)
    out.update(files_written_by(lambda d: tr.state.save_to_json(os.path.join(d, "trainer_state.json"))))
    out.update(processor)
    out["training_args.json"] = tr.args.to_json_string().encode()
    return out


def save_meta(trainer: Trainer) -> tuple[dict[str, Any], list[Any]]:
    """The manifest's meta of a save of ``trainer``, and the optimizers to pass the Checkpointer (ZeRO's)."""
    meta: dict[str, Any] = {"integration": "transformers", "transformers_version": transformers.__version__}
    optimizers: list[Any] = []
    if _is_deepspeed(trainer):
        from .deepspeed import zero_groups

        _, optimizers, zmeta = zero_groups(trainer)
        meta.update(zmeta)
    return meta, optimizers


def record_callback_states(trainer: Trainer) -> None:
    """The callbacks' (and the control's) exported state into ``trainer.state``, as HF's ``_save_checkpoint``."""
    stateful: Any = trainer.state.stateful_callbacks
    for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(stateful.get(name), list):
            stateful[name].append(cb.state())
        else:
            stateful[name] = cb.state()


def record_best(trainer: Trainer, ckpt: Any, *, step: int, saved: Collection[int],
                previous: Path | None) -> Path | None:
    """Before a durable save of ``step``: the best step's folder (when it is this step, a saved one or there)
    becomes ``state.best_model_checkpoint`` and is protected from retention in place of ``previous``.
    Returns the protected folder (``previous`` when nothing changed)."""
    tr = trainer
    best_step = tr.state.best_global_step
    strategies = (trainer_utils.SaveStrategy.STEPS, trainer_utils.SaveStrategy.EPOCH, trainer_utils.SaveStrategy.BEST)
    if tr.args.save_strategy not in strategies or not best_step:
        return previous
    best = ckpt.root / f"checkpoint-{best_step}"
    if not (best_step == step or best_step in saved or best.exists()):
        return previous
    tr.state.best_model_checkpoint = str(best)
    if previous is not None and previous != best:
        ckpt.unprotect(previous)
    ckpt.protect(best)
    return best
