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

from ..format.checksum import new_hasher
from ..storage.local import fsync_file, open_nofollow
from ..testing import faults
from .priority import background_thread, is_background, leave

__all__ = ["write_arena_file", "HASH_ASIDE"]

HASH_ASIDE = 1 << 20  # pieces at least this large are hashed on a second thread while being written


def write_arena_file(path: Path, header: bytes, pieces: Iterable[memoryview], *,
                     hash_aside: bool = True) -> tuple[int, str]:
    """Create ``path`` (must not exist), write ``header`` then each piece, fsync; return ``(size, checksum)``.

    ``hash_aside``: checksum large pieces on a second thread while this one writes them (else inline)."""
    h = new_hasher()
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # 0600 in a private folder (a local tier)
    try:
        h.update(header)
        _write_all(fd, memoryview(header))
        faults.point("write_data")
        size = len(header)
        size += _write_pieces(fd, h, pieces, hash_aside=hash_aside)
        faults.point("before_fsync")
        fsync_file(fd)
        faults.point("after_fsync")
    finally:
        os.close(fd)
    return size, h.hexdigest()


def _write_pieces(fd: int, h: Any, pieces: Iterable[memoryview], *, hash_aside: bool) -> int:
    """Write and checksum every piece; return the bytes written."""
    size = 0
    # the checksum thread has the writer's priority: background work yields to training (btckpt.saving.priority)
    marked = is_background()
    aside = 0
    with ThreadPoolExecutor(1, thread_name_prefix="btckpt-hash",
                            initializer=background_thread if marked else None) as pool:
        try:
            for piece in pieces:
                # large pieces: hash on a second thread while this one writes the same bytes (both release
                # the GIL); small ones, or at interpreter shutdown (no new futures then), on this thread
                hashed = _hash_aside(pool, h.update, piece) if hash_aside and len(piece) >= HASH_ASIDE else None
                aside += hashed is not None
                if hashed is None:
                    h.update(piece)
                try:
                    _write_all(fd, piece)
                finally:
                    if hashed is not None:
                        hashed.result()
                size += len(piece)
        finally:
            if marked and aside:
                _hash_aside(pool, leave)  # unmark the checksum thread before it ends
    return size


def _hash_aside(pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Future[None] | None:
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        return None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
