"""Restore: pick a checkpoint, read and verify what the state asks for, then load it in place.

Everything requested is read and checksum-verified *before* the first byte is loaded into the state,
so a corrupt checkpoint never leaves the model half-restored; the caller can fall back to an older one.

Every load says what it did: a :class:`RestoreReport` (per group: the keys loaded and those skipped, and
the groups the checkpoint lacks) is logged (a warning when ``strict=False`` skipped anything), kept by the
Checkpointer as ``last_restore`` and handed to every :func:`restore_reports` block around the load. A
non-strict load that would load nothing of a model, or load optimizer state for parameters it did not
load, is refused (:class:`StateMismatch` naming the keys) before anything is applied.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed.shards import sharded_groups
from ..errors import CorruptCheckpoint, StateMismatch
from ..format.layout import rank_state_file
from ..format.manifest import check_member
from ..format.state import apply_group, check_group, module_fit, unwrap_model
from ..format.tree import decode_tree
from ..storage.discovery import CheckpointInfo, inspect, select
from ..storage.remote import fetch
from .reader import CheckpointReader, read_verified_bytes
from .rng import RngState, apply_rng, read_rank_rng

__all__ = ["read_for_state", "load_into", "read_checkpoint", "read_candidate", "reads_collectively",
           "finish_restore", "restore_first", "GroupReport", "RestoreReport", "restore_reports"]

log = logging.getLogger("btckpt")


@dataclass(frozen=True)
class GroupReport:
    """What a restore did with one state group. ``kind``: ``module`` (its keys below), ``optimizer``,
    ``tensor``, ``data``, ``sharded`` (read through DCP's planner) or ``absent`` (the checkpoint has no such
    group: left as it was). ``loaded``: the module keys loaded; ``missing``: in the module, not in the
    checkpoint; ``unexpected``: in the checkpoint, not in the module (ignored); ``mismatched``: ``"key: why"``
    for shape/dtype differences (left as they were)."""

    name: str
    kind: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether the whole group was loaded (nothing skipped)."""
        return self.kind != "absent" and not (self.missing or self.unexpected or self.mismatched)


