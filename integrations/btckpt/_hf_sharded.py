"""The HF Trainer under FSDP2 (accelerate ``fsdp_version: 2``): which parallel setups the callback takes,
and loading sharded groups at the Trainer's resume points."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .discovery import CheckpointInfo
from .errors import ConfigError
from .loading import read_checkpoint

__all__ = ["refuse_unsupported", "load_groups"]


def refuse_unsupported(trainer: Any) -> None:
    """Raise :class:`ConfigError` for DeepSpeed and FSDP1 (FSDP2 and everything replicated are supported)."""
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


def load_groups(info: CheckpointInfo, state: MutableMapping[str, Any], names: list[str], *, rank: int) -> None:
    """Load the groups ``names`` of checkpoint ``info`` into ``state`` in place, all read and verified first.

    Plain or sharded, on either side: an FSDP2 checkpoint (per-rank shards) loads into an FSDP2 model of
    any world size or into a plain one, and a replicated (single-process/DDP) checkpoint into an FSDP2
    model, through DCP's planner (every rank calls this; see :mod:`btckpt.dcp_bridge`).
    """
    read_checkpoint(info, state, names, rank=rank, want_rng=False, strict=True)()
