"""Turn the user's state objects into saveable trees, and load trees back into them in place.

A state value is an object with ``state_dict()``/``load_state_dict()`` (module, optimizer, scheduler,
grad scaler...), a tensor, or plain data. Wrapped models (DDP/DataParallel ``module.``, torch.compile
``_orig_mod.``) are unwrapped, so weights are saved under the plain model's keys and restore into either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import StateMismatch

__all__ = ["unwrap_model", "group_value", "check_group", "apply_group", "optimizers_in", "gated_keys",
           "optimizer_state_for_loading", "module_fit"]


def unwrap_model(obj: Any) -> Any:
    """The plain module inside DDP / DataParallel / torch.compile / FSDP1-style wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(obj, "_orig_mod") and isinstance(obj, torch.nn.Module):
            obj = obj._orig_mod
        elif isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            obj = obj.module
        else:
            break
    return obj


def group_value(obj: Any) -> Any:
    """What to save for one state group."""
    if isinstance(obj, torch.nn.Module):
        return dict(unwrap_model(obj).state_dict())
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    sd = getattr(obj, "state_dict", None)
    if callable(sd) and not isinstance(obj, Mapping):
        return sd()
    return obj


def optimizers_in(state: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    """The optimizers among the state's top-level values (the step gate hooks these).

    A wrapper that is itself an Optimizer and delegates to ``.optimizer`` (Accelerate's
    AcceleratedOptimizer) is unwrapped to the optimizer whose ``step()`` really runs. Other objects that
    merely hold an optimizer (LR schedulers) are not optimizers.
    """
    out = []
    for v in state.values():
        if not isinstance(v, torch.optim.Optimizer):
            continue
        while isinstance(getattr(v, "optimizer", None), torch.optim.Optimizer):
            v = v.optimizer  # type: ignore[attr-defined]
        out.append(v)
    return out


def _tied_to(own: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, str]:
    """``{missing key: present key}`` for keys of the live model absent from ``loaded`` that the model ties to a
    key ``loaded`` has (the same storage, offset and shape: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``).
    ``save_pretrained`` writes a tied tensor once; loading the present key loads the tied one too."""
    by_view: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for k, v in own.items():
        if k in loaded and isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr():
            by_view.setdefault((v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape)), k)
    out = {}
    for k, v in own.items():
        if k not in loaded and isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr():
            twin = by_view.get((v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape)))
            if twin is not None:
                out[k] = twin
    return out


def module_fit(module: torch.nn.Module, loaded: Mapping[str, Any]) -> tuple[list[str], list[str], list[str], list[str]]:
    """How ``loaded`` (a state_dict read from a checkpoint) fits ``module``: the keys that load (tied keys
    included, see :func:`_tied_to`), those missing from the checkpoint, those unexpected in it, and
    ``"key: why"`` for each shape/dtype mismatch. Changes nothing."""
    own = module.state_dict()
    tied = _tied_to(own, loaded)
    missing = [k for k in own if k not in loaded and k not in tied]
    unexpected = [k for k in loaded if k not in own]
    mismatched = _mismatched(own, loaded)
    wrong = {m.split(":")[0] for m in mismatched}
    bad = wrong | {k for k, twin in tied.items() if twin in wrong}
    fits = [k for k in own if k not in missing and k not in bad]
    return fits, missing, unexpected, mismatched


def _mismatched(own: Mapping[str, Any], loaded: Mapping[str, Any]) -> list[str]:
    mismatched = []
    for k, v in own.items():
        if k not in loaded or not isinstance(v, torch.Tensor):
            continue
        lv = loaded[k]
        if not isinstance(lv, torch.Tensor):
            mismatched.append(f"{k}: checkpoint holds {type(lv).__name__}, the model a tensor")
        elif tuple(v.shape) != tuple(lv.shape) or v.dtype != lv.dtype:
            mismatched.append(f"{k}: checkpoint {lv.dtype}{list(lv.shape)} vs model {v.dtype}{list(v.shape)}")
    return mismatched


