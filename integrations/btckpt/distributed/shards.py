"""Sharded state (FSDP2 ``fully_shard`` / DTensor): every rank saves only its own shards.

Save: a group whose model or optimizer holds DTensors is taken with ``get_model_state_dict`` /
``get_optimizer_state_dict`` (FQN keys, DTensor leaves, no gather). Each rank flattens it into its own
tensor group ``<group>-rank<RRRRR>`` (so its file is ``model-rank00001.safetensors``), holding the local
shard of every DTensor it owns (replicas are written once, by the rank at coordinate 0 of every
replicated mesh dimension) and, on rank 0 only, the plain tensors (e.g. optimizer ``step``). A DTensor on
a slice of a larger mesh (FSDP2 on one dimension of a 2-D mesh) is replicated across the other dimensions
without saying so: every copy is written and the manifest names the lowest rank's (identical pieces merge). Ranks
publish their chunk lists through the c10d store (no collectives: the async writer may do this); each
node's leader merges them into the manifest, where every tensor leaf of a sharded group becomes

    {"__tensor__": {"sharded": {"key", "shape", "dtype", "chunks": [{"offsets", "sizes", "file", "key", "node"}]}}}

and ``meta["btckpt.sharded"]`` names the sharded groups and their kind (``model`` / ``optimizer``).
Restore (any world size, any sharding) goes through DCP's planner: see :mod:`btckpt.restore.dcp`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CorruptCheckpoint, StateMismatch, UnsupportedValue
from ..format.layout import DTYPE_TO_ST, ST_TO_DTYPE, FlatGroup
from ..format.manifest import SHARDED_META, Manifest, tiling_problem
from ..format.tree import encode_tree
from .fsdp1 import fsdp1_groups, is_sharded_tensor, sharded_tensor_chunk, state_dict_options
from .world import World

__all__ = ["META_KEY", "ShardedPart", "is_dtensor", "sharded_groups", "group_state_dict", "prepare",
           "owning_module", "rank_group", "assemble", "merge_trees", "sharded_entry"]

META_KEY = SHARDED_META


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    # Looked up, not imported: importing torch.distributed.tensor takes seconds, and until something has
    # imported it (FSDP2, a DTensor user) no tensor can be a DTensor.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _params(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if isinstance(obj, torch.optim.Optimizer):
        return [p for g in obj.param_groups for p in g["params"]]
    return []


def sharded_groups(state: Mapping[str, Any]) -> dict[str, str]:
    """The groups of ``state`` that hold DTensors, or are FSDP1 models and their optimizers
    (:mod:`btckpt.distributed.fsdp1`): name -> ``"model"`` or ``"optimizer"``."""
    out = fsdp1_groups(state)
    for name, obj in state.items():
        if any(is_dtensor(p) for p in _params(obj)):
            out[name] = "model" if isinstance(obj, torch.nn.Module) else "optimizer"
    return out


def owning_module(opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> torch.nn.Module:
    """The module in ``state`` whose parameters ``opt`` updates (needed for FQN-keyed optimizer state)."""
    ids = {id(p) for p in _params(opt)}
    for obj in state.values():
        if isinstance(obj, torch.nn.Module) and ids & {id(p) for p in obj.parameters()}:
            return obj
    raise StateMismatch("the state holds a sharded optimizer but not the model it updates; put both in the "
                        "state (e.g. {'model': model, 'optimizer': optimizer})")


def group_state_dict(name: str, kind: str, obj: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """The group's state dict in DCP form: FQN keys (wrappers stripped), DTensor leaves where sharded."""
    # DCP and DTensor load only once a state holds DTensors (importing them costs seconds at `import btckpt`)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if kind == "model":
        return dict(get_model_state_dict(obj, options=state_dict_options(obj)))
    model = owning_module(obj, state)
    return dict(get_optimizer_state_dict(model, obj, options=state_dict_options(model)))


def rank_group(group: str, rank: int) -> str:
    """The tensor group (and file stem) of ``rank``'s shards of ``group``: ``model-rank00001``."""
    return f"{group}-rank{rank:05d}"


