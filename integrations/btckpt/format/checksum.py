"""The checksum every manifest records: its name, a streaming hasher, and a whole-file digest.

One place for the algorithm (xxh3-64) so that writers, readers, ``btckpt verify`` and the uploader agree.
Imports nothing of btckpt.
"""

from __future__ import annotations

import os
from typing import Any

import xxhash

__all__ = ["CHECKSUM", "new_hasher", "file_checksum"]

CHECKSUM = "xxh3_64"
_CHUNK = 16 << 20


def new_hasher() -> Any:
    """A streaming hasher for the manifest's checksum (xxh3-64: about 13 GB/s, well under write cost)."""
    return xxhash.xxh3_64()


def file_checksum(path: str | os.PathLike[str], *, opener: Any = None) -> tuple[int, str]:
    """``(size, hexdigest)`` of a file, read in large chunks."""
    h = new_hasher()
    size = 0
    f = opener(path) if opener else open(path, "rb", buffering=0)
    with f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()
