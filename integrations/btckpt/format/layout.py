"""Flatten a state into groups of tensors + JSON, and lay the tensors out as safetensors files.

The layout is the plan the snapshot and the writer share: every file is ``header + arena[begin:end]``,
so a file's data section is one contiguous slice of a single byte arena. Within a file, tensors are
ordered by element size (largest first), which keeps every tensor aligned inside a 4 KiB-aligned
data section. Layouts are cached by the signature (keys, shapes, dtypes), so repeated saves of the
same state re-plan nothing.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..errors import UnsupportedValue
from .header import ALIGN, build_header_columns
from .state import group_value
from .tree import MAX_DEPTH, NOT_SCALAR, TAGS, _path_str, encode_scalar, encode_tree

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
_DTYPES = frozenset(DTYPE_TO_ST)
_TAGS = frozenset(TAGS)


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
    return flatten_indexed(name, value)[0]


_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")
_DEVICE_TYPE = operator.attrgetter("device.type")
_NBYTES = operator.attrgetter("nbytes")
_SHAPE = operator.attrgetter("shape")
_KEY = operator.itemgetter("key")


class _Walk:
    """One group's walk (:func:`flatten_indexed`): the JSON tree as :func:`~btckpt.format.tree.encode_tree`
    encodes it, the tensor leaves in traversal order with their path keys and reference dicts, and the ids of
    the tree's nodes that hold a reference (``with_refs``) / whose values are all references (``refs_only``).
    A dict of string keys whose values are all tensors (a state_dict, one parameter's optimizer state) is
    encoded in C-speed passes, without Python code per tensor."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: list[str] = []
        self.leaves: list[torch.Tensor] = []
        self.refs: list[dict[str, Any]] = []
        self.with_refs: set[int] = set()
        self.refs_only: set[int] = set()

    def tensor(self, path: tuple[Any, ...], t: torch.Tensor) -> dict[str, Any]:
        key = ".".join(str(p) for p in path) or self.name
        _check_tensor(f"{self.name}.{key}" if path else self.name, t)
        ref = {"key": key}
        node = {"__tensor__": ref}
        self.keys.append(key)
        self.leaves.append(t)
        self.refs.append(ref)
        self.with_refs.add(id(node))
        return node

    def _bulk(self, value: Mapping[str, Any], path: tuple[Any, ...]) -> dict[str, Any] | None:
        """``value`` (a non-empty dict) encoded in C-speed passes when its keys are plain strings and its values
        plain tensors that pass :func:`_check_tensor`; None otherwise (the caller walks it item by item)."""
        vals = list(value.values())
        if (len(path) >= MAX_DEPTH or not set(map(type, vals)) <= _TENSOR_TYPES
                or set(map(type, value)) != {str} or not set(map(_DTYPE, vals)) <= _DTYPES
                or set(map(_LAYOUT, vals)) != {torch.strided} or "meta" in set(map(_DEVICE_TYPE, vals))):
            return None
        prefix = ".".join(str(p) for p in path)
        if not prefix and "" in value:
            return None  # the group's own name as the key: item by item
        keys = [f"{prefix}.{k}" for k in value] if prefix else list(value)
        refs = [{"key": k} for k in keys]
        nodes = [{"__tensor__": r} for r in refs]
        out = dict(zip(value, nodes, strict=True))
        self.keys += keys
        self.leaves += vals
        self.refs += refs
        self.with_refs.update(map(id, nodes))
        self.with_refs.add(id(out))
        if len(out) > 1:
            self.refs_only.add(id(out))
        return out

    def _bulk_nested(self, value: Mapping[Any, Any], path: tuple[Any, ...]) -> dict[str, Any] | None:
        """``value`` encoded in C-speed passes when its keys are ints and its values non-empty dicts that
        :meth:`_bulk` takes (an optimizer's state: parameter id -> its tensors); None otherwise."""
        outer = list(value)
        vals = list(value.values())
        if len(path) + 1 >= MAX_DEPTH or set(map(type, outer)) != {int} or set(map(type, vals)) != {dict} \
                or not all(map(len, vals)):
            return None
        inner = list(itertools.chain.from_iterable(map(dict.keys, vals)))
        ts = list(itertools.chain.from_iterable(map(dict.values, vals)))
        if (not set(map(type, ts)) <= _TENSOR_TYPES or set(map(type, inner)) != {str} or not _TAGS.isdisjoint(inner)
                or not set(map(_DTYPE, ts)) <= _DTYPES or set(map(_LAYOUT, ts)) != {torch.strided}
                or "meta" in set(map(_DEVICE_TYPE, ts))):
            return None
        prefix = ".".join(str(p) for p in path)
        heads = [f"{prefix}.{k}." for k in outer] if prefix else [f"{k}." for k in outer]
        lens = list(map(len, vals))
        keys = list(map(operator.add, itertools.chain.from_iterable(map(itertools.repeat, heads, lens)), inner))
        refs = [{"key": k} for k in keys]
        nodes = [{"__tensor__": r} for r in refs]
        it = iter(nodes)
        dicts = [dict(zip(d, it, strict=False)) for d in vals]  # zip stops at d's end before taking from it
        out = {"__dict__": [[k, d] for k, d in zip(outer, dicts, strict=True)]}
        self.keys += keys
        self.leaves += ts
        self.refs += refs
        self.with_refs.update(map(id, nodes))
        self.with_refs.update(map(id, dicts))
        self.with_refs.add(id(out))
        self.refs_only.update(id(d) for d, n in zip(dicts, lens, strict=True) if n > 1)
        return out

    def walk(self, value: Any, path: tuple[Any, ...]) -> Any:
        """:func:`~btckpt.format.tree.encode_tree` of ``value`` (same output, same errors)."""
        scalar = encode_scalar(value, path)
        if scalar is not NOT_SCALAR:
            return scalar
        if isinstance(value, torch.Tensor):
            return self.tensor(path, value)
        n0 = len(self.refs)
        node: Any
        if isinstance(value, tuple):
            node = {"__tuple__": [self.walk(v, path + (i,)) for i, v in enumerate(value)]}
        elif isinstance(value, list):
            node = [self.walk(v, path + (i,)) for i, v in enumerate(value)]
        elif isinstance(value, Mapping):
            plain = all(isinstance(k, str) for k in value) and not any(k in TAGS for k in value)
            if plain:
                if value:
                    bulk = self._bulk(value, path)
                    if bulk is not None:
                        return bulk
                node = {k: self.walk(v, path + (k,)) for k, v in value.items()}
                if len(self.refs) > n0 and len(node) > 1 and all(map(_is_ref, node.values())):
                    self.refs_only.add(id(node))
            else:
                batch = self._bulk_nested(value, path) if value else None
                if batch is not None:
                    return batch
                items = []
                for k, v in value.items():
                    if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                        raise UnsupportedValue(
                            f"dict key {k!r} at {_path_str(path)!r} has type {type(k).__name__}; "
                            "use str, int, float, bool, None or tuple keys (btckpt stores state as JSON, never "
                            "pickle)")
                    items.append([self.walk(k, path + ("<key>",)), self.walk(v, path + (k,))])
                node = {"__dict__": items}
        else:
            # numpy scalars and similar: accept exact conversions to int/float/bool only.
            item = getattr(value, "item", None)
            if callable(item) and getattr(value, "shape", None) == ():
                return self.walk(item(), path)
            return encode_tree(value, _no_tensor, is_tensor=_is_tensor, path=path)  # raises, naming the value
        if len(self.refs) > n0:
            self.with_refs.add(id(node))
        return node

    def group(self, tree: Any) -> tuple[FlatGroup, list[torch.Tensor], list[int]]:
        """The FlatGroup: tensors keyed uniquely, tied ones stored once; with each reference's tensor (a tied
        reference's is its first occurrence) and the reference index of each stored tensor."""
        keys, leaves, refs = self.keys, self.leaves, self.refs
        n = len(leaves)
        if len(set(keys)) != n:
            return self._group_sequential(tree)
        ptrs = list(map(torch.Tensor.data_ptr, leaves))
        if len(set(ptrs)) == n:  # no two tensors over the same memory: nothing tied
            return FlatGroup(self.name, tree, dict(zip(keys, leaves, strict=True)), refs), leaves, list(range(n))
        # tied candidates: same data pointer (a tie needs the same storage and offset)
        count: dict[int, int] = {}
        for p in ptrs:
            count[p] = count.get(p, 0) + 1
        seen: dict[tuple[Any, ...], int] = {}
        first = list(range(n))
        for i in [i for i, p in enumerate(ptrs) if count[p] > 1]:
            t = leaves[i]
            if t.numel() > 0:
                j = seen.setdefault(_ident(t), i)
                if j != i:
                    first[i] = j
                    refs[i]["key"] = keys[j]
        unique = [i for i in range(n) if first[i] == i]
        tensors = {keys[i]: leaves[i] for i in unique}
        return FlatGroup(self.name, tree, tensors, refs), [leaves[j] for j in first], unique

    def _group_sequential(self, tree: Any) -> tuple[FlatGroup, list[torch.Tensor], list[int]]:
        """:meth:`group` one reference at a time (keys that collide get ``#2``, ``#3``... in traversal order)."""
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], str] = {}
        firsts: dict[str, int] = {}
        for i, (key, t, ref) in enumerate(zip(self.keys, self.leaves, self.refs, strict=True)):
            ident = None
            if t.numel() > 0:
                ident = _ident(t)
                if ident in seen:
                    ref["key"] = seen[ident]
                    continue
            base, n = key, 1
            while key in tensors:
                n += 1
                key = f"{base}#{n}"
            tensors[key] = t
            firsts[key] = i
            ref["key"] = key
            if ident is not None:
                seen[ident] = key
        leaves = [tensors[r["key"]] for r in self.refs]
        return FlatGroup(self.name, tree, tensors, self.refs), leaves, [firsts[k] for k in tensors]


