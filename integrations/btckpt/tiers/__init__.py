"""Tiers: frequent checkpoints into node-local memory, promoted to the durable dir, replicated to a peer node.

- :mod:`.local`: the node-local tier (a folder on a tmpfs): its identity, memory preflight, retention and the
  background promotion into the durable dir.
- :mod:`.replicas`: with several nodes, each node's tier checkpoint also copied into the next node's tier over
  a process group of its own, and fetched back by a node that lost its memory.

Layer: above ``saving``/``restore`` (tier saves go through the one save and commit path), below ``publish``
and the Checkpointer, which drives both.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""

from .local import (
    COPIES,
    DIR_ID,
    IDENTITY,
    SHARED_BASE,
    LocalTier,
    check_fits,
    default_base,
    default_tier_dir,
    incarnation,
    promote,
    resumable_tier,
    stale_tier,
    sweep_orphans,
    tier_bytes,
    tier_dir,
)

__all__ = ["SHARED_BASE", "IDENTITY", "DIR_ID", "COPIES", "default_base", "default_tier_dir", "tier_dir", "incarnation",
           "resumable_tier", "stale_tier", "sweep_orphans", "tier_bytes", "check_fits", "promote",
           "LocalTier"]
