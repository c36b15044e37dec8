"""Lightning's sharded strategies with :class:`~btckpt.lightning.SafetensorsCheckpointIO`.

Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel applied in ``configure_model``),
``FSDPStrategy`` and ``DeepSpeedStrategy`` override ``save_checkpoint`` *and* ``load_checkpoint``: a sharded
save goes straight to DCP plus a pickled ``meta.pt`` (the plugin is never called), a full-state save
reaches the plugin on rank 0 only, and no load ever calls the plugin (resuming would ``torch.load`` the
plugin's link file). So:

- :class:`ModelParallelStrategy` (Lightning's, same arguments) hands the plugin the live LightningModule and
  optimizer on every rank. The core's sharded path (:mod:`btckpt.distributed.shards`) then writes each rank's own
  shards (``model-rank0000N.safetensors``, ``optimizer-rank0000N...``) and each rank's RNG, and rank 0 the
  rest of Lightning's dict (loops, callbacks, schedulers), in one commit; rank 0 writes the names
  (``last.ckpt`` link files). Loading reads and verifies the folder on every rank, then loads the model and
  optimizer in place through DCP's planner: any world size or mesh (2 ranks -> 1 reshards).
- :class:`FSDPStrategy` (Lightning's FSDP1 ``FSDPStrategy``, same arguments) does the same with the FSDP1
  root (``strategy.model``): each rank writes its own row blocks of FSDP1's sharded state dict
  (:mod:`btckpt.distributed.fsdp1`) in the same files and commit, and loading reshards through DCP's planner
  (FSDP1 on any world size, or ``ModelParallelStrategy``'s FSDP2). Lightning's own sharded folder (DCP
  ``.distcp`` files + a pickled ``meta.pt``) and its full ``.ckpt`` pickle are never written.
- :func:`check_strategy` refuses Lightning's own ``ModelParallelStrategy`` / ``FSDPStrategy`` /
  ``DeepSpeedStrategy`` with the plugin (ConfigError naming the strategy and the fix), rather than letting
  checkpoints bypass the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDP
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallel

from ..adapters import (
    CheckpointInfo,
    holds_live_shards,
    is_dtensor,
    model_config_files,
    read_groups,
    sharded_group_names,
)
from ..errors import ConfigError, StateMismatch
from .state import safe_for_background_copy

if TYPE_CHECKING:
    from .plugin import SafetensorsCheckpointIO
    from .servable import HFLayout

__all__ = ["ModelParallelStrategy", "FSDPStrategy", "ShardedCheckpointIO", "check_strategy", "is_live",
           "refuse_rank0_shards", "saved_sharded", "read_in_place", "hf_model_group"]


class ShardedCheckpointIO:
    """Base of btckpt's plugin (:class:`btckpt.lightning.SafetensorsCheckpointIO`), by which the strategies
    here recognise it without importing :mod:`btckpt.lightning` (which imports this module)."""


def _plugin(strategy: Any) -> SafetensorsCheckpointIO | None:
    """The strategy's CheckpointIO when it is btckpt's plugin."""
    io = strategy.checkpoint_io
    return cast("SafetensorsCheckpointIO", io) if isinstance(io, ShardedCheckpointIO) else None


class _ThroughPlugin:
    """The save and load of both strategies below, on every rank, when their ``CheckpointIO`` is btckpt's
    plugin (else the Lightning strategy's own, next in the MRO): the live model (:meth:`_live_model`) and the
    one optimizer go to the plugin in place of their state dicts, and load in place (any world size)."""

    lightning_module: Any  # the Lightning strategy's (annotations only: nothing here shadows them)
    optimizers: Any
    broadcast: Callable[..., Any]

    def _live_model(self) -> Any:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """On every rank: save ``checkpoint`` with the live model and optimizer in place of their state dicts."""
        io = _plugin(self)
        if io is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc,no-any-return]
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            "SafetensorsCheckpointIO")
        module, model = self.lightning_module, self._live_model()
        assert module is not None and model is not None
        path = self.broadcast(str(filepath))  # rank 0's name, on every rank
        checkpoint["state_dict"] = model
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = _one_optimizer(self)
        io.wait()  # every rank sees the same committed folders (a commit ends with a barrier on all ranks)
        io.save_checkpoint(checkpoint, path)
        if not safe_for_background_copy(module.trainer):
            io.fence()  # e.g. epoch end: callbacks may write parameters before the next optimizer.step()
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """On every rank: load the model (and optimizer, when fitting) in place; return the rest of the dict."""
        io = _plugin(self)
        if io is None:
            return super().load_checkpoint(checkpoint_path, weights_only)  # type: ignore[misc,no-any-return]
        module, model = self.lightning_module, self._live_model()
        assert module is not None and model is not None
        into: dict[str, Any] = {"model": model}
        if self.optimizers:
            into["optimizer"] = _one_optimizer(self)
        path = self.broadcast(str(checkpoint_path))
        return io.load_checkpoint(path, into=into, strict=module.strict_loading)


class ModelParallelStrategy(_ThroughPlugin, _LightningModelParallel):
    """Lightning's ``ModelParallelStrategy`` (same arguments) whose checkpoints go through
    :class:`~btckpt.lightning.SafetensorsCheckpointIO`: every rank writes its own shards, resume reshards to
    any world size (module doc). With another ``CheckpointIO`` it behaves exactly as Lightning's."""

    def _live_model(self) -> Any:
        return self.lightning_module


class FSDPStrategy(_ThroughPlugin, _LightningFSDP):
    """Lightning's FSDP1 ``FSDPStrategy`` (same arguments) whose checkpoints go through
    :class:`~btckpt.lightning.SafetensorsCheckpointIO`: every rank writes its own shards of the FSDP1 root's
    sharded state dict, resume reshards to any world size (module doc). With another ``CheckpointIO`` it
    behaves exactly as Lightning's (``state_dict_type`` applies only then).

    With the plugin, the model and optimizer entries of the dict Lightning builds before a save are left
    empty (``{}``: :meth:`lightning_module_state_dict`, :meth:`optimizer_state`); the save takes the live
    root and optimizer instead. Lightning's own would gather the full state dict (``state_dict_type="full"``)
    only to drop it, a collective per save (and, on CPU, a crash inside torch's FSDP1 full state dict)."""

    def _live_model(self) -> Any:
        return self.model  # FQN keys: the LightningModule's (FSDP1's wrapper names stripped)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """``{}`` with btckpt's plugin (the save takes the live model, see the class doc); else Lightning's."""
        return {} if _plugin(self) is not None else super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """``{}`` with btckpt's plugin (the save takes the live optimizer); else Lightning's."""
        return {} if _plugin(self) is not None else super().optimizer_state(optimizer)


def _one_optimizer(strategy: Any) -> Any:
    if len(strategy.optimizers) > 1:
        raise ConfigError(f"btckpt.lightning.{type(strategy).__name__} saves one optimizer; configure_optimizers "
                          f"returned {len(strategy.optimizers)} (combine their parameter groups into one optimizer)")
    return strategy.optimizers[0]


def check_strategy(strategy: Any) -> None:
    """Refuse (ConfigError) a strategy that would save or load around the plugin (module doc)."""
    if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)) or _plugin(strategy) is None:
        return
    name = type(strategy).__name__
    if isinstance(strategy, _LightningModelParallel):
        raise ConfigError(f"{name} saves and loads checkpoints itself (DCP + a pickled meta.pt), never through "
                          "SafetensorsCheckpointIO: use btckpt.lightning.ModelParallelStrategy (same arguments), "
                          "which hands every rank's shards to the plugin")
    if isinstance(strategy, _LightningFSDP):
        raise ConfigError(f"{name} (FSDP1) saves and loads checkpoints itself (DCP + a pickled meta.pt, or a "
                          "full pickle), never through SafetensorsCheckpointIO: use btckpt.lightning.FSDPStrategy "
                          "(same arguments), which hands every rank's shards to the plugin")
    if isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(f"{name} saves and loads checkpoints through DeepSpeed, never through "
                          "SafetensorsCheckpointIO, and btckpt has no Lightning DeepSpeed path yet (Lightning runs "
                          "DeepSpeedStrategy on CUDA only, where it was not built or tested): drop the plugin to "
                          "keep DeepSpeed's own checkpoints, or train with the HF Trainer, whose DeepSpeed ZeRO 1-3 "
                          "btckpt saves (btckpt.hf.CheckpointCallback)")