def _chunk_of(path: str, t: Any) -> tuple[Any, list[int], list[int], bool]:
    """(local tensor, global offsets, local sizes, owned) of a DTensor on this rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # see group_state_dict

    mesh, placements = t.device_mesh, t.placements
    coord = mesh.get_coordinate()
    owned = coord is not None
    for i, p in enumerate(placements):
        if p.is_partial():
            raise UnsupportedValue(f"tensor {path!r} is a Partial DTensor (pending reduction); reduce it "
                                   "(redistribute to Replicate/Shard) before saving")
        # Replicate: one copy, from coordinate 0. Anything else shards (Shard, and _StridedShard, which FSDP2
        # uses over TP on the same dim and whose is_shard() is False): every coordinate holds its own piece.
        if p.is_replicate() and coord is not None and coord[i] != 0:
            owned = False
    local = t.to_local()
    sizes, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(sizes) != tuple(local.shape):  # padded local shard: keep the real part only
        local = local[tuple(slice(0, s) for s in sizes)]
    return local, list(offsets), list(sizes), owned and local.numel() > 0


@dataclass
class ShardedPart:
    """This rank's share of the sharded groups of one save (built on the training thread)."""

    rank: int
    node: int
    groups: dict[str, str]
    flat: list[FlatGroup]
    trees: dict[str, Any]
    async_keys: set[tuple[str, str]] = field(default_factory=set)

    # -- run by the writer (any thread): store only --------------------------------------------------
    def publish(self, w: World, key: str) -> None:
        """Publish this rank's trees (chunk refs with file names) for the node leaders."""
        w.publish(f"{key}/shards/{w.rank}", self.trees)

    def finish_manifest(self, manifest: Manifest, w: World, key: str, *, timeout: float) -> None:
        """Replace the per-rank groups in ``manifest.state`` by the merged sharded trees (leaders only)."""
        per_rank = [self.trees if r == w.rank else w.collect(f"{key}/shards/{r}", timeout=timeout)
                    for r in range(w.size)]
        for g in self.flat:
            manifest.state.pop(g.name, None)
        for name in self.groups:
            manifest.state[name] = merge_trees([t[name] for t in per_rank], path=name, leaf=self.merge_leaf)
        manifest.meta = dict(manifest.meta, **{META_KEY: dict(self.groups)})

    @staticmethod
    def merge_leaf(trees: list[Any], *, path: str) -> Any:
        """The manifest entry of one tensor from every rank's tree leaf, or None when the leaf is not one of this
        part's tensors (a plain value, copied as it is)."""
        ref = trees[0]["__tensor__"]
        if not (isinstance(ref, dict) and "part" in ref):
            return None
        refs = [t["__tensor__"]["part"] for t in trees]
        chunks, seen = [], set()
        for r in refs:
            # the same piece from several ranks: a replica the DTensor's own mesh does not show (its mesh is a
            # slice of a larger one, e.g. FSDP2 on Lightning's "data_parallel" mesh of size 1 beside
            # "tensor_parallel"); the lowest rank's copy is the one the manifest names
            where = (tuple(r.get("offsets", ())), tuple(r.get("sizes", ())))
            if "file" in r and where not in seen:
                seen.add(where)
                chunks.append({k: r[k] for k in ("offsets", "sizes", "file", "key", "node")})
        if not chunks:
            raise UnsupportedValue(f"no rank holds a shard of {path!r}; cannot save it")
        return sharded_entry(refs[0], chunks, path=path, what="shards", why="its DTensor placements are not "
                             "understood, so ")

def merge_trees(trees: list[Any], *, path: str, leaf: Callable[..., Any]) -> Any:
    """Merge the same tree from every rank: lists and dicts walked together, a ``{"__tensor__": ...}`` leaf given
    to ``leaf(trees, path=)`` (its merged entry, or None for a value kept as the first rank has it)."""
    first = trees[0]
    if isinstance(first, list):
        return [merge_trees([t[i] for t in trees], path=f"{path}.{i}", leaf=leaf) for i in range(len(first))]
    if not isinstance(first, dict):
        return first
    if set(first) == {"__tensor__"}:
        merged = leaf(trees, path=path)
        if merged is not None:
            return merged
    return {k: merge_trees([t[k] for t in trees], path=f"{path}.{k}", leaf=leaf) for k in first}