def _ident(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def _is_ref(node: Any) -> bool:
    return type(node) is dict and len(node) == 1 and "__tensor__" in node


def _no_tensor(path: tuple[Any, ...], t: Any) -> Any:  # pragma: no cover - the walk handles tensors itself
    raise AssertionError(path)


@dataclass
class IndexedGroup:
    """A group flattened for the save plan (:mod:`btckpt.saving.plan`): the FlatGroup, each reference's tensor
    (in reference order; a tied one's is its first occurrence), the reference index of each stored tensor, and
    the ids of the tree's nodes holding a reference somewhere / holding only references (a dict of > 1)."""

    group: FlatGroup
    leaves: list[torch.Tensor]
    unique: list[int]
    with_refs: set[int]
    refs_only: set[int]


def flatten_indexed(name: str, value: Any) -> tuple[FlatGroup, IndexedGroup]:
    """:func:`flatten_group` with what the save plan keeps of the walk (:class:`IndexedGroup`)."""
    if not GROUP_NAME.match(name):
        raise UnsupportedValue(f"state group name {name!r} cannot be a file name; use letters, digits, "
                               "'_', '-' or '.' (not leading)")
    w = _Walk(name)
    tree = w.walk(value, ())
    g, leaves, unique = w.group(tree)
    return g, IndexedGroup(g, leaves, unique, w.with_refs, w.refs_only)


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


class Slot(NamedTuple):
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
    """A file of the checkpoint: ``header`` followed by ``arena[begin:begin+size]``; ``keys``: its tensors in
    data order (of ``group``)."""

    name: str
    header: bytes
    begin: int
    size: int
    group: str = ""
    keys: tuple[str, ...] = ()

    @property
    def file_size(self) -> int:
        return len(self.header) + self.size


@dataclass
class Layout:
    """All files of one snapshot, the slot of every tensor (in arena order), index files, and the arena size."""

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
        (g.name, tuple(zip(g.tensors, map(tuple, map(_SHAPE, g.tensors.values())),
                           map(_DTYPE, g.tensors.values()), strict=False))) for g in flat)


