"""Flatten a state into groups of tensors + JSON, and lay the tensors out as safetensors files.

The layout is the plan the snapshot and the writer share: every file is ``header + arena[begin:end]``,
so a file's data section is one contiguous slice of a single byte arena. Within a file, tensors are
ordered by element size (largest first), which keeps every tensor aligned inside a 4 KiB-aligned
data section. Layouts are cached by the signature (keys, shapes, dtypes), so repeated saves of the
same state re-plan nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedValue
from .header import ALIGN, TensorEntry, build_header
from .state import group_value
from .tree import encode_tree

__all__ = [
    "DTYPE_TO_ST", "ST_TO_DTYPE", "FlatGroup", "FlatState", "Slot", "FilePlan", "Layout", "flatten_group",
    "plan_layout", "group_files", "GROUP_NAME", "MODEL_GROUP", "rank_groups", "rank_state_file", "RANK_STATE_NAME",
    "rng_file", "RNG_FILE",
]

# The group whose files serving engines load. Its index is written even for a single file: vLLM's and
# SGLang's loaders take every top-level ``*.safetensors`` unless ``model.safetensors.index.json`` names the
# files, so without it they would read the optimizer's tensors as weights. Additive: readers of format 1
# follow the manifest's references and never needed the index.
MODEL_GROUP = "model"
GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
RANK_STATE_NAME = re.compile(r"^state_\d+\.json$")


def rank_state_file(rank: int) -> str:
    """The file holding ``rank``'s own plain-data groups (saved by every rank but the node's leader,
    whose plain data is in the manifest): ``{group: tree}`` as in the manifest's ``state``."""
    return f"state_{rank}.json"


RNG_FILE = re.compile(r"^rng_state_\d+\.json$")


def rng_file(rank: int) -> str:
    """The file name holding ``rank``'s RNG state (JSON, see :mod:`btckpt.restore.rng`)."""
    return f"rng_state_{rank}.json"

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.int64: "I64",
    torch.float64: "F64", torch.complex64: "C64",
}
for _name, _st in [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e5m2", "F8_E5M2"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
                   ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e8m0fnu", "F8_E8M0")]:
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


@dataclass
class FlatGroup:
    """One group flattened: its JSON tree (tensor leaves are ``{"key": ...}`` refs) and its tensors."""

    name: str
    tree: Any
    tensors: dict[str, torch.Tensor]
    refs: list[dict[str, Any]] = field(default_factory=list)


FlatState = list[FlatGroup]


def _check_tensor(path: str, t: torch.Tensor) -> None:
    if t.is_meta or t.device.type == "meta":
        raise UnsupportedValue(f"tensor {path!r} is on the meta device (it has no data); materialize the "
                               "model (e.g. to_empty + init) before saving")
    if t.layout != torch.strided:
        raise UnsupportedValue(f"tensor {path!r} has layout {t.layout}; only dense (strided) tensors are "
                               "supported: call .to_dense() first")
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        raise UnsupportedValue(f"tensor {path!r} is a {type(t).__name__} (a tensor subclass such as DTensor); "
                               "use the distributed save path for sharded tensors")
    if t.dtype not in DTYPE_TO_ST:
        raise UnsupportedValue(f"tensor {path!r} has dtype {t.dtype}, which safetensors cannot store; "
                               "convert it (e.g. complex128 -> two float64 tensors via torch.view_as_real)")


def flatten_group(name: str, value: Any) -> FlatGroup:
    """Flatten one group's value (a state_dict-like tree) into JSON + uniquely keyed tensors.

    Tensors that share storage, offset, shape, stride and dtype (tied weights) are stored once and
    referenced twice. Keys are the dotted path of the tensor (a flat state_dict keeps its own keys).
    """
    if not GROUP_NAME.match(name):
        raise UnsupportedValue(f"state group name {name!r} cannot be a file name; use letters, digits, "
                               "'_', '-' or '.' (not leading)")
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    refs: list[dict[str, Any]] = []

    def on_tensor(path: tuple[Any, ...], t: torch.Tensor) -> dict[str, Any]:
        key = ".".join(str(p) for p in path) or name
        _check_tensor(f"{name}.{key}" if path else name, t)
        ident = None
        if t.numel() > 0:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                     str(t.device))
            if ident in seen:
                ref = {"key": seen[ident]}
                refs.append(ref)
                return ref
        base, n = key, 1
        while key in tensors:
            n += 1
            key = f"{base}#{n}"
        tensors[key] = t
        if ident is not None:
            seen[ident] = key
        ref = {"key": key}
        refs.append(ref)
        return ref

    tree = encode_tree(value, on_tensor, is_tensor=_is_tensor, path=())
    return FlatGroup(name, tree, tensors, refs)


