"""Ranks: who this process is and how ranks agree, and the per-rank shards of sharded state.

``world`` (rank, world, node; agreement through the c10d store with timeouts, never training's
collectives), ``shards`` (DTensor / FSDP2 state: each rank's chunks, and assembling them).

May import: ``format``, ``storage``, ``btckpt.errors``.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
