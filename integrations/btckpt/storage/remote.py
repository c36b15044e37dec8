"""Restoring from a URL (``s3://``, ``gs://``, ``memory://``, ...): download a checkpoint into a local cache.

Torch-free. Finding and checking remote checkpoints is :mod:`btckpt.storage.discovery` over a
:class:`btckpt.storage.store.FsspecStore` (the same code as for local folders). Restores go through :func:`fetch`,
which downloads a checkpoint into a local cache folder (data first, manifest last, atomic rename) and
returns a local checkpoint that the ordinary reader verifies and loads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import IncompleteCheckpoint
from ..format.manifest import MANIFEST, check_relative_name
from .discovery import CheckpointInfo, inspect, verify
from .local import new_tag
from .store import FsspecStore

__all__ = ["fetch", "cache_root", "join"]

log = logging.getLogger("btckpt")


def join(url: str, *parts: str) -> str:
    """Join URL path parts with ``/``."""
    return posixpath.join(url.rstrip("/"), *parts)


def cache_root() -> Path:
    """Where downloaded checkpoints live: ``$BTCKPT_CACHE``, else ``~/.cache/btckpt``."""
    env = os.environ.get("BTCKPT_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "btckpt"


@contextlib.contextmanager
def _entry_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on one cache entry: one process downloads, the others wait for it. Where the
    filesystem has no flock, go on unlocked (a lost rename race is then tolerated by :func:`fetch`)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("btckpt: cannot lock the download cache entry %s (%s); downloading without it", path, exc)
        yield
    finally:
        os.close(fd)


def _cached(final: Path, raw: bytes) -> CheckpointInfo | None:
    """The cached copy at ``final`` if it holds exactly this manifest and every byte verifies, else None."""
    try:
        if (final / MANIFEST).read_bytes() != raw:
            return None
    except OSError:
        return None
    local = inspect(final)
    if not local.complete or local.manifest is None:
        return None
    problems = verify(local)
    if problems:
        log.warning("btckpt: the cached copy %s is damaged (%s); downloading it again", final, problems[0])
        return None
    return local


def fetch(info: CheckpointInfo, *, cache: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Download a complete remote checkpoint into the local cache (reused when already there and verified).

    Safe across processes (local ranks restoring at once share ``$BTCKPT_CACHE``): a per-entry lock lets one
    process download while the others wait and then reuse its copy. A cached copy is reused only when its
    manifest equals the remote one and every file's checksum matches; a damaged one (even of the right
    size) is downloaded again. Files land in a unique temp folder, the manifest last, then one rename: a
    killed download never looks whole. The returned local info is loaded by the ordinary reader.
    """
    if not info.complete or info.manifest is None:
        raise IncompleteCheckpoint(f"{info.where}: not a complete checkpoint ({info.reason or info.status})")
    if not isinstance(info.store, FsspecStore):
        raise TypeError(f"fetch() downloads from a URL; {info.where} is local already")
    fs = info.store.fs
    raw = fs.cat_file(join(str(info.path), MANIFEST))
    key = hashlib.sha1(info.where.encode()).hexdigest()[:16]
    base = Path(cache) if cache is not None else cache_root()
    final = base / key / posixpath.basename(str(info.path))
    final.parent.mkdir(parents=True, exist_ok=True)
    with _entry_lock(final.parent / f".{final.name}.lock"):
        local = _cached(final, raw)
        if local is not None:
            return local
        token = new_tag()
        tmp = final.parent / f".{final.name}.tmp-{token}"
        tmp.mkdir()
        try:
            _download(fs, str(info.path), tmp, info.manifest.files, where=info.where)
            (tmp / MANIFEST).write_bytes(raw)
            _replace(tmp, final, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return inspect(final)


def _download(fs: Any, src: str, dst: Path, files: dict[str, dict[str, Any]], *, where: str) -> None:
    """Download the manifest's ``files`` (name -> entry) from ``src`` into ``dst``, largest first, in one
    ``fs.get`` of lists: an async filesystem (s3fs, gcsfs) runs the transfers concurrently, so the link stays
    busy instead of waiting out one request per file; others go one by one."""
    for name in files:
        check_relative_name(name, where=where)
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
    names = sorted(files, key=lambda n: -int(files[n]["size"]))
    if names:
        fs.get([join(src, n) for n in names], [str(dst / n) for n in names])


def _replace(tmp: Path, final: Path, raw: bytes) -> None:
    """Move the finished download ``tmp`` to ``final``, setting a damaged old copy aside first. Losing the
    race to another process (without a working lock) that put the same checkpoint there is not an error."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
        try:
            os.rename(final, old)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or _cached(final, raw) is None:
            raise
