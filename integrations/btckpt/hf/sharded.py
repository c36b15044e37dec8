"""The HF Trainer under FSDP2 (accelerate ``fsdp_version: 2``): which parallel setups the callback takes.

Saving needs nothing special: under FSDP2 ``trainer.model`` is the ``fully_shard``-ed model (DTensor
parameters) and its optimizer holds DTensor state, so the Checkpointer's sharded path (:mod:`btckpt.distributed.shards`)
has every rank write its own shards (``model-rank<R>.safetensors``, ``optimizer-rank<R>.safetensors``) with
no gather; scheduler, RNG (per rank) and ``trainer_state.json`` are saved as in DDP, and the node leader
writes ``config.json`` & co. ``Checkpointer(consolidate=True)`` (``CheckpointCallback(consolidate=True)``)
adds a servable ``<dir>/consolidated/checkpoint-<step>/``. Resuming goes through DCP's planner
(:func:`btckpt.adapters.load_groups`), so any world size loads it: FSDP2 on N ranks, or one process without FSDP.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["refuse_unsupported"]


def refuse_unsupported(trainer: Any, *, peft: bool) -> None:
    """Raise :class:`ConfigError` for FSDP1, PEFT under FSDP or DeepSpeed, and the DeepSpeed setups btckpt does
    not save (FSDP2, DeepSpeed ZeRO 1-3 and replicated runs are supported); ``peft``: the Trainer's model is a
    PEFT model."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        from .deepspeed import refuse_unsupported_zero  # ZeRO 1-3 are supported: see btckpt.hf.deepspeed

        refuse_unsupported_zero(trainer)
        if peft:
            raise ConfigError(
                "btckpt.hf.CheckpointCallback does not support PEFT adapters under DeepSpeed yet (the adapter state "
                "is partitioned); remove the callback to use the Trainer's own checkpointing, or train the adapter "
                "without DeepSpeed (single process or DDP)")
        return
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ConfigError(
                "btckpt.hf.CheckpointCallback supports FSDP2 only (fsdp_config={'version': 2}, or accelerate's "
                "fsdp_version: 2); FSDP1's flat parameters are not saved. Switch to FSDP2, or remove the callback "
                "to use the Trainer's own checkpointing under FSDP1")
        if peft:
            raise ConfigError(
                "btckpt.hf.CheckpointCallback does not support PEFT adapters under FSDP yet (the adapter state "
                "is sharded); remove the callback to use the Trainer's own checkpointing, or train the adapter "
                "without FSDP (single process or DDP), where btckpt saves adapter_model.safetensors")

