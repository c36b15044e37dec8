"""Restore: pick a checkpoint, read and verify what the state asks for, then load it in place.

Everything requested is read and checksum-verified *before* the first byte is loaded into the state,
so a corrupt checkpoint never leaves the model half-restored; the caller can fall back to an older one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from ..distributed.shards import sharded_groups
from ..errors import CorruptCheckpoint, StateMismatch
from ..format.layout import rank_state_file
from ..format.manifest import check_member
from ..format.state import apply_group, check_group
from ..format.tree import decode_tree
from ..storage.discovery import CheckpointInfo, inspect, select
from ..storage.remote import fetch
from .reader import CheckpointReader, read_verified_bytes
from .rng import RngState, apply_rng, read_rank_rng

__all__ = ["read_for_state", "load_into", "read_checkpoint", "read_candidate", "reads_collectively",
           "finish_restore", "restore_first"]

log = logging.getLogger("btckpt")


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
            raise StateMismatch(f"{where}: {exc}") from None


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
    resharded = None
    if groups:  # DCP's planner reshards; every rank takes part
        from .dcp import read_sharded  # torch.distributed.checkpoint: see _reshard_groups

        resharded = read_sharded(info, state, groups, strict=strict)

    def apply() -> None:
        load_into(state, loaded, rng, strict=strict, where=info.path)
        if resharded is not None:
            from .dcp import apply_sharded  # torch.distributed.checkpoint: see _reshard_groups

            apply_sharded(state, resharded, groups, strict=strict)

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
