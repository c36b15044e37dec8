"""The Trainer's private API the callback relies on, checked when it attaches, and finding the Trainer.

``REPLACED`` names the private Trainer methods the callback replaces on the instance (its ``_p_*`` methods,
:mod:`btckpt.hf.patches`); :func:`check_trainer_api` checks each one's presence and leading parameters when
the callback attaches, so an unsupported transformers release fails at once with :class:`ConfigError`, not
mid-training. :func:`refuse_push_to_hub` refuses what the replaced saving would silently drop.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import transformers
from transformers import Trainer, trainer_utils
from transformers.trainer_callback import TrainerState

from ..errors import ConfigError

__all__ = ["REPLACED", "SUPPORTED_TRANSFORMERS", "check_trainer_api", "refuse_push_to_hub", "find_trainer",
           "patch_name"]

# The private Trainer methods replaced on the instance -> the leading parameters the replacement relies on
# (None: arguments are passed through unchanged, only the method's presence matters). One table, checked by
# check_trainer_api when the callback attaches.
REPLACED: dict[str, tuple[str, ...] | None] = {
    "train": ("resume_from_checkpoint",),
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_rng_state": ("checkpoint",),
    "_load_best_model": (),
    "_maybe_log_save_evaluate": None,
}
SUPPORTED_TRANSFORMERS = "4.57 - 5.x"


def patch_name(name: str) -> str:
    """The callback's method that replaces ``Trainer.<name>``: ``_p_<name>`` (``_p_train``, ``_p_save_checkpoint``)."""
    return f"_p{name}" if name.startswith("_") else f"_p_{name}"


def check_trainer_api(trainer: Trainer) -> None:
    """Raise ConfigError naming the transformers version and the method when ``REPLACED`` does not fit."""
    problems = []
    for name, params in REPLACED.items():
        method = getattr(trainer, name, None)
        if not callable(method):
            problems.append(f"Trainer.{name} does not exist")
            continue
        if params is None:
            continue
        sig = inspect.signature(method)
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


def refuse_push_to_hub(args: Any) -> None:
    """ConfigError for ``push_to_hub=True``: the Trainer pushes from the checkpoint saving this callback
    replaces, so with it nothing would reach the Hub, silently."""
    if getattr(args, "push_to_hub", False):
        raise ConfigError(
            "TrainingArguments(push_to_hub=True) with btckpt.hf.CheckpointCallback: the Trainer pushes to the Hub "
            "from its own checkpoint saving (hub_strategy), which the callback replaces, so nothing would be "
            "pushed. Set push_to_hub=False and push the final model yourself (trainer.push_to_hub() after "
            "train(), or upload a servable checkpoint-<N> folder), or remove the callback to keep the "
            "Trainer's own checkpointing and Hub pushes")


def find_trainer() -> Trainer | None:
    """The Trainer whose method is on the caller's stack (the callback API hands callbacks no Trainer)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back  # type: ignore[assignment]
    return None