def group_files(group: str, n: int) -> list[str]:
    """HF file names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``..."""
    if n == 1:
        return [f"{group}.safetensors"]
    return [f"{group}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _shard(nbytes: list[int], max_shard_size: int) -> list[tuple[int, int]]:
    """Index ranges of consecutive tensors, each a file of at most ``max_shard_size`` bytes (or one tensor)."""
    if sum(nbytes) <= max_shard_size:
        return [(0, len(nbytes))]
    bounds: list[tuple[int, int]] = []
    lo, size = 0, 0
    for i, nb in enumerate(nbytes):
        if i > lo and size + nb > max_shard_size:
            bounds.append((lo, i))
            lo, size = i, 0
        size += nb
    bounds.append((lo, len(nbytes)))
    return bounds


_NEW = tuple.__new__
_SLOTS = itertools.repeat(Slot)


def plan_layout(flat: FlatState, *, max_shard_size: int) -> Layout:
    """Lay every group's tensors out as files in one arena (each file's data 4 KiB-aligned).

    In C-speed passes over each group's tensors (sizes, offsets by ``itertools.accumulate``, the header in one
    string, the slots as tuples): no Python code per tensor but for a file that mixes element sizes (a sort)."""
    files: list[FilePlan] = []
    slots: dict[tuple[str, str], Slot] = {}
    index_files: dict[str, bytes] = {}
    sig: list[Any] = [max_shard_size]
    pos = 0
    for g in flat:
        keys, ts = list(g.tensors), list(g.tensors.values())
        shapes, dtypes = list(map(tuple, map(_SHAPE, ts))), list(map(_DTYPE, ts))
        sig.append((g.name, tuple(zip(keys, shapes, dtypes, strict=False))))
        if not ts:
            continue
        nbytes = list(map(_NBYTES, ts))
        bounds = _shard(nbytes, max_shard_size)
        names = group_files(g.name, len(bounds))
        weight_map: dict[str, str] = {}
        total = 0
        for fname, (lo, hi) in zip(names, bounds, strict=True):
            sizes = list(map(torch.Tensor.element_size, ts[lo:hi]))
            if len(set(sizes)) > 1:  # largest first, stable: keeps the order within a size
                order = sorted(range(lo, hi), key=lambda i: -sizes[i - lo])
                fkeys, fshapes = list(map(keys.__getitem__, order)), list(map(shapes.__getitem__, order))
                fdtypes, fnbytes = list(map(dtypes.__getitem__, order)), list(map(nbytes.__getitem__, order))
            else:
                fkeys, fshapes, fdtypes, fnbytes = keys[lo:hi], shapes[lo:hi], dtypes[lo:hi], nbytes[lo:hi]
            ends = list(itertools.accumulate(fnbytes))
            begins = [0, *ends[:-1]]
            off = ends[-1]
            header = build_header_columns(fkeys, list(map(DTYPE_TO_ST.__getitem__, fdtypes)), fshapes, begins, ends,
                                          {"format": "pt"})
            rows = zip(fkeys, itertools.repeat(g.name), itertools.repeat(fname), fdtypes, fshapes,
                       map(pos.__add__, begins), fnbytes)
            slots.update(zip(zip(itertools.repeat(g.name), fkeys), map(_NEW, _SLOTS, rows), strict=False))
            weight_map.update(zip(fkeys, itertools.repeat(fname)))
            files.append(FilePlan(fname, header, pos, off, g.name, tuple(fkeys)))
            total += off
            pos += -(-off // ALIGN) * ALIGN
        if len(names) > 1 or g.name == MODEL_GROUP:  # the model's index even for one file: see MODEL_GROUP
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            index_files[f"{g.name}.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    return Layout(tuple(sig), files, slots, index_files, pos)


def fill_refs(flat: FlatState, layout: Layout) -> None:
    """Write each tensor reference's file name into the JSON trees (after planning)."""
    files: dict[str, list[FilePlan]] = {}
    for fp in layout.files:
        files.setdefault(fp.group, []).append(fp)
    for g in flat:
        fps = files.get(g.name, [])
        if len(fps) == 1 and fps[0].keys and len(fps[0].keys) == len(g.tensors):  # one file: every reference
            names: Any = itertools.repeat(fps[0].name)
        else:
            slots = layout.slots
            names = [slots[(g.name, k)].file for k in map(_KEY, g.refs)]
        for _ in map(dict.__setitem__, g.refs, itertools.repeat("file"), names):
            pass