def sharded_entry(head: Mapping[str, Any], chunks: list[dict[str, Any]], *, path: str, what: str,
                  why: str = "") -> dict[str, Any]:
    """The manifest's ``sharded`` entry for one tensor whose ``chunks`` must tile ``head["shape"]``; raises
    :class:`UnsupportedValue` (nothing is committed) when they leave holes or overlap."""
    problem = tiling_problem(head["shape"], chunks)
    if problem:
        raise UnsupportedValue(f"the {what} of {path!r} do not tile its shape: {problem}; {why}nothing is "
                               "committed rather than a checkpoint with holes or overlaps")
    return {"__tensor__": {"sharded": {"key": head["key"], "shape": head["shape"], "dtype": head["dtype"],
                                       "chunks": chunks}}}


def prepare(state: Mapping[str, Any], w: World, groups: dict[str, str]) -> ShardedPart:
    """Flatten this rank's shards of ``groups`` (from :func:`sharded_groups`) for staging and writing."""
    flat: list[FlatGroup] = []
    trees: dict[str, Any] = {}
    for name, kind in groups.items():
        value = group_state_dict(name, kind, state[name], state)
        tensors: dict[str, torch.Tensor] = {}
        write_refs: list[dict[str, Any]] = []

        def on_tensor(p: tuple[Any, ...], t: Any, name: str = name, tensors: dict[str, torch.Tensor] = tensors,
                      write_refs: list[dict[str, Any]] = write_refs) -> dict[str, Any]:
            key = ".".join(str(x) for x in p) or name
            if t.dtype not in DTYPE_TO_ST:
                raise UnsupportedValue(f"tensor {name}.{key} has dtype {t.dtype}, which safetensors cannot store")
            if is_dtensor(t):
                local, offsets, sizes, owned = _chunk_of(f"{name}.{key}", t)
            elif is_sharded_tensor(t):  # FSDP1's sharded state dict
                local, offsets, sizes, owned = sharded_tensor_chunk(f"{name}.{key}", t)
            else:
                local, offsets, sizes, owned = t, [0] * t.dim(), list(t.shape), w.rank == 0
            ref: dict[str, Any] = {"key": key, "shape": list(t.shape), "dtype": DTYPE_TO_ST[t.dtype]}
            if owned:
                tensors[key] = local.detach()
                ref.update(offsets=offsets, sizes=sizes, node=w.node_rank)
                write_refs.append(ref)  # fill_refs adds "file"
            return {"part": ref}

        tree = encode_tree(value, on_tensor, is_tensor=lambda x: isinstance(x, torch.Tensor), path=())
        g = FlatGroup(rank_group(name, w.rank), tree, tensors, write_refs)
        flat.append(g)
        trees[name] = tree
    keys = {(g.name, k) for g in flat for k in g.tensors}
    return ShardedPart(w.rank, w.node_rank, dict(groups), flat, trees, keys)


def assemble(ref: Mapping[str, Any], chunk: Any, *, where: str) -> torch.Tensor:
    """The full tensor of a sharded reference (checked when its manifest was parsed: the chunks tile the
    shape exactly); ``chunk(node, file, key)`` returns a saved chunk. Every chunk is read and checked
    (dtype, sizes) before the full tensor is allocated."""
    dtype = ST_TO_DTYPE.get(ref["dtype"])
    if dtype is None:
        raise CorruptCheckpoint(f"{where}: tensor {ref['key']!r} has dtype {ref['dtype']!r}, unknown to this torch "
                                "build")
    parts = []
    for c in ref["chunks"]:
        t = chunk(int(c["node"]), c["file"], c["key"])
        if t.dtype != dtype or list(t.shape) != list(c["sizes"]):
            raise CorruptCheckpoint(f"{where}/{c['file']}: chunk {c['key']!r} of {ref['key']!r} is "
                                    f"{t.dtype}{list(t.shape)}, the manifest says {ref['dtype']}{c['sizes']}")
        parts.append((c, t))
    out = torch.empty(ref["shape"], dtype=dtype)
    for c, t in parts:
        view = out
        for dim, (off, size) in enumerate(zip(c["offsets"], c["sizes"], strict=True)):
            view = view.narrow(dim, off, size)
        view.copy_(t)
    return out
