"""Restore sharded groups through torch.distributed.checkpoint (DCP): resharding N -> M ranks.

:class:`BtckptStorageReader` is a DCP ``StorageReader`` over a committed btckpt checkpoint: its metadata
lists every tensor of the requested groups with its global shape and saved chunks (from the manifest),
and ``read_data`` reads the safetensors files (checksums verified as read), narrows each chunk to the
slice DCP's ``DefaultLoadPlanner`` asks for, and hands it to the planner. DCP computes which saved
chunks overlap which local shards, so any saved sharding loads into any target sharding (FSDP2 with
another world size, DDP, or a plain single-process model). Plain (unsharded) btckpt groups are exposed
as one chunk each, so a DDP checkpoint also restores into an FSDP2 model.

Nothing is applied before every rank has read everything: :func:`read_sharded` loads into fresh
tensors shaped like the target; :func:`apply_sharded` then calls ``set_model_state_dict`` /
``set_optimizer_state_dict``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, StorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
from torch.futures import Future

from ..distributed.fsdp1 import empty_like_sharded, is_sharded_tensor, state_dict_options
from ..distributed.shards import META_KEY, group_state_dict, owning_module, sharded_groups
from ..errors import CheckpointError, CorruptCheckpoint, IncompleteCheckpoint, StateMismatch
from ..format.layout import ST_TO_DTYPE
from ..format.manifest import Manifest
from ..format.tree import decode_tree, encode_tree
from ..storage.discovery import CheckpointInfo
from .reader import NodeParts

__all__ = ["BtckptStorageReader", "tensor_refs", "read_sharded", "apply_sharded", "groups_to_reshard"]


def tensor_refs(tree: Any) -> list[dict[str, Any]]:
    """Every tensor reference of a manifest tree, sharded or plain, as a sharded-style record."""
    out: list[dict[str, Any]] = []

    def visit(x: Any) -> None:
        if isinstance(x, list):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            if set(x) == {"__tensor__"} and isinstance(x["__tensor__"], dict):
                out.append(x["__tensor__"])
            else:
                for v in x.values():
                    visit(v)

    visit(tree)
    return out


class BtckptStorageReader(StorageReader):
    """A DCP StorageReader over the groups ``groups`` of one committed btckpt checkpoint (see module doc)."""

    def __init__(self, folder: str | os.PathLike[str], manifest: Manifest, groups: list[str]) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.manifest = manifest
        self.groups = groups
        self._parts = NodeParts(self.folder, manifest)
        self._storage: dict[MetadataIndex, tuple[int, str, str, list[int], torch.dtype]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._parts = NodeParts(self.folder, self.manifest)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md: dict[str, Any] = {}
        storage: dict[MetadataIndex, tuple[int, str, str, list[int], torch.dtype]] = {}
        here = self.manifest.node_rank
        for group in self.groups:
            for ref in tensor_refs(self.manifest.state[group]):
                if "sharded" in ref:
                    s = ref["sharded"]
                    fqn, shape, dtype, chunks = f"{group}/{s['key']}", s["shape"], s["dtype"], s["chunks"]
                else:  # a plain btckpt tensor: one whole chunk in this folder (shape from the file header)
                    t = self._parts.tensor(here, ref["file"], ref["key"])
                    fqn, shape = f"{group}/{ref['key']}", list(t.shape)
                    dtype = next(k for k, v in ST_TO_DTYPE.items() if v == t.dtype)
                    chunks = [{"offsets": [0] * len(shape), "sizes": shape, "file": ref["file"], "key": ref["key"],
                               "node": here}]
                if dtype not in ST_TO_DTYPE:  # the chunks tile the shape: checked when the manifest was parsed
                    raise CorruptCheckpoint(f"{self.folder}: tensor {fqn!r} has unknown dtype {dtype!r}")
                metas = []
                for i, c in enumerate(chunks):
                    metas.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
                    storage[MetadataIndex(fqn, c["offsets"], i)] = (int(c["node"]), c["file"], c["key"], c["sizes"],
                                                                    ST_TO_DTYPE[dtype])
                md[fqn] = TensorStorageMetadata(TensorProperties(dtype=ST_TO_DTYPE[dtype]), torch.Size(shape), metas)
        self._storage = storage
        return Metadata(state_dict_metadata=md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            node, file, key, sizes, dtype = self._storage[item.storage_index]
            src = self._parts.tensor(node, file, key, sizes=sizes, dtype=dtype)
            for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                src = src.narrow(dim, off, length)
            dst = planner.resolve_tensor(item).detach()
            if dst.shape != src.shape:
                raise CorruptCheckpoint(f"{self.folder}/{file}: chunk {key!r} has shape {list(src.shape)}, the "
                                        f"plan expects {list(dst.shape)}")
            dst.copy_(src)
            planner.commit_tensor(item, dst)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def groups_to_reshard(info: CheckpointInfo, state: Mapping[str, Any]) -> dict[str, str]:
    """The groups of ``state`` that go through DCP: saved sharded, or targets holding DTensors."""
    saved = dict((info.manifest.meta.get(META_KEY) or {}) if info.manifest is not None else {})
    out = {n: k for n, k in saved.items() if n in state}
    if info.manifest is not None:
        for n, k in sharded_groups(state).items():
            if n in info.manifest.state:  # a plain (DDP) model / optimizer group into an FSDP2 / TP one
                out.setdefault(n, k)
    return out


class _Ref:
    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref


def _plain_optimizer_as_fqn(name: str, tree: Any, target: Mapping[str, Any], parts: NodeParts, here: int,
                            where: Path) -> Any:
    """A plain ``optimizer.state_dict()`` tree (parameters numbered 0..n-1, as DDP saves it) rewritten in
    DCP's FQN form, so it reshards into a DTensor optimizer. Parameter ``i`` of the checkpoint is the
    ``i``-th parameter of the target optimizer's param groups (both optimizers built over the same
    parameters in the same order, as ``torch.optim`` numbers them)."""
    saved = decode_tree(tree, _Ref)
    bad = StateMismatch(f"{where}: optimizer group {name!r} was saved as a plain optimizer state dict whose param "
                        "groups do not match the target optimizer's (same parameters, same order and grouping "
                        "are needed to map them onto the sharded model); build the optimizer as in the saving "
                        "run, or pass strict=False and leave the optimizer out of the state")
    if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list)
            and isinstance(saved.get("state"), dict) and len(saved["param_groups"]) == len(target["param_groups"])):
        raise bad
    fqn_of: dict[Any, str] = {}
    groups = []
    for spg, tpg in zip(saved["param_groups"], target["param_groups"], strict=True):
        params = spg.get("params") if isinstance(spg, dict) else None
        if not (isinstance(params, list) and len(params) == len(tpg["params"])
                and all(isinstance(p, (int, str)) for p in params)):
            raise bad
        fqn_of.update(zip(spg["params"], tpg["params"], strict=True))
        groups.append(dict(spg, params=list(tpg["params"])))
    if not set(saved["state"]) <= set(fqn_of):
        raise bad
    fqn_tree = {"state": {fqn_of[i]: st for i, st in saved["state"].items()}, "param_groups": groups}

    def on_tensor(p: tuple[Any, ...], r: _Ref) -> dict[str, Any]:
        t = parts.tensor(here, r.ref["file"], r.ref["key"])
        dtype = next(k for k, v in ST_TO_DTYPE.items() if v == t.dtype)
        chunk = {"offsets": [0] * t.dim(), "sizes": list(t.shape), "file": r.ref["file"], "key": r.ref["key"],
                 "node": here}
        return {"sharded": {"key": ".".join(str(x) for x in p), "shape": list(t.shape), "dtype": dtype,
                            "chunks": [chunk]}}

    return encode_tree(fqn_tree, on_tensor, is_tensor=lambda x: isinstance(x, _Ref), path=())


def read_sharded(info: CheckpointInfo, state: Mapping[str, Any], groups: dict[str, str], *,
                 strict: bool) -> dict[str, Any]:
    """Read ``groups`` from ``info`` into fresh tensors laid out like the targets (all ranks call this)."""
    assert info.manifest is not None
    man = info.manifest
    saved_sharded = man.meta.get(META_KEY) or {}
    dest: dict[str, torch.Tensor] = {}
    for name, kind in groups.items():
        target = group_state_dict(name, kind, state[name], state)
        if kind == "optimizer" and name not in saved_sharded:  # DDP-saved optimizer into a sharded one
            here = man.node_rank
            tree = _plain_optimizer_as_fqn(name, man.state[name], target, NodeParts(info.path, man), here, info.path)
            man = dataclasses.replace(man, state=dict(man.state, **{name: tree}))

        def on_tensor(p: tuple[Any, ...], t: torch.Tensor, name: str = name) -> dict[str, Any]:
            fresh = empty_like_sharded(t) if is_sharded_tensor(t) else torch.empty_like(t)  # FSDP1: ShardedTensor
            dest[f"{name}/{'.'.join(str(x) for x in p) or name}"] = fresh
            return {}

        encode_tree(target, on_tensor, is_tensor=lambda x: isinstance(x, torch.Tensor), path=())
    reader = BtckptStorageReader(info.path, man, list(groups))
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        dcp.load(dest, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=not strict),
                 no_dist=no_dist)
    except CheckpointException as exc:
        failures = list(getattr(exc, "failures", {}).values())
        causes = [f[0] if isinstance(f, tuple) else f for f in failures]
        for c in causes:
            if isinstance(c, (CorruptCheckpoint, IncompleteCheckpoint)):
                raise type(c)(f"{info.path}: {c}") from exc
        if any(isinstance(c, CheckpointError) for c in causes):
            raise next(c for c in causes if isinstance(c, CheckpointError)) from exc
        raise StateMismatch(f"{info.path}: resharded load failed: {exc}") from exc
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AssertionError) as exc:  # DCP's planner
        raise StateMismatch(f"{info.path}: the checkpoint does not fit the state ({exc}); pass strict=False to "
                            "load what matches") from exc
    out: dict[str, Any] = {}
    for name in groups:
        def load(ref: Any, name: str = name) -> Any:
            key = ref["sharded"]["key"] if "sharded" in ref else ref["key"]
            return dest.get(f"{name}/{key}")

        out[name] = decode_tree(man.state[name], load)
    return out


def apply_sharded(state: Mapping[str, Any], loaded: dict[str, Any], groups: dict[str, str], *, strict: bool) -> None:
    """Load what :func:`read_sharded` returned into the state's modules/optimizers (all ranks call this)."""
    for name, kind in groups.items():
        if kind == "model":
            set_model_state_dict(state[name], loaded[name], options=state_dict_options(state[name], strict=strict))
    for name, kind in groups.items():
        if kind == "optimizer":
            opt = state[name]
            model = owning_module(opt, state)
            set_optimizer_state_dict(model, opt, loaded[name], options=state_dict_options(model, strict=strict))
