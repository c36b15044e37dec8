"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, flat parameters) in btckpt's sharded format.

An FSDP1 model's parameters are flat (``FlatParameter``, or with ``use_orig_params=True`` 1-D views of it),
so nothing in it is a DTensor. Its *sharded state dict* is: ``get_model_state_dict`` /
``get_optimizer_state_dict`` (``torch.distributed.checkpoint.state_dict``, which enter FSDP1's
``SHARDED_STATE_DICT`` mode) give FQN keys and, for every parameter and optimizer moment, a
``ShardedTensor`` holding this rank's row block (FSDP1 shards dim 0 as ``torch.chunk`` does; without a
``device_mesh`` FSDP1 never gives DTensors, so ``ShardedStateDictConfig(_use_dtensor=True)`` is not an option
there). Each local shard becomes one chunk record (offsets, sizes) exactly as a DTensor's does, so the save,
the manifest (chunks tiling every shape, checked) and the commit are FSDP2's (:mod:`btckpt.distributed.shards`);
a restore goes through DCP's planner (:mod:`btckpt.restore.dcp`), which loads ShardedTensor targets as it does
DTensor ones: an FSDP1 checkpoint loads into FSDP1 on any world size, into FSDP2, or into one plain process,
and an FSDP2 / DDP checkpoint into FSDP1.

``NO_SHARD`` (what FSDP1 turns every strategy into on one rank) has no sharded state dict: such a model is
taken and loaded as a full state dict (:func:`state_dict_options`), plain tensors that rank 0 writes, as for a
DDP model. Refused (:class:`~btckpt.errors.ConfigError`, see :func:`check_supported`): the hybrid strategies
(replicas across nodes: not tested), and a model mixing ``NO_SHARD`` units with sharded ones.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, UnsupportedValue

__all__ = ["is_fsdp1", "is_sharded_tensor", "fsdp1_groups", "check_supported", "state_dict_options",
           "sharded_tensor_chunk", "empty_like_sharded"]

_UNSUPPORTED = {
    "HYBRID_SHARD": "hybrid sharding (replicas across nodes) is not supported by btckpt's FSDP1 path: use "
                    "FULL_SHARD / SHARD_GRAD_OP, or FSDP2 (fully_shard) on a 2-D device mesh",
    "_HYBRID_SHARD_ZERO2": "hybrid sharding (replicas across nodes) is not supported by btckpt's FSDP1 path: use "
                           "FULL_SHARD / SHARD_GRAD_OP, or FSDP2 (fully_shard) on a 2-D device mesh",
}


def _fsdp_class() -> Any:
    # Looked up, not imported (as is_dtensor does): until something has imported FSDP1, no module is one.
    mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    return getattr(mod, "FullyShardedDataParallel", None)


def is_fsdp1(obj: Any) -> bool:
    """True for a module that is or holds an FSDP1 ``FullyShardedDataParallel`` instance."""
    cls = _fsdp_class()
    return cls is not None and isinstance(obj, torch.nn.Module) and any(isinstance(m, cls) for m in obj.modules())


def is_sharded_tensor(t: Any) -> bool:
    """True for a ``torch.distributed._shard.sharded_tensor.ShardedTensor`` (FSDP1's sharded state dict leaves)."""
    mod = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return mod is not None and isinstance(t, mod.ShardedTensor)


def _strategies(module: torch.nn.Module) -> set[str]:
    cls = _fsdp_class()
    return {getattr(m.sharding_strategy, "name", str(m.sharding_strategy))
            for m in module.modules() if cls is not None and isinstance(m, cls)}


def check_supported(module: torch.nn.Module) -> None:
    """ConfigError for an FSDP1 module whose sharding strategy btckpt does not save (module doc)."""
    names = _strategies(module)
    for name in sorted(names):
        if name in _UNSUPPORTED:
            raise ConfigError(f"FSDP1 sharding_strategy={name} cannot be checkpointed by btckpt: {_UNSUPPORTED[name]}")
    if "NO_SHARD" in names and len(names) > 1:
        raise ConfigError(f"FSDP1 model mixes sharding strategies {sorted(names)}: btckpt saves a model whose FSDP "
                          "units are all sharded (FULL_SHARD / SHARD_GRAD_OP) or all NO_SHARD; give every unit the "
                          "root's sharding_strategy")


def state_dict_options(module: Any, *, strict: bool = True) -> Any:
    """The ``StateDictOptions`` for ``get/set_model_state_dict`` / ``get/set_optimizer_state_dict`` of
    ``module``: a full state dict on every rank for an FSDP1 model under ``NO_SHARD`` (it has no sharded one),
    else the default (sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = is_fsdp1(module) and _strategies(module) == {"NO_SHARD"}
    return StateDictOptions(full_state_dict=full, cpu_offload=False, strict=strict)


def fsdp1_groups(state: Mapping[str, Any]) -> dict[str, str]:
    """The groups of ``state`` that are FSDP1 models (``"model"``) or optimizers over an FSDP1 model's
    parameters (``"optimizer"``); refuses unsupported strategies (:func:`check_supported`)."""
    if _fsdp_class() is None:
        return {}
    models = {name: obj for name, obj in state.items() if is_fsdp1(obj)}
    if not models:
        return {}
    out: dict[str, str] = {}
    ids: set[int] = set()
    for name, m in models.items():
        check_supported(m)
        out[name] = "model"
        ids |= {id(p) for p in m.parameters()}
    for name, obj in state.items():
        if isinstance(obj, torch.optim.Optimizer) and any(id(p) in ids for g in obj.param_groups for p in g["params"]):
            out[name] = "optimizer"
    return out


def sharded_tensor_chunk(path: str, t: Any) -> tuple[torch.Tensor, list[int], list[int], bool]:
    """(local tensor, global offsets, sizes, owned) of this rank's piece of a ShardedTensor: FSDP1 gives each
    rank one row block, or none when the tensor has fewer rows than there are ranks."""
    shards = t.local_shards()
    if len(shards) > 1:
        raise UnsupportedValue(f"tensor {path!r} is a ShardedTensor with {len(shards)} local shards on this rank; "
                               "btckpt saves one shard per rank (FSDP1's layout)")
    if not shards:
        return torch.empty(0, dtype=t.dtype), [0] * t.dim(), [0] * t.dim(), False
    s = shards[0]
    local = s.tensor
    return local, list(s.metadata.shard_offsets), list(s.metadata.shard_sizes), local.numel() > 0


def empty_like_sharded(t: Any) -> Any:
    """A fresh ShardedTensor laid out as ``t`` (same global metadata and local shards, uninitialised memory):
    the destination DCP's planner reads a resharded load into."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    shards = [Shard(torch.empty_like(s.tensor), copy.deepcopy(s.metadata)) for s in t.local_shards()]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, copy.deepcopy(t.metadata()), process_group=t._process_group)