def _module_mismatch(name: str, module: torch.nn.Module, loaded: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    own = module.state_dict()
    tied = _tied_to(own, loaded)
    missing = [k for k in own if k not in loaded and k not in tied]
    unexpected = [k for k in loaded if k not in own]
    mismatched = _mismatched(own, loaded)
    if strict and (missing or unexpected or mismatched):
        lines = [f"state group {name!r} does not match the checkpoint:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {missing[:20]}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {unexpected[:20]}")
        if mismatched:
            lines.append(f"  shape/dtype mismatch ({len(mismatched)}): {mismatched[:20]}")
        lines.append("  fix the model definition, or pass strict=False to load only what matches")
        raise StateMismatch(*lines)
    bad = {m.split(":")[0] for m in mismatched}
    out = {k: v for k, v in loaded.items() if k in own and k not in bad}
    out.update({k: loaded[twin] for k, twin in tied.items() if twin not in bad})  # loads the same storage again
    return out


def check_group(name: str, target: Any, loaded: Any, *, strict: bool) -> None:
    """Raise StateMismatch if :func:`apply_group` would refuse ``loaded``, changing nothing (so a restore
    checks every group before it loads the first one). Modules and tensors are checked fully, optimizers
    by the structure ``load_state_dict`` needs (param groups and their sizes)."""
    if isinstance(target, torch.nn.Module):
        if not isinstance(loaded, Mapping):
            raise StateMismatch(f"state group {name!r}: the checkpoint holds {type(loaded).__name__}, not a state_dict")
        _module_mismatch(name, unwrap_model(target), loaded, strict)
    elif isinstance(target, torch.Tensor):
        if not isinstance(loaded, torch.Tensor) or loaded.shape != target.shape or loaded.dtype != target.dtype:
            got = f"{loaded.dtype}{list(loaded.shape)}" if isinstance(loaded, torch.Tensor) else type(loaded).__name__
            raise StateMismatch(f"state group {name!r}: checkpoint has {got}, the state has "
                                f"{target.dtype}{list(target.shape)}")
    elif isinstance(target, torch.optim.Optimizer):
        own = target.state_dict()["param_groups"]
        groups = loaded.get("param_groups") if isinstance(loaded, Mapping) else None
        if not (isinstance(groups, list) and isinstance(loaded.get("state"), Mapping) and len(groups) == len(own)
                and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                        and len(g["params"]) == len(o["params"]) for g, o in zip(groups, own, strict=False))):
            raise StateMismatch(f"state group {name!r}: the checkpoint's optimizer state does not match the "
                                f"optimizer ({len(own)} param groups of {[len(o['params']) for o in own]} parameters); "
                                "build the optimizer as in the saving run")


class _ParamIds(list):  # type: ignore[type-arg]
    """A saved param group's parameter ids with O(1) membership; iteration, ``len`` and order are the list's.

    torch's ``Optimizer.load_state_dict`` tests ``param_id in group["params"]`` (a list scan) for every state
    tensor, which is quadratic in the parameter count: 20,000 parameters with Adam took 9.6 s, 100,000 over
    two minutes, on this project's CI machine; with this 0.14 s. The optimizer keeps its own param lists.
    """

    def __init__(self, ids: list[Any]) -> None:
        super().__init__(ids)
        self._ids = frozenset(ids)

    def __contains__(self, item: object) -> bool:
        return item in self._ids


def optimizer_state_for_loading(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of an optimizer state dict whose param groups look ids up in O(1) (see
    :class:`_ParamIds`), for ``Optimizer.load_state_dict``; unhashable ids are left as they are."""
    out = dict(loaded)
    groups = loaded.get("param_groups")
    if isinstance(groups, list):
        fast = []
        for g in groups:
            ids = g.get("params") if isinstance(g, Mapping) else None
            try:
                fast.append(dict(g, params=_ParamIds(ids)) if isinstance(ids, list) else g)
            except TypeError:  # an unhashable id: torch's own scan then
                fast.append(g)
        out["param_groups"] = fast
    return out


def apply_group(name: str, target: Any, loaded: Any, *, strict: bool) -> Any:
    """Load ``loaded`` into ``target`` in place; return the value to keep in the user's state dict."""
    check_group(name, target, loaded, strict=strict)
    if isinstance(target, torch.nn.Module):
        module = unwrap_model(target)
        matched = _module_mismatch(name, module, loaded, strict)
        try:
            module.load_state_dict(matched, strict=strict)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise StateMismatch(f"state group {name!r}: load_state_dict refused the checkpoint's state: {exc}") from exc
        return target
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(loaded)
        return target
    lsd = getattr(target, "load_state_dict", None)
    if callable(lsd) and not isinstance(target, Mapping):
        if isinstance(target, torch.optim.Optimizer) and isinstance(loaded, Mapping):
            loaded = optimizer_state_for_loading(loaded)
        try:
            lsd(loaded)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as exc:
            raise StateMismatch(f"state group {name!r}: {type(target).__name__}.load_state_dict refused the "
                                f"checkpoint's state: {exc}") from exc
        return target
    if isinstance(target, dict) and isinstance(loaded, Mapping):
        target.clear()
        target.update(loaded)
        return target
    if isinstance(target, list) and isinstance(loaded, list):
        target[:] = loaded
        return target
    return loaded


def gated_keys(state: Mapping[str, Any], flat: Sequence[Any],
               optimizers: Sequence[torch.optim.Optimizer] = ()) -> set[tuple[str, str]]:
    """The ``(group, key)`` tensors the step gate protects (they copy in the background): module
    parameters and optimizer state, also as plain tensors sharing storage with ``optimizers``' params/state."""
    keys: set[tuple[str, str]] = set()
    owned = {t.untyped_storage().data_ptr() for o in optimizers for g in o.param_groups for t in g["params"]}
    owned |= {v.untyped_storage().data_ptr() for o in optimizers for st in o.state.values()
              for v in st.values() if isinstance(v, torch.Tensor)}
    owned.discard(0)
    if owned:
        keys |= {(g.name, k) for g in flat for k, t in g.tensors.items() if t.untyped_storage().data_ptr() in owned}
    for g in flat:
        obj = state.get(g.name)
        if isinstance(obj, torch.nn.Module):
            params = {n for n, _ in unwrap_model(obj).named_parameters()}
            keys |= {(g.name, k) for k in g.tensors if k in params}
        elif isinstance(obj, torch.optim.Optimizer):
            keys |= {(g.name, k) for k in g.tensors}
    return keys
