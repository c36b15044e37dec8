"""Restore: pick a checkpoint, read and verify what the state asks for, and load it in place.

How a candidate is read, and what a damaged one leaves (the guarantee):

- **one pass** (``mode="onepass"``): every saved tensor whose dtype and shape match its live destination (a CPU,
  contiguous tensor of the model's ``state_dict()``, an optimizer's existing state, a tensor group) is read
  straight into the destination's memory, hashed as it lands; the rest (foreign or mismatched tensors, tied
  weights after the first, optimizer state that does not exist yet: allocated once at its final size, then
  handed to ``Optimizer.load_state_dict`` as it is, which keeps it without a copy) into a fresh tensor each,
  loaded by ``load_state_dict`` as before. No staging buffer: host memory stays bounded, each byte is read once.
  The old values are overwritten before a file's checksum is known, so :func:`restore_first` (and
  :meth:`btckpt.restore.resume.Resume._agree_on_step`) read a candidate this way only when an older complete
  candidate (another copy of the step, or an older step) comes after it. If its verification fails, the live
  tensors it overwrote are recorded (:class:`Overwrites`) and a later candidate is used only if it loads every
  one of them (a strict read does; a non-strict one that would leave some as they are is skipped with a
  warning, nothing of it applied): the state then ends exactly as restoring that candidate leaves it (model,
  optimizer, RNG: the RNG and plain data are applied only with the candidate that is chosen). If no later
  candidate verifies, the state is no longer what it was: :class:`CorruptCheckpoint` names the checkpoints and
  the fix (never None with an overwritten state).
- **verify first** (``mode="verify_first"``, :data:`LAST_CANDIDATE`: a candidate with nothing to fall back on, and
  a named checkpoint): today's guarantee, nothing is applied unless the whole candidate verified. Every file is
  hashed first through a small reused ring (:func:`btckpt.restore.reader.verify_safetensors`; its bytes stay in
  the page cache; a file this process checked as it wrote it, unchanged since, is not hashed twice:
  :func:`btckpt.restore.reader.vouch`), the state's fit, the RNG and the plain data are checked, and only the
  returned ``apply()`` reads the tensors into their destinations as above (hashed again: a file changed in place
  between the two reads raises CorruptCheckpoint from ``apply()``, the only case where it leaves the state
  partly loaded).
- **staged** (``mode="staged"``): every file read into one fresh buffer, verified, then copied in by
  ``load_state_dict`` (memory: the files' size); sharded groups (DCP's planner) and plain HF folders always.

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
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from ..distributed.shards import sharded_groups
from ..errors import CheckpointError, CorruptCheckpoint, IncompleteCheckpoint, StateMismatch
from ..format.layout import ST_TO_DTYPE, rank_state_file
from ..format.manifest import Manifest, check_member
from ..format.state import apply_group, check_group, module_fit, unwrap_model
from ..format.tree import decode_tree
from ..storage.discovery import CheckpointInfo, inspect, select
from ..storage.remote import fetch
from .reader import CheckpointReader, device_target, direct_target, read_verified_bytes
from .rng import RngState, apply_rng, read_rank_rng

__all__ = ["read_for_state", "load_into", "read_checkpoint", "read_candidate", "reads_collectively",
           "finish_restore", "restore_first", "GroupReport", "RestoreReport", "restore_reports", "Overwrites",
           "LAST_CANDIDATE", "MODES", "has_fallback"]

log = logging.getLogger("btckpt")

MODES = ("onepass", "verify_first", "staged")  # how a candidate is read: module doc
LAST_CANDIDATE = "verify_first"  # how a candidate with nothing to fall back on is read ("staged": today's buffer)
Region = tuple[int, int]  # a live tensor's memory: (data_ptr, nbytes)


def _region(t: torch.Tensor) -> Region:
    return (int(t.data_ptr()), int(t.numel() * t.element_size()))


class Overwrites:
    """What one restore's one-pass reads overwrote in the live state: ``touched`` (memory region -> the
    tensor's name, ``group.key``) and ``failed`` (the candidates whose read then failed). A later candidate
    must load every touched tensor (:meth:`check_covers`); if none does, :meth:`error` is raised."""

    def __init__(self) -> None:
        self.touched: dict[Region, str] = {}
        self.failed: list[Path] = []
        self.writes = 0  # files whose bytes started landing in the live state

    def touch(self, regions: Mapping[Region, str]) -> None:
        """Record ``regions`` as overwritten (called before their bytes start landing)."""
        self.touched.update(regions)
        self.writes += 1

    def check_covers(self, info: CheckpointInfo, covers: set[Region]) -> None:
        """Raise IncompleteCheckpoint (nothing of ``info`` applied yet) unless ``info`` loads every touched tensor."""
        left = [name for r, name in self.touched.items() if r not in covers]
        if left:
            raise IncompleteCheckpoint(
                f"{info.path}: would leave {len(left)} tensor(s) that the failed one-pass read of "
                f"{[str(p) for p in self.failed] or 'an earlier candidate'} overwrote as they are now: {left[:10]}"
                + (" ..." if len(left) > 10 else "") + "; not used")

    def error(self) -> CorruptCheckpoint:
        """The error of a restore that overwrote live tensors and then found nothing to restore instead."""
        names = list(self.touched.values())
        failed = ", ".join(str(p) for p in self.failed) or "the checkpoint the ranks did not agree on"
        return CorruptCheckpoint(
            f"restore read {failed} straight into the live state and it failed verification (or the ranks did "
            "not agree on it), and no older checkpoint verified to restore instead: the live state is no longer "
            f"what it was before restore() ({len(names)} tensor(s) overwritten, e.g. {names[:5]}). Rebuild the "
            "model and optimizer (or restart the process) before training; to start fresh, move the damaged "
            "checkpoint(s) out of the checkpoint dir (a single damaged checkpoint is verified before anything "
            "is applied, so the restore then returns None and leaves the state as it was)")


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
                   strict: bool, state: MutableMapping[str, Any] | None = None, mode: str = "staged",
                   overwrites: Overwrites | None = None,
                   precheck: Callable[[dict[str, Any]], None] | None = None
                   ) -> tuple[dict[str, Any], RngState | None, Callable[[], dict[str, Any]] | None]:
    """Read, verify and parse the groups in ``names`` (and this rank's RNG state) from one checkpoint: the
    groups, the RNG state, and (``mode="verify_first"``) the function that reads the tensors into ``state``
    afterwards (the groups then hold only the plain data until it ran; None in the other modes).

    ``mode`` (module doc): ``staged`` applies nothing; ``onepass`` reads into ``state``'s tensors as it goes
    (``overwrites`` records which, before any lands; ``precheck(groups)``, called with the groups' skeleton of
    meta tensors, refuses a candidate that does not fit before anything is written); ``verify_first`` checks
    every file, the fit and the RNG first. Every failure is a CheckpointError naming the file."""
    reader = CheckpointReader(info.path, info.manifest)
    if info.manifest is not None:  # the small side files (index, RNG, config JSON): check them all
        for fname in info.manifest.files:
            if not fname.endswith(".safetensors"):
                check_member(info.path, info.manifest, fname)
    own = _rank_state(info, rank)  # this rank's own plain-data groups (saved per rank), over the leader's
    available = set(reader.groups) | set(own)
    wanted: list[str] = []
    for name in names:
        if name not in available:
            if info.kind == "hf":
                log.info("btckpt: %s is a plain model folder; %r is not in it and stays as it is", info.path, name)
                continue
            if strict:
                raise StateMismatch(f"{info.path}: the checkpoint has no group {name!r} (it has "
                                    f"{sorted(available)}); remove it from the state or pass strict=False")
            continue
        wanted.append(name)
    plan, manifest = None, info.manifest
    if mode != "staged" and state is not None and manifest is not None:
        plan = _direct_plan(reader, manifest, state, [n for n in wanted if n not in own])
    if plan is None:  # staged: sharded refs, a plain HF folder, or asked for
        loaded = {name: own[name] if name in own else reader.load_group(name) for name in wanted}
        rng = read_rank_rng(info.path, info.manifest, rank) if want_rng and info.manifest is not None else None
        if overwrites is not None and overwrites.touched and state is not None:
            overwrites.check_covers(info, _covers(state, loaded))  # nothing of it applied yet
        return loaded, rng, None
    assert manifest is not None  # a plan is made for btckpt checkpoints only
    skeleton = {name: own[name] if name in own else plan.skeleton[name] for name in wanted}
    if precheck is not None:
        precheck(skeleton)  # StateMismatch before anything is written
    overwrites = overwrites if overwrites is not None else Overwrites()
    overwrites.check_covers(info, plan.covers)
    rng = read_rank_rng(info.path, manifest, rank) if want_rng else None
    reader.into = plan.into
    reader.on_read = lambda f: overwrites.touch(plan.regions.get(f, {}))

    def read_tensors() -> dict[str, Any]:
        try:
            return {name: own[name] if name in own else reader.load_group(name) for name in wanted}
        finally:
            reader.close()

    if mode == "onepass":
        return read_tensors(), rng, None
    try:
        for fname in plan.files:  # verify_first: every file checked before the first byte is applied
            reader.verify(fname)  # and kept open: retired before the load, it is still read as verified
    except BaseException:
        reader.close()
        raise
    return {name: own[name] for name in wanted if name in own}, rng, read_tensors


def _covers(state: Mapping[str, Any], loaded: Mapping[str, Any]) -> set[Region]:
    """The live tensors loading ``loaded`` (group -> value, tensors real or meta) into ``state`` sets: a module's
    tensors that fit, a tensor group, every state tensor of a loaded optimizer (its ``load_state_dict`` replaces
    the whole state: each is set or dropped)."""
    covers: set[Region] = set()
    for name, value in loaded.items():
        target = state.get(name)
        if isinstance(target, torch.nn.Module) and isinstance(value, Mapping):
            module = unwrap_model(target)
            sd = module.state_dict()
            covers.update(_region(sd[k]) for k in module_fit(module, value)[0] if isinstance(sd[k], torch.Tensor))
        elif isinstance(target, torch.Tensor):
            covers.add(_region(target))
        elif isinstance(target, torch.optim.Optimizer):
            covers.update(_region(t) for st in target.state.values() for t in st.values()
                          if isinstance(t, torch.Tensor))
    return covers


@dataclass
class _Plan:
    """Where a candidate's tensors go: ``skeleton`` (group -> its value with meta tensors: the fit is checked on
    it), ``into`` (file -> key -> live destination), ``regions`` (file -> the destinations' regions and names),
    ``covers`` (the live tensors a load of this candidate sets: :meth:`Overwrites.check_covers`), ``files``."""

    skeleton: dict[str, Any]
    into: dict[str, dict[str, torch.Tensor]]
    regions: dict[str, dict[Region, str]]
    covers: set[Region]
    files: list[str]


class _Staged(Exception):
    """A tensor reference a one-pass read does not handle (a sharded one): the candidate is read staged."""


def _direct_plan(reader: CheckpointReader, manifest: Manifest, state: MutableMapping[str, Any],
                 names: list[str]) -> _Plan | None:
    """The destinations of a one-pass read of ``names`` into ``state`` (None: read it staged). Reads the files'
    headers only. A destination is a live CPU tensor matching the saved dtype and shape
    (:func:`btckpt.restore.reader.direct_target`) or such a CUDA tensor (:func:`~btckpt.restore.reader.device_target`:
    read through the pinned ring), its memory overlapping no other destination."""
    metas: dict[tuple[str, str], torch.Tensor] = {}
    ref_of: dict[int, tuple[str, str]] = {}
    entries: dict[str, dict[str, Any]] = {}

    def meta(ref: Any) -> torch.Tensor:
        if not isinstance(ref, Mapping) or "sharded" in ref:
            raise _Staged
        key = (ref["file"], ref["key"])
        t = metas.get(key)
        if t is None:
            if key[0] not in entries:
                entries[key[0]] = reader.header(key[0]).by_name()
            e = entries[key[0]].get(key[1])
            if e is None:
                raise CorruptCheckpoint(f"{reader.folder}/{key[0]}: tensor {key[1]!r} is missing")
            dtype = ST_TO_DTYPE.get(e.dtype)
            if dtype is None:
                raise CorruptCheckpoint(f"{reader.folder}/{key[0]}: tensor {key[1]!r} has dtype {e.dtype}, unknown "
                                        "to this torch build")
            t = metas[key] = torch.empty(e.shape, dtype=dtype, device="meta")
            ref_of[id(t)] = key
        return t

    try:
        skeleton = {name: decode_tree(manifest.state[name], meta) for name in names}
    except _Staged:
        return None
    cands: list[tuple[tuple[str, str], torch.Tensor, str]] = []

    def offer(v: Any, dest: Any, label: str) -> None:
        if isinstance(v, torch.Tensor) and id(v) in ref_of and isinstance(dest, torch.Tensor):
            cands.append((ref_of[id(v)], dest, label))

    covers = _covers(state, skeleton)
    for name, value in skeleton.items():
        target = state.get(name)
        if isinstance(target, torch.nn.Module) and isinstance(value, Mapping):
            sd = unwrap_model(target).state_dict()
            for k, v in value.items():
                offer(v, sd.get(k), f"{name}.{k}")
        elif isinstance(target, torch.Tensor):
            offer(value, target, name)
        elif isinstance(target, torch.optim.Optimizer) and isinstance(value, Mapping):
            saved, groups = value.get("state"), value.get("param_groups")
            if not isinstance(groups, list):
                continue
            try:
                id_map = dict(zip(chain.from_iterable(g["params"] for g in groups),
                                  chain.from_iterable(g["params"] for g in target.param_groups), strict=False))
            except (TypeError, KeyError):
                continue
            if not isinstance(saved, Mapping):
                continue
            for pid, st in saved.items():
                live = target.state.get(id_map[pid]) if pid in id_map else None
                if isinstance(st, Mapping) and live:  # a fresh optimizer has none: fresh tensors, kept as they are
                    for k, v in st.items():
                        offer(v, live.get(k), f"{name}.state.{pid}.{k}")
    into: dict[str, dict[str, torch.Tensor]] = {}
    regions: dict[str, dict[Region, str]] = {}
    fitting = [(key, dest, label) for key, dest, label in cands
               if direct_target(dest, metas[key].dtype, tuple(metas[key].shape))
               or device_target(dest, metas[key].dtype, tuple(metas[key].shape))]
    end = -1
    for key, dest, label in sorted(fitting, key=lambda c: c[1].data_ptr()):
        r = _region(dest)
        if r[0] < end or key[1] in into.get(key[0], {}):
            continue  # its memory overlaps another destination (tied), or its bytes go elsewhere already
        end = r[0] + r[1]
        into.setdefault(key[0], {})[key[1]] = dest
        regions.setdefault(key[0], {})[r] = label
        covers.add(r)
    return _Plan(skeleton, into, regions, covers, sorted({f for f, _ in metas}))


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
                    rank: int, want_rng: bool, strict: bool, mode: str = LAST_CANDIDATE,
                    overwrites: Overwrites | None = None) -> Callable[[], None]:
    """Read and verify the groups ``names`` of ``state`` (default: all) from ``info``; return the function
    that loads them into ``state`` in place. Sharded groups (FSDP2/DTensor, saved or targeted) go through
    DCP's planner, so every rank calls this. ``state`` may hold more than ``names`` (the model a sharded
    optimizer updates).

    ``mode`` (module doc): ``verify_first`` (default) and ``staged`` raise CorruptCheckpoint /
    IncompleteCheckpoint when damaged before anything is applied; ``onepass`` writes the tensors into ``state``
    as they are read (``overwrites`` records which), only its StateMismatch comes before any write."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    wanted = list(state) if names is None else list(names)
    groups = {n: k for n, k in _reshard_groups(info, state).items() if n in wanted}
    reports: list[RestoreReport] = []

    def precheck(skeleton: dict[str, Any]) -> None:  # a candidate that does not fit is not chosen
        check_fits(state, skeleton, strict=strict, where=info.path)
        reports.append(plan_report(info, state, wanted, skeleton, groups, strict=strict))

    loaded, rng, later = read_for_state(info, [n for n in wanted if n not in groups], rank=rank, want_rng=want_rng,
                                        strict=strict, state=state, mode=mode, overwrites=overwrites,
                                        precheck=precheck)
    if not reports:
        precheck(loaded)
    report = reports[-1]
    resharded = None
    if groups:  # DCP's planner reshards; every rank takes part
        from .dcp import read_sharded  # torch.distributed.checkpoint: see _reshard_groups

        resharded = read_sharded(info, state, groups, strict=strict)

    def apply() -> None:
        value = loaded
        if later is not None:  # verify_first: the files verified; now their bytes go into the state
            try:
                value = later()
            except CheckpointError as exc:
                raise CorruptCheckpoint(
                    f"{exc} -- it verified a moment ago, so it was changed in place while being read; the live "
                    "state is now partly loaded from it: rebuild the model and optimizer before training") from None
        load_into(state, value, rng, strict=strict, where=info.path)
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
                   strict: bool, mode: str = LAST_CANDIDATE, overwrites: Overwrites | None = None
                   ) -> tuple[CheckpointInfo, Callable[[], None]]:
    """Read and verify one candidate for ``state`` (downloaded to the local cache first when behind an fsspec
    URL): the candidate as read, and the function that loads it (:func:`read_checkpoint`; ``mode`` and
    ``overwrites`` as there). A one-pass read that failed after its bytes began landing in the state is
    recorded in ``overwrites.failed``."""
    if not info.store.local:
        info = fetch(info)
    before = overwrites.writes if overwrites is not None else 0
    try:
        return info, read_checkpoint(info, state, rank=rank, want_rng=want_rng, strict=strict, mode=mode,
                                     overwrites=overwrites)
    except CheckpointError:
        if overwrites is not None and overwrites.writes > before:
            overwrites.failed.append(info.path)
        raise


