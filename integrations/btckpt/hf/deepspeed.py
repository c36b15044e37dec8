"""The HF Trainer under DeepSpeed ZeRO (``TrainingArguments(deepspeed={...})``, stages 1-3).

Saving: every rank saves its own ZeRO partition (:mod:`btckpt.distributed.zero`: the model weights, the fp32
master weights and the optimizer moments, as chunks of each named parameter, in the FSDP2 sharded format),
the scheduler and RNG as in DDP, the Trainer's files from the node leader; DeepSpeed's own
``save_checkpoint`` (``global_step<N>/*.pt`` pickles) never runs. ``consolidate=True`` adds the servable
``<dir>/consolidated/checkpoint-<step>/`` (no ``zero_to_fp32.py``).

Resuming: the Trainer calls ``transformers.trainer.deepspeed_load_checkpoint`` after the engine is built;
that name is wrapped (once per process, :func:`install_load_hook`) so that a btckpt folder loads through
:func:`btckpt.adapters.load_zero_state` into the live engine (any stage, any world size: each rank fills
its fragments from the saved full tensors), and anything else goes to DeepSpeed as before. A plain model
(one process, no DeepSpeed) or an FSDP2 model restores the same folder through DCP's planner.

Refused (:class:`ConfigError`): ZeRO-Infinity NVMe offload (``offload_optimizer``/``offload_param`` with
``device: nvme``), frozen parameters.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from ..adapters import (
    CheckpointInfo,
    ZeroState,
    load_zero_state,
    unwrap_model,
    zero_optimizer,
    zero_save_groups,
    zero_stage,
)
from ..errors import ConfigError

__all__ = ["refuse_unsupported_zero", "zero_groups", "load_engine", "install_load_hook", "COUNTERS"]

log = logging.getLogger("btckpt")

COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def refuse_unsupported_zero(trainer: Any) -> None:
    """ConfigError for the DeepSpeed setups btckpt does not save (named, with the fix)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    cfg = getattr(plugin, "deepspeed_config", None) or {}
    zero = cfg.get("zero_optimization", {}) if isinstance(cfg, dict) else {}
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device") if isinstance(zero.get(key), dict) else None
        if dev == "nvme":
            raise ConfigError(f"btckpt.hf.CheckpointCallback does not support DeepSpeed ZeRO-Infinity NVMe offload "
                              f"(zero_optimization.{key}.device='nvme'): the partitions live in swap files. Use "
                              "device 'cpu' or 'none', or remove the callback to use DeepSpeed's own checkpoints")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (1, 2, 3):
        raise ConfigError(f"btckpt.hf.CheckpointCallback supports DeepSpeed ZeRO stages 1-3 (zero_optimization.stage="
                          f"{stage!r} is not one): set stage 1, 2 or 3, or remove the callback to use DeepSpeed's "
                          "own checkpoints")


def _zero_state(trainer: Any) -> ZeroState:
    zo = zero_optimizer(trainer.optimizer) or zero_optimizer(getattr(trainer.model_wrapped, "optimizer", None))
    if zo is None:
        raise ConfigError("btckpt.hf.CheckpointCallback: the DeepSpeed engine has no ZeRO optimizer (is "
                          "zero_optimization.stage set, and an optimizer configured?); set zero_optimization.stage "
                          "1-3, or remove the callback to use DeepSpeed's own checkpoints")
    engine = trainer.model_wrapped
    counters = {k: int(getattr(engine, k)) for k in COUNTERS if isinstance(getattr(engine, k, None), int)}
    return ZeroState(unwrap_model(trainer.model), zo, counters)


def zero_groups(trainer: Any) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """(state groups, optimizers to gate, manifest meta) for a save of ``trainer`` under ZeRO."""
    groups, optimizers, meta = zero_save_groups(_zero_state(trainer))
    if trainer.lr_scheduler is not None:
        groups["scheduler"] = trainer.lr_scheduler
    return groups, optimizers, meta


def load_engine(trainer: Any, info: CheckpointInfo) -> None:
    """Load model, master weights, optimizer state and the engine's counters from ``info`` into ``trainer``'s
    live DeepSpeed engine (every rank)."""
    assert info.manifest is not None
    zs = _zero_state(trainer)
    data = load_zero_state(zs, info)
    engine = trainer.model_wrapped
    for k, v in (data.get("counters") or {}).items():
        if k in COUNTERS and isinstance(v, int) and hasattr(engine, k):
            setattr(engine, k, v)
    log.info("btckpt: loaded the ZeRO-%d engine state from %s", zero_stage(zs.optimizer), info.path)


_HOOK: dict[str, Any] = {}


def install_load_hook(find: Any) -> None:
    """Wrap ``transformers.trainer.deepspeed_load_checkpoint`` once: ``find(engine, path)`` (a bound method, held
    weakly: a finished callback drops out) returns the function that loads ``path`` into ``engine`` (a btckpt
    folder of a Trainer with a btckpt callback), else None and the original runs."""
    import transformers.trainer as tt

    original = getattr(tt, "deepspeed_load_checkpoint", None)
    if original is None:
        raise ConfigError("transformers.trainer.deepspeed_load_checkpoint does not exist in this transformers "
                          "release; btckpt cannot resume DeepSpeed runs on it. Install a supported transformers "
                          "(4.57 - 5.x), or remove the callback to use DeepSpeed's own checkpoints")
    finders = _HOOK.setdefault("finders", [])
    finders[:] = [f for f in finders if f() is not None] + [weakref.WeakMethod(find)]
    if getattr(original, "__btckpt__", False):
        return

    def deepspeed_load_checkpoint(engine: Any, checkpoint_path: str, *args: Any, **kwargs: Any) -> Any:
        for ref in list(_HOOK.get("finders", [])):
            f = ref()
            load = f(engine, checkpoint_path) if f is not None else None
            if load is not None:
                return load()
        return original(engine, checkpoint_path, *args, **kwargs)

    deepspeed_load_checkpoint.__btckpt__ = True  # type: ignore[attr-defined]
    setattr(tt, "deepspeed_load_checkpoint", deepspeed_load_checkpoint)  # noqa: B010 (typed differently)
