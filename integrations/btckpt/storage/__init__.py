"""Where checkpoints live and how they are found.

``store`` (the :class:`~btckpt.storage.store.Store` protocol: list, stat, read a range, get, open; local
folders and fsspec URLs), ``local`` (durable local writes: fsync, free space, temp-name tags), ``atomic``
(the one local commit: temp folder, manifest last, atomic rename; saves and the download cache alike),
``nodes`` (this node's rank), ``discovery`` (inspect / scan / verify / select over a Store: one rule for "complete"
in every layout), ``remote`` (the verified download cache for URLs).

May import: ``format``, ``btckpt.errors``, ``btckpt.names``, ``btckpt.testing``.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
