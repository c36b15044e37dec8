"""Restore: pick a checkpoint, read and verify what the state asks for, then load it in place.

Everything requested is read and checksum-verified *before* the first byte is loaded into the state,
so a corrupt checkpoint never leaves the model half-restored; the caller can fall back to an older one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

from .discovery import CheckpointInfo, inspect
from .errors import CheckpointError, StateMismatch
from .manifest import check_member
from .reader import CheckpointReader
from .rng import RngState, apply_rng, read_rng_file, rng_file
from .statedict import apply_group, check_group

__all__ = ["read_for_state", "load_into", "restore_first"]

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
    available = set(reader.groups)
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
        loaded[name] = reader.load_group(name)
    rng = None
    if want_rng and info.manifest is not None:
        fname = rng_file(rank)
        if fname in info.manifest.files:
            rng = read_rng_file(info.path, info.manifest, fname)
        else:
            log.warning("btckpt: %s has no RNG state for rank %d (saved with another world size); RNGs not "
                        "restored", info.path, rank)
    return loaded, rng


def load_into(state: MutableMapping[str, Any], loaded: dict[str, Any], rng: RngState | None, *,
              strict: bool, where: Path) -> None:
    """Load verified groups into ``state`` in place (and set the RNGs): every group is checked against its
    target first (StateMismatch before anything changed), then all are applied."""
    for name, value in loaded.items():
        try:
            check_group(name, state[name], value, strict=strict)
        except StateMismatch as exc:
            raise StateMismatch(f"{where}: {exc}") from None
    for name, value in loaded.items():
        state[name] = apply_group(name, state[name], value, strict=strict)
    if rng is not None:
        apply_rng(rng)


def _reshard_groups(info: CheckpointInfo, state: MutableMapping[str, Any]) -> dict[str, str]:
    if info.manifest is None or not (info.manifest.meta.get("btckpt.sharded") or _has_dtensor(state)):
        return {}
    from .dcp_bridge import groups_to_reshard

    return groups_to_reshard(info, state)


def _has_dtensor(state: MutableMapping[str, Any]) -> bool:
    from .sharded import sharded_groups

    return bool(sharded_groups(state))


def restore_first(candidates: Iterable[CheckpointInfo | Path], state: MutableMapping[str, Any], *, rank: int,
                  want_rng: bool, strict: bool) -> CheckpointInfo | None:
    """Restore from the first candidate that reads, verifies and fits ``state``; warn and fall back past the
    others (any CheckpointError). When none restores and one did not fit (StateMismatch), that is raised."""
    mismatch: StateMismatch | None = None
    for cand in candidates:
        info = cand if isinstance(cand, CheckpointInfo) else inspect(cand)
        if info.complete and hasattr(info, "url"):  # behind an fsspec URL: download to the local cache first
            from .remote import fetch

            info = fetch(info)  # type: ignore[arg-type]
        if not info.complete:
            why = info.status + (f": {info.reason}" if info.reason else "")
            log.warning("btckpt: skipping %s (%s)", info.path, why)
            continue
        try:
            resharded, groups = None, _reshard_groups(info, state)
            loaded, rng = read_for_state(info, [n for n in state if n not in groups], rank=rank, want_rng=want_rng,
                                         strict=strict)
            if groups:  # sharded groups (FSDP2/DTensor): DCP's planner reshards; every rank takes part
                from .dcp_bridge import read_sharded

                resharded = read_sharded(info, state, groups, strict=strict)
            load_into(state, loaded, rng, strict=strict, where=info.path)
            if resharded is not None:
                from .dcp_bridge import apply_sharded

                apply_sharded(state, resharded, groups, strict=strict)
        except CheckpointError as exc:  # any failure to read, verify or fit a candidate: try the next older
            if isinstance(exc, StateMismatch) and mismatch is None:
                mismatch = exc
            log.warning("btckpt: %s is damaged or does not fit the state, falling back to an older checkpoint: %s",
                        info.path, exc)
            continue
        log.info("btckpt: restored step %d from %s", info.step, info.path)
        return info
    if mismatch is not None:  # nothing fit: the state, not the checkpoints, is the likely problem
        raise mismatch
    return None
