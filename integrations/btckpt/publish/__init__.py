"""Getting committed checkpoints to a bucket: the uploader runs as its own process.

``uploader`` (``btckpt upload`` / ``python -m btckpt.upload``: files first, manifest last, mirror
retention), ``remote_copy`` (each file hashed, sent, verified, journaled, retried), ``journal`` (what was
sent, the source lock, ETags), ``supervisor`` (the uploader beside training), ``staging``
(``Checkpointer(dir=URL)``: commit locally, publish through the uploader), ``publication`` (what follows each
durable commit and the close: retention, upload, consolidation).

May import: ``format``, ``storage``, ``distributed``, ``saving`` (the commit's delete and the retired record,
the engine's :class:`Target` and error channel), ``testing``, ``btckpt.errors``.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""
