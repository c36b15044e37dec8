"""Know, without walking the state, that a group still holds the tensors its save plan was made for.

A save of 10^5 tensors cannot afford ``state_dict()`` and a walk of its tree at every ``save()``: that is
microseconds per tensor. A :class:`Watch`, built when a group is (re)planned, remembers the objects the
group's ``state_dict()`` reads (a module's ``_parameters``/``_buffers``/``_modules`` dicts, an optimizer's
``state`` and ``param_groups``, a tensor) and checks at the next save, in C-speed passes only (``map``,
``operator.is_``, ``itertools.chain``: no Python code per tensor), that nothing was replaced:

- every ``register_parameter``/``register_buffer``/``add_module`` anywhere in the process (also
  ``module.buf = tensor`` and ``module.weight = Parameter(...)``, which go through them) bumps an epoch
  (torch's global registration hooks); any bump sends every group back to the walk;
- the dicts those read, and every value in them, are the same objects, in the same order, as many
  (a ``del module.x``, a ``module._buffers[k] = t`` as ``module.to()`` does, a new or replaced optimizer
  state entry, ``load_state_dict``, ``add_param_group`` all fail this);
- no ``state_dict`` hook was registered (they may change what ``state_dict()`` returns);
- each module tensor's (and a tensor group's) ``data_ptr()`` is unchanged, which catches
  ``tensor.data = other`` (new memory: a new shape, dtype or device, ``module.half()``/``.to()``).

What it does not see: a tensor whose metadata is changed in place over the same memory
(``t.data = t.view(...)``, ``squeeze_``, ``resize_`` to a smaller size, ``set_`` onto its own storage), and
``.data`` reassigned on an optimizer *state* tensor (optimizers replace state entries, which is seen; a
``data_ptr`` pass over every state tensor would cost more than the rest of the save). Those keep the old
shape or memory in the checkpoint; re-plan with :meth:`SavePlans.forget
<btckpt.saving.plan.SavePlans.forget>` after such surgery. Modules or optimizers that override
``state_dict``, keep extra state, or hold non-tensor optimizer state are never watched: they take the walk.
"""

from __future__ import annotations

import itertools
import operator
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..format.layout import FlatGroup
from ..format.state import unwrap_model

__all__ = ["Watch", "watch_group", "Registrations"]

_is = operator.is_
_chain = itertools.chain.from_iterable
_PARAMS = operator.attrgetter("_parameters")
_BUFFERS = operator.attrgetter("_buffers")
_MODULES = operator.attrgetter("_modules")
_SD_HOOKS = operator.attrgetter("_state_dict_hooks")
_SD_PRE_HOOKS = operator.attrgetter("_state_dict_pre_hooks")
_GROUP_PARAMS = operator.itemgetter("params")
_KEY = operator.itemgetter("key")
_data_ptr = torch.Tensor.data_ptr


class Registrations:
    """torch's global module/parameter/buffer registration hooks, installed while anyone watches.

    ``epoch`` grows at every registration anywhere in the process. ``acquire()``/``release()`` count the
    users (each :class:`~btckpt.saving.plan.SavePlans` that keeps plans); the hooks go when the last one does.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self._users = 0
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def _bump(self, *_args: Any) -> None:
        self.epoch += 1

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                mod = torch.nn.modules.module
                self._handles = [mod.register_module_parameter_registration_hook(self._bump),
                                 mod.register_module_buffer_registration_hook(self._bump),
                                 mod.register_module_module_registration_hook(self._bump)]

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for h in self._handles:
                    h.remove()
                self._handles = []
                self.epoch += 1  # nobody counted registrations meanwhile


REGISTRATIONS = Registrations()


def _same(now: list[Any], then: list[Any]) -> bool:
    return len(now) == len(then) and all(map(_is, now, then))


class Watch:
    """One group's remembered objects; :meth:`still` is the per-save check (see the module doc)."""

    def __init__(self, obj: Any, group: FlatGroup, check: Callable[[Any], bool],
                 make: Callable[[Any, FlatGroup], FlatGroup] | None = None) -> None:
        # by weak reference: a watch must not keep a dropped optimizer alive (its id reused by a rebuilt one is
        # then told apart by the dead reference, and its memory goes back)
        self._ref = weakref.ref(obj)
        self.group = group
        self.epoch = REGISTRATIONS.epoch
        self._check = check
        self._make = make

    def still(self, obj: Any) -> FlatGroup | None:
        """The group's FlatGroup for this save when nothing changed (its plain data encoded afresh), else None."""
        if obj is not self._ref() or REGISTRATIONS.epoch != self.epoch:
            return None
        try:
            if not self._check(obj):
                return None
            return self._make(obj, self.group) if self._make is not None else self.group
        except (KeyError, TypeError, AttributeError, ValueError):
            return None


