"""The save plan, written once per state structure and reused across saves.

Preparing a save costs Python work per tensor: flattening each group into JSON + keyed tensors
(:func:`btckpt.format.layout.flatten_group`), laying the tensors out as files (:func:`btckpt.format.layout.plan_layout`)
and finding the step-gated tensors. With 10^5 tensors (mixture-of-experts models, optimizer moments)
that was seconds of blocked training per save. :class:`SavePlans` remembers, per group, where each
tensor sat (its path in the group's tree) and what it was (data pointer, bytes, dtype, strides); a later
save whose groups yield the same tensors at the same places reuses the keys, the layout and the gated
keys. Anything else (a renamed key, a new shape or dtype, a re-allocated or re-tied tensor) re-plans that
save from scratch, so the snapshot always describes the state at the ``save()`` call. Scalars in a tree
(learning rates, step counts as numbers) are encoded afresh at every save.

A group whose state object can be watched (a plain module, an optimizer, a tensor:
:mod:`btckpt.saving.watch`) is not even walked: while its watch sees no change, the save reuses the
group's flattening without calling ``state_dict()``, in C-speed passes (no Python code per tensor).

Call order (training thread, one rank): ``flatten(groups)`` -> ``layout(flat, max_shard_size)`` ->
``gated(state, flat, optimizers)``.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..format.layout import FlatGroup, FlatState, Layout, fill_refs, flatten_group, flatten_indexed, plan_layout
from ..format.state import gated_keys, group_value
from ..format.tree import encode_tree
from .watch import REGISTRATIONS, Watch, watch_group

__all__ = ["SavePlans", "prepare_flat", "paused_gc"]

_DTYPE = operator.attrgetter("dtype")
_NBYTES = operator.attrgetter("nbytes")


class _Miss(ValueError):
    """The group no longer matches its plan."""


def _idents(ts: Sequence[Any]) -> tuple[list[int], list[int], list[Any], list[Any]]:
    """What a plan depends on per tensor, in four C-speed passes (a non-tensor raises AttributeError/TypeError)."""
    return (list(map(torch.Tensor.data_ptr, ts)), list(map(_NBYTES, ts)), list(map(_DTYPE, ts)),
            list(map(torch.Tensor.stride, ts)))


def _is_ref(node: Any) -> bool:
    return type(node) is dict and len(node) == 1 and "__tensor__" in node


def _tagged(node: Any, tag: str) -> bool:
    return type(node) is dict and len(node) == 1 and tag in node


def _no_tensor(path: tuple[Any, ...], t: Any) -> Any:
    raise _Miss  # a tensor where the plan had plain data


def _plain(value: Any) -> Any:
    """Plain data (no tensor allowed) encoded afresh; a list of ints (param ids) at C speed."""
    if type(value) is list and all(type(x) is int for x in value):
        return list(value)
    return encode_tree(value, _no_tensor, is_tensor=lambda x: isinstance(x, torch.Tensor))


@dataclass
class _GroupPlan:
    """One group's flattening (its tree is the template a later save is matched against) and its tensors'
    identities; ``refs_only``/``with_refs``: ids of the tree's nodes whose values are all tensor references /
    that hold a reference somewhere (the other nodes are plain data, encoded afresh at every save)."""

    group: FlatGroup
    idents: tuple[list[int], list[int], list[Any], list[Any]]
    unique: list[int]  # leaf index of each of group.tensors, in order
    refs_only: set[int]
    with_refs: set[int]

    def fill(self, value: Any, node: Any, leaves: list[Any]) -> Any:
        """``value`` encoded like ``node`` (the plan's tree), its tensors appended to ``leaves``; _Miss when
        ``value`` has another structure. Tensor leaves reuse the plan's reference dicts."""
        if id(node) not in self.with_refs:
            return _plain(value)
        if _is_ref(node):
            if not isinstance(value, torch.Tensor):
                raise _Miss
            leaves.append(value)
            return node
        if type(node) is list:
            if type(value) is not list or len(value) != len(node):
                raise _Miss
            return [self.fill(v, n, leaves) for v, n in zip(value, node, strict=True)]
        if _tagged(node, "__tuple__"):
            if type(value) is not tuple or len(value) != len(node["__tuple__"]):
                raise _Miss
            return {"__tuple__": [self.fill(v, n, leaves) for v, n in zip(value, node["__tuple__"], strict=True)]}
        if not isinstance(value, Mapping) or len(value) != len(node.get("__dict__", node)):
            raise _Miss
        if _tagged(node, "__dict__"):  # non-string keys (an optimizer's parameter ids)
            out = []
            for (k, v), (kn, vn) in zip(value.items(), node["__dict__"], strict=True):
                if not (type(k) is int and type(kn) is int and k == kn) and _plain(k) != kn:
                    raise _Miss
                out.append([kn, self.fill(v, vn, leaves)])
            return {"__dict__": out}
        if id(node) in self.refs_only:  # e.g. a state_dict, or one parameter's optimizer state
            if value.keys() != node.keys():
                raise _Miss
            leaves.extend(value.values())
            return node
        if any(not isinstance(k, str) or k not in node for k in value):
            raise _Miss
        return {k: self.fill(v, node[k], leaves) for k, v in value.items()}


def _plan_group(name: str, value: Any) -> _GroupPlan:
    g, ix = flatten_indexed(name, value)
    return _GroupPlan(g, _idents(ix.leaves), ix.unique, ix.refs_only, ix.with_refs)


def _reuse(plan: _GroupPlan, value: Any) -> FlatGroup:
    """The group's FlatGroup from its plan, or _Miss when ``value`` no longer matches it."""
    g = plan.group
    leaves: list[Any] = []
    tree = plan.fill(value, g.tree, leaves)  # fresh plain data: numbers (learning rates, counters) change
    if len(leaves) != len(g.refs):
        raise _Miss
    if any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in leaves):
        raise _Miss
    if _idents(leaves) != plan.idents:
        raise _Miss
    tensors = dict(zip(g.tensors, [leaves[i] for i in plan.unique], strict=True))
    return FlatGroup(g.name, tree, tensors, g.refs)


