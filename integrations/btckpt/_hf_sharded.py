"""The HF Trainer under FSDP2 (accelerate ``fsdp_version: 2``): which parallel setups the callback takes,
and loading sharded groups at the Trainer's resume points.

Saving needs nothing special: under FSDP2 ``trainer.model`` is the ``fully_shard``-ed model (DTensor
parameters) and its optimizer holds DTensor state, so the Checkpointer's sharded path (:mod:`btckpt.sharded`)
has every rank write its own shards (``model-rank<R>.safetensors``, ``optimizer-rank<R>.safetensors``) with
no gather; scheduler, RNG (per rank) and ``trainer_state.json`` are saved as in DDP, and the node leader
writes ``config.json`` & co. ``Checkpointer(consolidate=True)`` (``CheckpointCallback(consolidate=True)``)
adds a servable ``<dir>/consolidated/checkpoint-<step>/``. Resuming goes through DCP's planner
(:func:`load_groups`), so any world size loads it: FSDP2 on N ranks, or one process without FSDP.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .discovery import CheckpointInfo
from .errors import ConfigError
from .loading import read_checkpoint

__all__ = ["refuse_unsupported", "load_groups"]


def refuse_unsupported(trainer: Any, *, peft: bool) -> None:
    """Raise :class:`ConfigError` for DeepSpeed, FSDP1 and PEFT under FSDP (FSDP2 and replicated runs are
    supported); ``peft``: the Trainer's model is a PEFT model."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError(
            "btckpt.hf.CheckpointCallback does not support DeepSpeed: its engine owns the model and optimizer "
            "state. Remove the callback to use the Trainer's own checkpointing under DeepSpeed, or use FSDP2 "
            "(fsdp_config={'version': 2})")
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


def load_groups(info: CheckpointInfo, state: MutableMapping[str, Any], names: list[str], *, rank: int) -> None:
    """Load the groups ``names`` of checkpoint ``info`` into ``state`` in place, all read and verified first.

    Plain or sharded, on either side: an FSDP2 checkpoint (per-rank shards) loads into an FSDP2 model of
    any world size or into a plain one, and a replicated (single-process/DDP) checkpoint into an FSDP2
    model, through DCP's planner (every rank calls this; see :mod:`btckpt.dcp_bridge`).
    """
    read_checkpoint(info, state, names, rank=rank, want_rng=False, strict=True)()
