"""Reading a checkpoint back: which one, verified how, applied when.

``policy`` (the one resume decision: own dir, load dir, a named folder), ``reader`` (verified reads of
safetensors files, straight into the live tensors where they fit), ``load`` (read a candidate in one pass
into the state when an older one follows, else verify everything first; what a damaged one leaves),
``resume`` (the Checkpointer's restore across ranks), ``rng`` (RNG state as JSON), ``dcp`` (reading
sharded or DCP checkpoints at any world size through DCP's planner).

May import: ``format``, ``storage``, ``distributed``, ``btckpt.config``, ``btckpt.errors``.
Never ``saving`` (its sibling).

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
