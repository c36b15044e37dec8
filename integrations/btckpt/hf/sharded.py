"""The HF Trainer under FSDP2 (accelerate ``fsdp_version: 2``) and FSDP1 (``fsdp_version: 1``): which parallel
setups the callback takes.

Saving needs nothing special: under FSDP2 ``trainer.model`` is the ``fully_shard``-ed model (DTensor
parameters) and its optimizer holds DTensor state, so the Checkpointer's sharded path (:mod:`btckpt.distributed.shards`)
has every rank write its own shards (``model-rank<R>.safetensors``, ``optimizer-rank<R>.safetensors``) with
no gather; scheduler, RNG (per rank) and ``trainer_state.json`` are saved as in DDP, and the node leader
writes ``config.json`` & co. ``Checkpointer(consolidate=True)`` (``CheckpointCallback(consolidate=True)``)
adds a servable ``<dir>/consolidated/checkpoint-<step>/``. Resuming goes through DCP's planner
(:func:`btckpt.adapters.load_groups`), so any world size loads it: FSDP2 on N ranks, or one process without FSDP.

FSDP1 (``fsdp="full_shard"`` / ``"shard_grad_op"``, ``fsdp_config={"version": 1, ...}``): ``trainer.model`` is the
root ``FullyShardedDataParallel``; its sharded state dict (ShardedTensor row blocks) is saved in the same
per-rank files, manifest and commit as FSDP2's (:mod:`btckpt.distributed.fsdp1`), and resumes, reshards and
consolidates the same way (``no_shard``, which FSDP1 uses on one rank, as a full state dict). The hybrid
strategies are refused (ConfigError) when the callback attaches.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["refuse_unsupported"]


def refuse_unsupported(trainer: Any, *, peft: bool) -> None:
    """Raise :class:`ConfigError` for FSDP1's hybrid strategies, PEFT under FSDP or DeepSpeed, and the DeepSpeed
    setups btckpt does not save (FSDP2, FSDP1 ``full_shard`` / ``shard_grad_op`` / ``no_shard``, DeepSpeed ZeRO
    1-3 and replicated runs are supported); ``peft``: the Trainer's model is a PEFT model."""
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
            _refuse_fsdp1_strategy(plugin)
        if peft:
            raise ConfigError(
                "btckpt.hf.CheckpointCallback does not support PEFT adapters under FSDP yet (the adapter state "
                "is sharded); remove the callback to use the Trainer's own checkpointing, or train the adapter "
                "without FSDP (single process or DDP), where btckpt saves adapter_model.safetensors")



def _refuse_fsdp1_strategy(plugin: Any) -> None:
    strategy = getattr(plugin, "sharding_strategy", None) or getattr(plugin, "reshard_after_forward", None)
    name = getattr(strategy, "name", str(strategy))
    if name in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        raise ConfigError(
            f"btckpt.hf.CheckpointCallback does not support FSDP1 hybrid sharding (sharding_strategy {name}): use "
            "fsdp='full_shard' or 'shard_grad_op', or FSDP2 (fsdp_config={'version': 2})")
