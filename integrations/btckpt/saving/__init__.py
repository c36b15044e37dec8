"""Writing a checkpoint: mechanism only (when and how many is the Checkpointer's policy).

``plan`` (the cached staging plan), ``snapshot`` (the reusable pinned arena, the copy stream or thread,
the optimizer-step gate), ``writer`` (files from the arena, checksummed), ``priority`` (background
threads yield the CPU to training), ``job`` (one save across ranks: files, then the commit), ``destination``
(the ``Destination`` protocol every commit goes through: ``LocalDir`` for a folder, ``Remote`` for an fsspec URL,
and ``commit_in_order``, the one multi-node order), ``commit`` (the local mechanism: temp folder, fsync, manifest
last, rename), ``retention`` and ``retired`` (what may be deleted, and the
record of it for the uploader).

May import: ``format``, ``storage``, ``distributed``, ``testing``, ``btckpt.config``, ``btckpt.errors``.
Never ``restore`` (its sibling).

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
