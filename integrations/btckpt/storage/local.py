"""Filesystem mechanics: durable local writes (fsync), free space, and fsspec access for URLs.

Local paths take the fast path (os calls); anything with a ``scheme://`` goes through fsspec.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InsufficientSpace
from ..names import remember_secrets

__all__ = [
    "preflight", "is_url", "fsync_dir", "fsync_file", "free_bytes", "remote_fs", "space_error", "unwritable",
]




def new_tag() -> str:
    """A writer's tag for temp names: ``<pid>-<16 random hex>``, unique across threads, processes and hosts
    (containers on a shared filesystem often have the same pid on every host; the token makes the difference)."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"

def is_url(path: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as ``s3://bucket/x`` (but not ``file://``, which maps to local)."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def unwritable(folder: Path) -> str | None:
    """Why this process could not create checkpoints in ``folder`` (it, or the nearest folder above it that
    exists, is not writable and searchable by the effective uid), or None. Root passes every check."""
    q = folder
    while not q.exists() and q != q.parent:
        q = q.parent
    eff = os.access in os.supports_effective_ids
    if q.is_dir() and not os.access(q, os.W_OK | os.X_OK, effective_ids=eff):
        what = "it" if q == folder else f"{str(q)!r}, where it would be created,"
        return f"{what} is not writable by this process (uid {os.geteuid()})"
    return None


def local_path(path: str | os.PathLike[str]) -> Path:
    """A local Path for a plain path or a ``file://`` URL."""
    s = os.fspath(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def remote_fs(url: str) -> tuple[Any, str]:
    """``(filesystem, path)`` for an fsspec URL."""
    import fsspec  # ~0.1 s: only when a URL is used (``btckpt ls ./local`` and local training never pay it)

    remember_secrets(url)  # credentials in the URL are redacted from every later log line and error
    fs, p = fsspec.core.url_to_fs(url)
    return fs, p


def fsync_file(fd: int) -> None:
    """fsync a file descriptor (fdatasync would skip the size metadata we rely on)."""
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making the names inside it (creates, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes available to this user on the filesystem holding ``path`` (or its nearest parent)."""
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return shutil.disk_usage(p).free


def space_error(exc: OSError, where: str | os.PathLike[str]) -> CheckpointError:
    """Map an OSError from writing into the right CheckpointError (ENOSPC/EDQUOT -> InsufficientSpace)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{where}: the filesystem ran out of space while writing the checkpoint "
                                 f"({exc.strerror}); free space or lower keep_last. Nothing was committed; "
                                 "older checkpoints are intact")
    return CheckpointError(f"{where}: writing the checkpoint failed: {exc}. Nothing was committed; "
                           "older checkpoints are intact")


def preflight(root: Path, nbytes: int, *, margin: int) -> None:
    """Refuse (``InsufficientSpace``, with the numbers) a write of ``nbytes`` that would leave under
    ``margin`` bytes free on ``root``'s filesystem; called before anything is written."""
    free = free_bytes(root)
    if free < nbytes + margin:
        raise InsufficientSpace(f"{root}: the checkpoint needs {nbytes / 1e6:.1f} MB plus a {margin / 1e6:.0f} MB "
                                f"margin, but only {free / 1e6:.1f} MB are free; free space, lower keep_last, or "
                                "point dir at a larger volume. Nothing was written")
