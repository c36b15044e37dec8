"""Lightning's checkpoint dict written as btckpt groups (with the HF model folder form) and read back:
the data side of :class:`~btckpt.lightning.SafetensorsCheckpointIO`'s ``save_checkpoint`` / ``load_checkpoint``
(which folder, which names and what to remove are the plugin's). Nothing here pickles."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..adapters import CheckpointInfo, group_values, optimizer_state_for_loading
from ..errors import ConfigError, UnsupportedValue
from .servable import HFLayout, from_hf_keys
from .state import map_tree, name_bad_key, to_groups
from .strategies import hf_model_group, read_in_place, refuse_rank0_shards, saved_sharded

__all__ = ["save_groups", "read_dict"]


def save_groups(save: Callable[..., Any], step: int, checkpoint: dict[str, Any], *, layout: HFLayout,
                distributed: bool, peer_rng: Any, optimizers: list[torch.optim.Optimizer],
                **keywords: Any) -> None:
    """Lightning's dict as btckpt groups (+ the HF model folder form of ``layout``), saved by ``save`` (the
    Checkpointer's ``save`` or ``save_local``; ``peer_rng`` None: no other rank's RNG)."""
    groups, keys = to_groups(checkpoint)
    if not distributed:
        refuse_rank0_shards(groups, keys)
    meta: dict[str, Any] = {"keys": keys}
    files: dict[str, bytes] | None = None
    hf = layout.prepare(groups["model"]) if isinstance(groups.get("model"), dict) else None
    if hf is not None:
        groups["model"], files, meta["hf"] = hf
    elif distributed:
        files = hf_model_group(layout, groups, meta)
    try:
        save(step, groups, meta={"lightning": meta}, extra_files=files, peer_rng=peer_rng, optimizers=optimizers,
             **keywords)
    except UnsupportedValue as exc:
        raise name_bad_key(groups, keys, exc) from None


def read_dict(info: CheckpointInfo, *, into: dict[str, Any] | None, strict: bool, map_location: Any,
              rank: int) -> dict[str, Any]:
    """Lightning's dict from the complete checkpoint ``info`` (checksums verified); ``into`` (every rank, a
    sharded strategy): the live model and optimizer, loaded in place and left out of the dict."""
    folder = Path(info.path)
    meta = info.manifest.meta.get("lightning", {}) if info.manifest is not None else {}
    keys = meta.get("keys", {"model": "state_dict"}) if isinstance(meta, dict) else {}
    sharded = saved_sharded(info)
    if sharded and into is None:
        raise ConfigError(f"{folder} was saved sharded (per-rank files, by btckpt.lightning."
                          "ModelParallelStrategy or FSDPStrategy); load it with that strategy (any number of "
                          "ranks)")
    apply = read_in_place(info, into, rank=rank, strict=strict) if into else None
    elsewhere = sharded | set(into or ())  # loaded in place by read_in_place
    out = {keys.get(g, g): v for g, v in group_values(info, exclude=elsewhere).items()}
    if isinstance(meta, dict) and "hf" in meta and "state_dict" in out:
        out["state_dict"] = from_hf_keys(out["state_dict"], meta["hf"], where=str(folder))
    if map_location is not None and isinstance(map_location, (str, torch.device)):
        out = map_tree(out, torch.device(map_location))
    if isinstance(out.get("optimizer_states"), list):  # Lightning hands each to optimizer.load_state_dict
        out["optimizer_states"] = [optimizer_state_for_loading(s) if isinstance(s, Mapping) else s
                                   for s in out["optimizer_states"]]
    if apply is not None:
        apply()
    return out
