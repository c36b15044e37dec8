"""Write one safetensors file from the staging arena: header, then the data section in large writes.

Mechanism only: the caller (the background worker or a sync save) decides where and when. The data
section is a slice of the arena, written as is: no serialization buffer, no second copy. The checksum
is computed on the same chunks as they are written (xxh3-64, on a second thread while the first writes:
both release the GIL), and the file is fsynced before return.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import faults
from .storage import fsync_file, new_hasher

__all__ = ["write_arena_file", "HASH_ASIDE"]

HASH_ASIDE = 1 << 20  # pieces at least this large are hashed on a second thread while being written


def write_arena_file(path: Path, header: bytes, pieces: Iterable[memoryview]) -> tuple[int, str]:
    """Create ``path`` (must not exist), write ``header`` then each piece, fsync; return ``(size, checksum)``."""
    h = new_hasher()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        h.update(header)
        _write_all(fd, memoryview(header))
        faults.point("write_data")
        size = len(header)
        with ThreadPoolExecutor(1, thread_name_prefix="btckpt-hash") as pool:
            for piece in pieces:
                # large pieces: hash on a second thread while this one writes the same bytes (both release
                # the GIL); small ones, or at interpreter shutdown (no new futures then), on this thread
                hashed = _hash_aside(pool, h, piece) if len(piece) >= HASH_ASIDE else None
                if hashed is None:
                    h.update(piece)
                try:
                    _write_all(fd, piece)
                finally:
                    if hashed is not None:
                        hashed.result()
                size += len(piece)
        faults.point("before_fsync")
        fsync_file(fd)
        faults.point("after_fsync")
    finally:
        os.close(fd)
    return size, h.hexdigest()


def _hash_aside(pool: ThreadPoolExecutor, h: Any, piece: memoryview) -> Future[None] | None:
    try:
        return pool.submit(h.update, piece)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        return None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
