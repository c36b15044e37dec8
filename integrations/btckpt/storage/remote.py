"""Restoring from a URL (``s3://``, ``gs://``, ``memory://``, ...): download a checkpoint into a local cache.

Torch-free. Finding and checking remote checkpoints is :mod:`btckpt.storage.discovery` over a
:class:`btckpt.storage.store.FsspecStore` (the same code as for local folders). Restores go through :func:`fetch`,
which downloads a checkpoint into a local cache folder (data first, manifest last, atomic rename) and
returns a local checkpoint that the ordinary reader verifies and loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, IncompleteCheckpoint
from ..format.manifest import MANIFEST, check_relative_name
from .atomic import LocalCommit
from .discovery import CheckpointInfo, inspect, verify
from .local import fsync_dir, fsync_file
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
    filesystem has no flock, go on unlocked (a lost commit race is then tolerated by :func:`fetch`)."""
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
    size) is downloaded again. The download is committed like a save (:class:`~btckpt.storage.atomic.LocalCommit`:
    a unique temp folder, every file fsynced, the manifest last, one rename): a killed download never looks
    whole. The returned local info is loaded by the ordinary reader.
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
        if local is None:
            _download_into(fs, info, final, raw)
    return inspect(final)


def _download_into(fs: Any, info: CheckpointInfo, final: Path, raw: bytes) -> None:
    """Download ``info`` and commit it as ``final`` through the one local commit (:class:`LocalCommit`: a temp
    folder beside it, every file fsynced, the manifest last, one atomic rename, the parent fsynced). A damaged
    copy in place is set aside only once the new one is complete (``supersede``). Without a working lock another
    process may commit the same checkpoint meanwhile: its verified copy is kept (the race lost is no error)."""
    assert info.manifest is not None
    damaged = os.path.lexists(final)  # a copy there now did not verify (the caller checked it)
    commit = LocalCommit(final.parent, info.step, name=final.name, supersede=True)
    commit.begin()
    try:
        _download(fs, str(info.path), commit.tmp, info.manifest.files, where=info.where)
        _fsync_files(commit.tmp, info.manifest.files)
        commit.supersede = os.path.lexists(final)  # set aside only what is there now (re-checked first if new)
        if commit.supersede and not damaged and _cached(final, raw) is not None:
            commit.abort()  # another process committed a verified copy meanwhile: this one is not needed
            return
        commit.commit(raw)
    except CheckpointError:
        commit.abort()
        if _cached(final, raw) is None:  # not a verified copy another process committed first
            raise
    except BaseException:
        commit.abort()
        raise


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


def _fsync_files(root: Path, files: dict[str, Any]) -> None:
    """fsync every downloaded file and the folders below ``root`` holding them (the commit fsyncs ``root``)."""
    folders = set()
    for name in files:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fsync_file(fd)
        finally:
            os.close(fd)
        folders.add((root / name).parent)
    for folder in folders - {root}:
        fsync_dir(folder)
