"""``python -m btckpt.upload SRC URL [--watch] ...``: the uploader as its own process (see :mod:`btckpt.publish`).

The uploader's entry point; the code lives in :mod:`btckpt.publish.uploader`.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); ``python -m btckpt.upload`` (like ``btckpt upload``) is public as a
command line, not as an import: its names may change without notice.
"""

from __future__ import annotations

import sys

from .publish.uploader import PassResult, Uploader, UploadSupervisor, add_arguments, main, run_from_args

__all__ = ["Uploader", "UploadSupervisor", "PassResult", "add_arguments", "run_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