def is_live(groups: Mapping[str, Any]) -> bool:
    """True when ``groups`` hold a live model or optimizer with DTensors: a save every rank takes part in."""
    return holds_live_shards(groups)


def _dtensor_at(value: Any, path: str) -> str | None:
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return path if is_dtensor(value) else None
    for k, v in items:
        found = _dtensor_at(v, f"{path}.{k}")
        if found is not None:
            return found
    return None


def refuse_rank0_shards(groups: Mapping[str, Any], keys: Mapping[str, str]) -> None:
    """ConfigError when a dict handed to the plugin by one rank holds DTensors: it has that rank's shards
    only, so saving it would silently lose every other rank's part."""
    for name in ("model", "optimizer"):
        found = _dtensor_at(groups.get(name), keys.get(name, name))
        if found is not None:
            raise ConfigError(f"Lightning checkpoint entry {found!r} is a DTensor (one rank's shard): the strategy "
                              "hands SafetensorsCheckpointIO sharded state from rank 0 only, which would lose the "
                              "other ranks' shards; use btckpt.lightning.ModelParallelStrategy (FSDP2 / tensor "
                              "parallel), which saves every rank's shards")


def hf_model_group(layout: HFLayout, groups: dict[str, Any], meta: dict[str, Any]) -> dict[str, bytes] | None:
    """A sharded LightningModule whose whole state lives in one transformers model (``self.model``): save that
    model as the ``model`` group (HF keys) with its ``config.json``, so ``btckpt consolidate`` turns the
    checkpoint into a ``from_pretrained`` folder. Returns the config files (None: not such a module)."""
    module, hit = groups.get("model"), layout.find()
    if hit is None or not isinstance(module, torch.nn.Module):
        return None
    attr, hf = hit
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    if any(not n.startswith(attr + ".") for n in names):
        return None  # state outside the transformers model: keep the LightningModule's keys
    groups["model"] = hf
    meta["hf_module"] = attr
    return model_config_files(hf)