def _module_order(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules in ``state_dict()``'s recursion order (a shared module once per place it appears)."""
    out: list[torch.nn.Module] = []
    stack = [root]
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _plain_module(m: torch.nn.Module) -> bool:
    cls = type(m)
    base = torch.nn.Module
    return (cls.state_dict is base.state_dict and cls._save_to_state_dict is base._save_to_state_dict
            and getattr(cls, "get_extra_state", base.get_extra_state) is base.get_extra_state
            and not m._state_dict_hooks and not m._state_dict_pre_hooks)


def _tensors_alias(group: FlatGroup, tensors: list[torch.Tensor], *, same_objects: bool = False) -> bool:
    """Whether the group's tensor references, in order, are ``tensors``: the very objects (``same_objects``,
    an optimizer's state) or tensors over the same memory (a module's ``state_dict()`` detaches each one, same
    shape and dtype by construction). At planning only; C-speed passes."""
    if len(group.refs) != len(tensors):
        return False
    leaves = list(map(group.tensors.__getitem__, map(_KEY, group.refs)))
    if same_objects:
        return all(map(_is, leaves, tensors))
    return list(map(_data_ptr, leaves)) == list(map(_data_ptr, tensors))


def _watch_module(obj: Any, group: FlatGroup) -> Watch | None:
    root = unwrap_model(obj)
    mods = _module_order(root)
    if not all(map(_plain_module, mods)):
        return None
    saved: list[torch.Tensor] = []
    for m in mods:
        saved.extend(p for p in m._parameters.values() if p is not None)
        saved.extend(b for k, b in m._buffers.items() if b is not None and k not in m._non_persistent_buffers_set)
    if not _tensors_alias(group, saved):
        return None
    dicts = [*map(_MODULES, mods), *map(_PARAMS, mods), *map(_BUFFERS, mods)]
    values = list(_chain(map(dict.values, dicts)))
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    ptrs = list(map(_data_ptr, tensors))

    def check(obj: Any) -> bool:
        return (unwrap_model(obj) is root
                and _same([*map(_MODULES, mods), *map(_PARAMS, mods), *map(_BUFFERS, mods)], dicts)
                and not any(map(len, map(_SD_HOOKS, mods))) and not any(map(len, map(_SD_PRE_HOOKS, mods)))
                and _same(list(_chain(map(dict.values, dicts))), values)
                and list(map(_data_ptr, tensors)) == ptrs)

    return Watch(obj, group, check)


def _watch_optimizer(opt: torch.optim.Optimizer, group: FlatGroup, encode_plain: Callable[[Any], Any]) -> Watch | None:
    cls = type(opt)
    if (cls.state_dict is not torch.optim.Optimizer.state_dict or opt._optimizer_state_dict_pre_hooks
            or opt._optimizer_state_dict_post_hooks):
        return None
    tree = group.tree
    if type(tree) is not dict or list(tree) != ["state", "param_groups"] or type(tree["param_groups"]) is not list:
        return None
    state, groups = opt.state, opt.param_groups
    keys, sdicts = list(state.keys()), list(state.values())
    if not all(isinstance(k, torch.Tensor) for k in keys) or not all(type(d) is dict for d in sdicts):
        return None
    svals = list(_chain(map(dict.values, sdicts)))
    if not all(isinstance(v, torch.Tensor) for v in svals) or not _tensors_alias(group, svals, same_objects=True):
        return None
    gdicts = list(groups)
    params = list(_chain(map(_GROUP_PARAMS, gdicts)))
    ids = [node.get("params") if type(node) is dict else None for node in tree["param_groups"]]
    lens = list(map(len, sdicts))
    state_node = tree["state"]

    def param_groups() -> list[Any]:
        out = []
        for gd, pid in zip(gdicts, ids, strict=True):
            enc = encode_plain({k: v for k, v in gd.items() if k != "params"})
            if type(enc) is not dict or "__dict__" in enc:
                raise ValueError("not a plain param group")
            enc["params"] = pid
            out.append(enc)
        return out

    try:
        if len(ids) != len(gdicts) or param_groups() != tree["param_groups"]:
            return None
    except (ValueError, TypeError, KeyError):  # a tensor or an odd key among the hyperparameters
        return None

    def check(opt: torch.optim.Optimizer) -> bool:
        return (opt.state is state and opt.param_groups is groups and not opt._optimizer_state_dict_pre_hooks
                and not opt._optimizer_state_dict_post_hooks and _same(groups, gdicts)
                and _same(list(_chain(map(_GROUP_PARAMS, gdicts))), params)
                and _same(list(state.keys()), keys) and _same(list(state.values()), sdicts)
                and list(map(len, sdicts)) == lens and all(map(_is, _chain(map(dict.values, sdicts)), svals)))

    def make(opt: torch.optim.Optimizer, g: FlatGroup) -> FlatGroup:
        return FlatGroup(g.name, {"state": state_node, "param_groups": param_groups()}, g.tensors, g.refs)

    return Watch(opt, group, check, make)


def _watch_tensor(t: torch.Tensor, group: FlatGroup) -> Watch | None:
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    if not _tensors_alias(group, [t]):
        return None
    ptr = t.data_ptr()
    return Watch(t, group, lambda t: t.data_ptr() == ptr)


def watch_group(obj: Any, group: FlatGroup, *, encode_plain: Callable[[Any], Any]) -> Watch | None:
    """A :class:`Watch` for state object ``obj`` whose group ``group`` was just planned, or None when it
    cannot be watched (the group then takes the walk at every save). ``encode_plain`` encodes plain data
    as the plan does (an optimizer's param groups are encoded afresh at every save); it raises ValueError
    on a tensor."""
    if isinstance(obj, torch.nn.Module):
        return _watch_module(obj, group)
    if isinstance(obj, torch.optim.Optimizer):
        return _watch_optimizer(obj, group, encode_plain)
    if isinstance(obj, torch.Tensor):
        return _watch_tensor(obj, group)
    return None
