"""Every rank's RNG in a Lightning checkpoint (Lightning hands the dict to rank 0's CheckpointIO only).

While Lightning builds the checkpoint dict (on every rank, ``Callback.on_save_checkpoint``), :func:`note`
tags the dict with a sequence number and each non-zero rank publishes its :func:`~btckpt.rng.capture_rng`
data as JSON through the c10d store (no collective, no pickle). Rank 0's CheckpointIO then :func:`gather`\\ s
them and the one commit writes ``rng_state_<rank>.json`` for every rank, manifest last.
"""

from __future__ import annotations

import itertools
from collections.abc import MutableMapping
from typing import Any

from ._lightning_state import RNG_SEQ_KEY
from .distributed import World, world
from .rng import capture_rng

__all__ = ["note", "gather", "peer_world"]

_SEQ = itertools.count(1)  # every rank builds the same checkpoint dicts in the same order


def peer_world() -> World | None:
    """This process's World when it is one of several ranks sharing a c10d store, else None."""
    w = world()
    return w if w.size > 1 and w.store is not None else None


def _key(seq: int, rank: int) -> str:
    return f"lightning-rng/{seq}/{rank}"


def note(checkpoint: MutableMapping[str, Any]) -> None:
    """On every rank, while Lightning builds ``checkpoint``: publish this rank's RNG for rank 0 (once per dict)."""
    if RNG_SEQ_KEY in checkpoint:
        return
    w = peer_world()
    if w is None:
        return
    seq = next(_SEQ)
    checkpoint[RNG_SEQ_KEY] = seq
    if not w.is_leader:
        w.publish(_key(seq, w.rank), capture_rng())


def gather(checkpoint: MutableMapping[str, Any], *, timeout: float) -> dict[int, dict[str, Any]] | None:
    """On rank 0: every other rank's RNG noted for ``checkpoint`` (None when :func:`note` did not run)."""
    seq = checkpoint.get(RNG_SEQ_KEY)
    w = peer_world()
    if not isinstance(seq, int) or w is None:
        return None
    out: dict[int, dict[str, Any]] = {}
    for r in range(1, w.size):
        out[r] = w.collect(_key(seq, r), timeout=timeout)
        try:
            w.store.delete_key(f"btckpt/{_key(seq, r)}")
        except (RuntimeError, AttributeError):  # pragma: no cover - a store without delete: the key stays
            pass
    return out
