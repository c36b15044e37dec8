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

from . import local
from .local import *  # noqa: F403 - this package's names are its local tier's: tiers.local.__all__

__all__ = list(local.__all__)