class SavePlans:
    """The cached save plan of one Checkpointer (see the module docstring); ``hits`` counts reuses.

    ``keep=False``: a one-shot save (:func:`btckpt.save`): plan without remembering anything."""

    def __init__(self, *, keep: bool = True) -> None:
        self._keep = keep
        self._groups: dict[str, _GroupPlan] = {}
        self._layout: Layout | None = None
        self._layout_key: tuple[Any, ...] | None = None
        self._gated: tuple[tuple[Any, ...], set[tuple[str, str]]] | None = None
        self._watches: dict[str, Watch] = {}
        self._all_hit = False
        self._last: FlatState = []
        self.hits = 0
        if keep:
            REGISTRATIONS.acquire()
            weakref.finalize(self, REGISTRATIONS.release)

    def forget(self) -> None:
        """Drop every plan: the next save walks and plans the whole state afresh (after in-place surgery a
        watch cannot see, e.g. ``t.data = t.view(...)``; see :mod:`btckpt.saving.watch`)."""
        self._groups, self._watches, self._layout, self._gated = {}, {}, None, None

    @property
    def reused(self) -> bool:
        """Whether the last save reused the whole plan (its flattening, layout and gated keys)."""
        return self._all_hit

    def flatten(self, groups: Sequence[tuple[str, Any]]) -> FlatState:
        """Flatten ``(name, state object)`` pairs (what :func:`~btckpt.format.state.group_value` takes), reusing
        each group's plan when it still matches: without a walk while the group's watch sees no change."""
        flat: FlatState = []
        fresh: dict[str, _GroupPlan] = {}
        watches: dict[str, Watch] = {}
        all_hit = True
        if not self._keep:
            self._all_hit = False
            return [flatten_group(name, group_value(obj)) for name, obj in groups]
        for name, obj in groups:
            old = self._groups.get(name)
            w = self._watches.get(name)
            g = w.still(obj) if w is not None and old is not None else None
            if g is not None and old is not None and w is not None:
                fresh[name], watches[name] = old, w
                flat.append(g)
                continue
            value = group_value(obj)
            if old is not None:
                try:
                    g = _reuse(old, value)
                except (_Miss, AttributeError, TypeError):
                    g = None
            plan = old if g is not None and old is not None else _plan_group(name, value)
            if g is None:
                all_hit = False
                g = plan.group
            fresh[name] = plan
            flat.append(g)
            watched = watch_group(obj, g, encode_plain=_plain)
            if watched is not None:
                watches[name] = watched
        all_hit = all_hit and list(fresh) == list(self._groups)
        self._groups = fresh
        self._watches = watches
        self._all_hit = all_hit
        self._last = list(flat)
        self.hits += all_hit
        return flat

    def layout(self, flat: FlatState, *, max_shard_size: int) -> Layout:
        """The layout of ``flat`` (from the last :meth:`flatten`); tensor references carry their file names."""
        key = (max_shard_size, tuple(g.name for g in flat))
        same = len(flat) == len(self._last) and all(a is b or a.tensors is b.tensors  # a watched group's, rebuilt
                                                    for a, b in zip(flat, self._last, strict=False))
        if not (same and self._all_hit and self._layout is not None and self._layout_key == key):
            self._all_hit = False  # groups from elsewhere (sharded parts) are not in the plan
            self._layout = plan_layout(flat, max_shard_size=max_shard_size)
            self._layout_key = key
            self._gated = None
            fill_refs(flat, self._layout)  # on a hit the plan's ref dicts already name their files
        return self._layout

    def gated(self, state: Mapping[str, Any], flat: FlatState,
              optimizers: Sequence[torch.optim.Optimizer]) -> set[tuple[str, str]]:
        """:func:`~btckpt.format.state.gated_keys`, reused while the plan and the state's objects are the same."""
        key = (tuple(state), tuple(map(id, state.values())), tuple(map(id, optimizers)))
        if self._all_hit and self._gated is not None and self._gated[0] == key:
            return self._gated[1]
        keys = gated_keys(state, flat, optimizers)
        self._gated = (key, keys)
        return keys


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside (also a decorator): with 10^5 tensors alive, the full collections
    that a save's per-tensor allocations trigger cost more than the save itself (a one-shot save of 80k tensors
    took 2x as long with them; nothing cyclic is created)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prepare_flat(plans: SavePlans, groups: Sequence[tuple[str, Any]], *, max_shard_size: int,
                 extra: Sequence[FlatGroup] = ()) -> tuple[FlatState, Layout | None]:
    """Flatten ``groups`` (``(name, state object)``; plus already flat ``extra`` groups, e.g. this rank's
    shards) and lay them out
    (None when there is nothing to lay out): the one save preparation of
    :meth:`Checkpointer.save <btckpt.Checkpointer.save>` and :func:`btckpt.save`."""
    flat = plans.flatten(groups) + list(extra)
    return flat, (plans.layout(flat, max_shard_size=max_shard_size) if flat else None)