def rank_groups(state: Any, *, skip: set[str]) -> tuple[dict[str, Any], list[str]]:
    """What a rank other than its node's leader saves of ``state`` (except ``skip``): the JSON trees of
    the groups holding no tensor (its own data: data-loader position, counters), saved per rank; and the
    names of the groups holding tensors, which are saved once per node, from its leader."""
    plain: dict[str, Any] = {}
    tensor_groups: list[str] = []
    for name, obj in state.items():
        if name in skip:
            continue
        g = flatten_group(name, group_value(obj))
        if g.tensors:
            tensor_groups.append(name)
        else:
            plain[name] = g.tree
    return plain, tensor_groups


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: its file and its byte range in the arena."""

    key: str
    group: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FilePlan:
    """A file of the checkpoint: ``header`` followed by ``arena[begin:begin+size]``."""

    name: str
    header: bytes
    begin: int
    size: int

    @property
    def file_size(self) -> int:
        return len(self.header) + self.size


@dataclass
class Layout:
    """All files of one snapshot, the slot of every tensor, index files, and the arena size."""

    signature: tuple[Any, ...]
    files: list[FilePlan]
    slots: dict[tuple[str, str], Slot]
    index_files: dict[str, bytes]
    arena_size: int

    @property
    def total_bytes(self) -> int:
        return sum(f.file_size for f in self.files) + sum(len(b) for b in self.index_files.values())


def signature(flat: FlatState, max_shard_size: int) -> tuple[Any, ...]:
    """What the layout depends on: group names, tensor keys, shapes, dtypes, and the shard size."""
    return (max_shard_size,) + tuple(
        (g.name, tuple((k, tuple(t.shape), t.dtype) for k, t in g.tensors.items())) for g in flat)


def group_files(group: str, n: int) -> list[str]:
    """HF file names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``..."""
    if n == 1:
        return [f"{group}.safetensors"]
    return [f"{group}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _shard(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nb
    return shards


def plan_layout(flat: FlatState, *, max_shard_size: int) -> Layout:
    """Lay every group's tensors out as files in one arena (each file's data 4 KiB-aligned)."""
    files: list[FilePlan] = []
    slots: dict[tuple[str, str], Slot] = {}
    index_files: dict[str, bytes] = {}
    pos = 0
    for g in flat:
        if not g.tensors:
            continue
        shards = _shard(g.tensors, max_shard_size)
        names = group_files(g.name, len(shards))
        weight_map: dict[str, str] = {}
        total = 0
        for fname, keys in zip(names, shards, strict=True):
            keys = sorted(keys, key=lambda k: -g.tensors[k].element_size())  # stable: keeps order within size
            entries, off = [], 0
            for k in keys:
                t = g.tensors[k]
                nb = t.numel() * t.element_size()
                entries.append(TensorEntry(k, DTYPE_TO_ST[t.dtype], tuple(t.shape), off, off + nb))
                slots[(g.name, k)] = Slot(k, g.name, fname, t.dtype, tuple(t.shape), pos + off, nb)
                weight_map[k] = fname
                off += nb
            header = build_header(entries, {"format": "pt"})
            files.append(FilePlan(fname, header, pos, off))
            total += off
            pos += -(-off // ALIGN) * ALIGN
        if len(names) > 1 or g.name == MODEL_GROUP:  # the model's index even for one file: see MODEL_GROUP
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            index_files[f"{g.name}.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    return Layout(signature(flat, max_shard_size), files, slots, index_files, pos)


def fill_refs(flat: FlatState, layout: Layout) -> None:
    """Write each tensor reference's file name into the JSON trees (after planning)."""
    for g in flat:
        for ref in g.refs:
            ref["file"] = layout.slots[(g.name, ref["key"])].file