@dataclass(frozen=True)
class RestoreReport:
    """What one restore loaded: the checkpoint, its step, ``strict``, and a :class:`GroupReport` per group
    of the state it was asked to load. ``str()``/:meth:`safe_text` give the lines btckpt logs."""

    path: Path
    step: int
    strict: bool
    groups: dict[str, GroupReport] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every group asked for was loaded whole."""
        return all(g.complete for g in self.groups.values())

    def lines(self) -> list[str]:
        """One line per group (names as ``repr``, so a name read from a checkpoint cannot forge a line)."""
        out = [f"restored step {self.step} from {self.path} (strict={self.strict}):"]
        for g in self.groups.values():
            if g.kind == "absent":
                out.append(f"  {g.name!r}: not in the checkpoint, left as it was")
            elif g.kind != "module":
                out.append(f"  {g.name!r}: loaded ({g.kind})")
            else:
                n = len(g.loaded) + len(g.missing) + len(g.mismatched)
                line = f"  {g.name!r}: loaded {len(g.loaded)} of {n} tensors"
                for what, keys in (("missing from the checkpoint, left as they were", g.missing),
                                   ("shape/dtype differs, left as they were", g.mismatched),
                                   ("in the checkpoint only, ignored", g.unexpected)):
                    if keys:
                        line += f"; {what} ({len(keys)}): {list(keys[:10])}" + (" ..." if len(keys) > 10 else "")
                out.append(line)
        return out

    def safe_text(self) -> str:
        """:meth:`lines` escaped line by line and joined by newlines (what a log shows)."""
        from ..names import safe

        return "\n".join(safe(line) for line in self.lines())

    def __str__(self) -> str:
        return self.safe_text()


_REPORTS: contextvars.ContextVar[list[RestoreReport] | None] = contextvars.ContextVar("btckpt_reports", default=None)


@contextlib.contextmanager
def restore_reports() -> Iterator[list[RestoreReport]]:
    """Collect the :class:`RestoreReport` of every restore in the block (any entry point: the Checkpointer,
    ``btckpt.load``, the HF and Lightning integrations), in order::

        with btckpt.restore_reports() as reports:
            btckpt.load(path, {"model": model}, strict=False)
        print(reports[-1].groups["model"].missing)
    """
    found: list[RestoreReport] = []
    token = _REPORTS.set(found)
    try:
        yield found
    finally:
        _REPORTS.reset(token)


def read_for_state(info: CheckpointInfo, names: Iterable[str], *, rank: int, want_rng: bool,
                   strict: bool) -> tuple[dict[str, Any], RngState | None]:
    """Read, verify and parse the groups in ``names`` (and this rank's RNG state) from one checkpoint.

    Nothing is applied; every failure is a CheckpointError naming the file."""
    reader = CheckpointReader(info.path, info.manifest)
    if info.manifest is not None:  # the small side files (index, RNG, config JSON): check them all
        for fname in info.manifest.files:
            if not fname.endswith(".safetensors"):
                check_member(info.path, info.manifest, fname)
    own = _rank_state(info, rank)  # this rank's own plain-data groups (saved per rank), over the leader's
    available = set(reader.groups) | set(own)
    loaded: dict[str, Any] = {}
    for name in names:
        if name not in available:
            if info.kind == "hf":
                log.info("btckpt: %s is a plain model folder; %r is not in it and stays as it is", info.path, name)
                continue
            if strict:
                raise StateMismatch(f"{info.path}: the checkpoint has no group {name!r} (it has "
                                    f"{sorted(available)}); remove it from the state or pass strict=False")
            continue
        loaded[name] = own[name] if name in own else reader.load_group(name)
    rng = read_rank_rng(info.path, info.manifest, rank) if want_rng and info.manifest is not None else None
    return loaded, rng


def _rank_state(info: CheckpointInfo, rank: int) -> dict[str, Any]:
    """``{group: value}`` from ``state_<rank>.json`` (see :func:`btckpt.format.layout.rank_state_file`), or {}."""
    fname = rank_state_file(rank)
    if info.manifest is None or fname not in info.manifest.files:
        return {}
    try:
        data = json.loads(read_verified_bytes(info.path, info.manifest, fname))
    except ValueError:
        raise CorruptCheckpoint(f"{info.path}/{fname}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{info.path}/{fname}: not a JSON object of groups")

    def no_tensor(ref: Any) -> Any:
        raise CorruptCheckpoint(f"{info.path}/{fname}: per-rank state holds a tensor reference {ref!r}")

    return {str(k): decode_tree(v, no_tensor) for k, v in data.items()}


def load_into(state: MutableMapping[str, Any], loaded: dict[str, Any], rng: RngState | None, *,
              strict: bool, where: Path) -> None:
    """Load verified groups into ``state`` in place (and set the RNGs): every group is checked against its
    target first (StateMismatch before anything changed), then all are applied."""
    check_fits(state, loaded, strict=strict, where=where)
    for name, value in loaded.items():
        state[name] = apply_group(name, state[name], value, strict=strict)
    if rng is not None:
        apply_rng(rng)


def check_fits(state: MutableMapping[str, Any], loaded: dict[str, Any], *, strict: bool, where: Path) -> None:
    """Raise StateMismatch (naming ``where``) unless every loaded group fits its target in ``state``."""
    for name, value in loaded.items():
        try:
            check_group(name, state[name], value, strict=strict)
        except StateMismatch as exc:
            first, *rest = exc.args or ("",)
            raise StateMismatch(f"{where}: {first}", *rest) from None


def plan_report(info: CheckpointInfo, state: MutableMapping[str, Any], wanted: list[str], loaded: dict[str, Any],
                sharded: Iterable[str], *, strict: bool) -> RestoreReport:
    """What loading ``loaded`` (and the ``sharded`` groups) into ``state`` will do, per group of ``wanted``.

    Non-strict, refuses (:class:`StateMismatch` naming the keys and the fix, nothing applied) a load that
    matches none of a model's tensors, or that would load optimizer state for parameters it leaves as
    they were (the optimizer's moments would belong to other weights)."""
    groups: dict[str, GroupReport] = {}
    unloaded: dict[int, str] = {}  # id of a live parameter not loaded -> "group.key"
    for name in wanted:
        if name not in state:
            continue
        target = state[name]
        module = unwrap_model(target) if isinstance(target, torch.nn.Module) else None
        if name in sharded:
            groups[name] = GroupReport(name, "sharded")
            continue
        if name not in loaded:
            groups[name] = GroupReport(name, "absent")
            if module is not None:
                unloaded.update({id(p): f"{name}.{k}" for k, p in module.named_parameters()})
            continue
        if module is None or not isinstance(loaded[name], Mapping):
            kind = ("optimizer" if isinstance(target, torch.optim.Optimizer) else
                    "tensor" if isinstance(target, torch.Tensor) else "data")
            groups[name] = GroupReport(name, kind)
            continue
        fits, missing, unexpected, mismatched = module_fit(module, loaded[name])
        groups[name] = GroupReport(name, "module", tuple(fits), tuple(missing), tuple(unexpected), tuple(mismatched))
        fit = set(fits)
        loaded_ids = {id(p) for k, p in module.named_parameters(remove_duplicate=False) if k in fit}
        unloaded.update({id(p): f"{name}.{k}" for k, p in module.named_parameters(remove_duplicate=False)
                         if id(p) not in loaded_ids})
    report = RestoreReport(info.path, info.step, strict, groups)
    if strict:
        return report
    models = [g for g in groups.values() if isinstance(state[g.name], torch.nn.Module)]
    for g in models:  # a model group the checkpoint has, of which nothing matches: renamed, or another model
        if g.kind == "module" and (g.missing or g.mismatched) and not g.loaded:
            raise StateMismatch(
                f"{info.path}: strict=False would load none of state group {g.name!r}'s "
                f"{len(g.missing) + len(g.mismatched)} tensors:",
                f"  the model has {list(g.missing[:10])}" + (f", mismatched {list(g.mismatched[:10])}"
                                                              if g.mismatched else ""),
                f"  the checkpoint has {list(g.unexpected[:10])}",
                "  it holds another model, or its keys are named differently: restore into the model it was saved "
                "from, or load it into a plain dict (state={" + repr(g.name) + ": {}}), rename the keys and call "
                "model.load_state_dict")
    if models and all(g.kind == "absent" for g in models):
        raise StateMismatch(
            f"{info.path}: strict=False would load nothing of the model: the checkpoint has none of the state's "
            f"model groups {[g.name for g in models]}",
            "  name the groups as the saving run did (e.g. {'model': model}), or restore from a checkpoint of "
            "this model")
    for name in groups:
        target = state[name]
        if not isinstance(target, torch.optim.Optimizer) or groups[name].kind != "optimizer":
            continue
        stale = [unloaded[id(p)] for pg in target.param_groups for p in pg["params"] if id(p) in unloaded]
        if stale:
            raise StateMismatch(
                f"{info.path}: strict=False would load optimizer state {name!r} for {len(stale)} parameter(s) whose "
                f"weights it does not load: {stale[:10]}",
                f"  their moments would belong to other weights. Leave {name!r} out of the state to restore (the "
                "optimizer starts fresh), or restore into the model the checkpoint was saved from")
    return report


def _record(report: RestoreReport) -> None:
    """Log ``report`` (a warning when a non-strict load skipped anything) and hand it to the open
    :func:`restore_reports` blocks."""
    if not report.complete and not report.strict:
        log.warning("btckpt: %s", report)
    elif not report.complete:
        log.info("btckpt: %s", report)
    found = _REPORTS.get()
    if found is not None:
        found.append(report)


def _reshard_groups(info: CheckpointInfo, state: MutableMapping[str, Any]) -> dict[str, str]:
    if info.manifest is None or not (info.manifest.meta.get("btckpt.sharded") or sharded_groups(state)):
        return {}
    from .dcp import groups_to_reshard  # torch.distributed.checkpoint (~1.4 s): only for sharded state

    return groups_to_reshard(info, state)


def read_checkpoint(info: CheckpointInfo, state: MutableMapping[str, Any], names: Iterable[str] | None = None, *,
                    rank: int, want_rng: bool, strict: bool) -> Callable[[], None]:
    """Read and verify the groups ``names`` of ``state`` (default: all) from ``info``; return the function
    that loads them into ``state`` in place. Sharded groups (FSDP2/DTensor, saved or targeted) go through
    DCP's planner, so every rank calls this. Raises CorruptCheckpoint / IncompleteCheckpoint when damaged,
    before anything is applied. ``state`` may hold more than ``names`` (the model a sharded optimizer updates)."""
    wanted = list(state) if names is None else list(names)
    groups = {n: k for n, k in _reshard_groups(info, state).items() if n in wanted}
    loaded, rng = read_for_state(info, [n for n in wanted if n not in groups], rank=rank, want_rng=want_rng,
                                 strict=strict)
    check_fits(state, loaded, strict=strict, where=info.path)  # a candidate that does not fit is not chosen
    report = plan_report(info, state, wanted, loaded, groups, strict=strict)
    resharded = None
    if groups:  # DCP's planner reshards; every rank takes part
        from .dcp import read_sharded  # torch.distributed.checkpoint: see _reshard_groups

        resharded = read_sharded(info, state, groups, strict=strict)

    def apply() -> None:
        load_into(state, loaded, rng, strict=strict, where=info.path)
        if resharded is not None:
            from .dcp import apply_sharded  # torch.distributed.checkpoint: see _reshard_groups

            apply_sharded(state, resharded, groups, strict=strict)
        _record(report)

    return apply


def reads_collectively(info: CheckpointInfo, state: MutableMapping[str, Any]) -> bool:
    """Whether reading ``info`` into ``state`` goes through DCP's planner (sharded groups, saved or targeted),
    which every rank enters together: such a read must not be started by some ranks only."""
    return bool(_reshard_groups(info, state))


def read_candidate(info: CheckpointInfo, state: MutableMapping[str, Any], *, rank: int, want_rng: bool,
                   strict: bool) -> tuple[CheckpointInfo, Callable[[], None]]:
    """Read and verify one candidate for ``state`` (downloaded to the local cache first when behind an fsspec
    URL): the candidate as read, and the function that loads it (:func:`read_checkpoint`)."""
    if not info.store.local:
        info = fetch(info)
    return info, read_checkpoint(info, state, rank=rank, want_rng=want_rng, strict=strict)


def finish_restore(info: CheckpointInfo, apply: Callable[[], None]) -> CheckpointInfo:
    """Load what :func:`read_candidate` read and verified into the state; ``info``."""
    apply()
    log.info("btckpt: restored step %d from %s", info.step, info.path)
    return info


def restore_first(candidates: Iterable[CheckpointInfo | Path], state: MutableMapping[str, Any], *, rank: int,
                  want_rng: bool, strict: bool,
                  rescan: Callable[[], Iterable[CheckpointInfo]] | None = None) -> CheckpointInfo | None:
    """Restore from the first candidate that reads and verifies; warn and fall back past damaged ones
    (:func:`btckpt.storage.discovery.select`: any :class:`CheckpointError` while reading makes a candidate damaged;
    ``rescan``: lists the candidates again when one was retired while it was read)."""
    found = select((c if isinstance(c, CheckpointInfo) else inspect(c) for c in candidates),
                   lambda info: read_candidate(info, state, rank=rank, want_rng=want_rng, strict=strict),
                   rescan=rescan)
    return None if found is None else finish_restore(*found[1])