def finish_restore(info: CheckpointInfo, apply: Callable[[], None]) -> CheckpointInfo:
    """Load what :func:`read_candidate` read and verified into the state; ``info``."""
    apply()
    log.info("btckpt: restored step %d from %s", info.step, info.path)
    return info


def has_fallback(infos: list[CheckpointInfo]) -> dict[int, bool]:
    """``id(info) -> whether a usable candidate (complete, not of a newer format) comes after it in infos``:
    the candidates that may be read one pass (module doc)."""
    out: dict[int, bool] = {}
    after = False
    for c in reversed(infos):
        out[id(c)] = after
        after = after or (c.complete and c.status != "newer")
    return out


def restore_first(candidates: Iterable[CheckpointInfo | Path], state: MutableMapping[str, Any], *, rank: int,
                  want_rng: bool, strict: bool,
                  rescan: Callable[[], Iterable[CheckpointInfo]] | None = None,
                  overwrites: Overwrites | None = None) -> CheckpointInfo | None:
    """Restore from the first candidate that reads and verifies; warn and fall back past damaged ones
    (:func:`btckpt.storage.discovery.select`: any :class:`CheckpointError` while reading makes a candidate damaged;
    ``rescan``: lists the candidates again when one was retired while it was read).

    A candidate with a usable one after it is read one pass, the last one verify-first (module doc); if a
    one-pass read overwrote live tensors and no later candidate verifies (or fits), :class:`CorruptCheckpoint`
    (:meth:`Overwrites.error`) instead of None. ``overwrites``: the caller's record (the ranks' agreement)."""
    ow = overwrites if overwrites is not None else Overwrites()
    later: dict[int, bool] = {}

    def listed(infos: Iterable[CheckpointInfo | Path]) -> list[CheckpointInfo]:
        out = [c if isinstance(c, CheckpointInfo) else inspect(c) for c in infos]
        later.clear()
        later.update(has_fallback(out))
        return out

    def attempt(info: CheckpointInfo) -> tuple[CheckpointInfo, Callable[[], None]]:
        mode = "onepass" if later.get(id(info)) else LAST_CANDIDATE
        return read_candidate(info, state, rank=rank, want_rng=want_rng, strict=strict, mode=mode, overwrites=ow)

    try:
        found = select(listed(candidates), attempt,
                       rescan=(lambda: listed(rescan())) if rescan is not None else None)  # type: ignore[misc]
    except StateMismatch:
        if ow.touched:
            raise ow.error() from None
        raise
    if found is None:
        if ow.touched:
            raise ow.error()
        return None
    return finish_restore(*found[1])
