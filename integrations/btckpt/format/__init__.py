"""What a checkpoint is, wherever it lives: the on-disk format, version 1.

``manifest`` (``btckpt.json``: files, checksums, world, the state tree, the commit marker), ``header``
(safetensors headers, read without torch), ``tree`` (plain data as JSON, tensors as references),
``layout`` (groups, shard files, the arena plan, file names), ``state`` (how live objects map to groups),
``members`` (opening a checkpoint's files safely), ``checksum`` (xxh3-64, one place).

May import: ``btckpt.errors``, ``btckpt.names``. Nothing above it: the format knows no storage, no ranks.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
