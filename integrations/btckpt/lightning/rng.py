"""Every rank's RNG in a Lightning checkpoint (Lightning hands the dict to rank 0's CheckpointIO only).

While Lightning builds the checkpoint dict (on every rank, ``Callback.on_save_checkpoint``), :func:`note`
tags the dict with a key derived from what every rank agrees on -- the dict's ``global_step`` and
``epoch`` -- and each non-zero rank publishes its RNG under it (:func:`btckpt.adapters.publish_rank_rng`:
JSON through the c10d store, no collective, no pickle). Rank 0's CheckpointIO then :func:`gather`\\ s them
(freeing the keys) and the one commit writes ``rng_state_<rank>.json`` for every rank, manifest last. Two
dicts built at the same step (a top-k name and ``last.ckpt``) reuse the key one after the other: Lightning's
``trainer.save_checkpoint`` ends with a barrier, after rank 0 gathered.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ..adapters import gather_rank_rng, peer_world, publish_rank_rng
from .state import RNG_KEY

__all__ = ["note", "gather", "peer_world"]


def _key(checkpoint: MutableMapping[str, Any]) -> str:
    return f"lightning/step-{int(checkpoint.get('global_step', 0))}/epoch-{int(checkpoint.get('epoch', 0))}"


def note(checkpoint: MutableMapping[str, Any]) -> None:
    """On every rank, while Lightning builds ``checkpoint``: publish this rank's RNG for rank 0 (once per dict)."""
    if RNG_KEY in checkpoint:
        return
    key = _key(checkpoint)
    if publish_rank_rng(key):
        checkpoint[RNG_KEY] = key


def gather(checkpoint: MutableMapping[str, Any], *, timeout: float) -> dict[int, dict[str, Any]] | None:
    """On rank 0: every other rank's RNG noted for ``checkpoint`` (None when :func:`note` did not run)."""
    key = checkpoint.get(RNG_KEY)
    if not isinstance(key, str):
        return None
    return gather_rank_rng(key, timeout=timeout)