def saved_sharded(info: CheckpointInfo) -> set[str]:
    """The groups of a checkpoint that were saved sharded (per-rank files)."""
    return sharded_group_names(info)


def read_in_place(info: CheckpointInfo, into: MutableMapping[str, Any], *, rank: int,
                  strict: bool) -> Callable[[], None]:
    """Read and verify the model (and optimizer) of ``into`` from ``info`` (a collective: every rank calls
    it); return the function that loads them in place. A plain model group (e.g. saved under DDP) reshards
    too; an optimizer saved whole (a list of Lightning optimizer states) cannot become a sharded one."""
    sharded = saved_sharded(info)
    where = Path(info.path)
    if "optimizer" in into and "optimizer" not in sharded:
        if info.manifest is not None and "optimizer" not in info.manifest.state:
            raise StateMismatch(f"{where}: the checkpoint holds no optimizer state (saved weights-only?); "
                                "fit(ckpt_path=...) needs a training checkpoint")
        raise StateMismatch(f"{where}: the optimizer state was not saved sharded (saved by another strategy, "
                            "e.g. ddp); resume with that strategy, or load the weights only")
    meta = info.manifest.meta.get("lightning") if info.manifest is not None else None
    attr = meta.get("hf_module") if isinstance(meta, dict) else None
    if isinstance(attr, str):  # saved as the transformers model inside the LightningModule (hf_model_group)
        into = dict(into, model=into["model"].get_submodule(attr))
    return read_groups(info, into, list(into), rank=rank, strict=strict)
