"""``python -m btckpt.upload SRC URL [--watch] ...``: the uploader as its own process (see :mod:`btckpt.publish`).

The public entry point and import path of the uploader; the code lives in :mod:`btckpt.publish.uploader`.
"""

from __future__ import annotations

import sys

from .publish.uploader import PassResult, Uploader, UploadSupervisor, add_arguments, main, run_from_args

__all__ = ["Uploader", "UploadSupervisor", "PassResult", "add_arguments", "run_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
