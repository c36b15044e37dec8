"""Checkpoints behind fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...): discovery, headers, download.

Torch-free. The rules are those of :mod:`btckpt.discovery` (same layouts, same completeness test: the
manifest parses and every file it lists exists with its size); on an object store the manifest's
presence is the commit, so a folder without it is never complete. Safetensors headers are read with
range requests (:func:`read_header_url`), never the whole file. Restores go through :func:`fetch`,
which downloads a checkpoint into a local cache folder (data first, manifest last, atomic rename) and
returns a local path that the ordinary reader verifies and loads.
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
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .discovery import HF_WEIGHTS, STEP_DIR, CheckpointInfo, inspect, node_rank
from .errors import CheckpointError, CorruptCheckpoint, IncompleteCheckpoint
from .manifest import MANIFEST, MAX_MANIFEST, Manifest, check_relative_name, entry_problem, verify_files
from .sthead import Header, parse_header
from .storage import file_checksum, new_tag, remote_fs

__all__ = [
    "RemoteCheckpointInfo", "inspect_url", "scan_url", "latest_url", "read_header_url", "fetch", "cache_root",
    "join", "verify_url",
]

log = logging.getLogger("btckpt")

HEAD_GUESS = 64 * 1024  # one range request covers most headers (btckpt pads them to 4 KiB)


@dataclass
class RemoteCheckpointInfo(CheckpointInfo):
    """A checkpoint folder behind a URL. ``path`` is the filesystem path, ``url`` the full URL."""

    url: str = ""
    fs: Any = None
    sizes: dict[str, int] | None = None  # relative name -> size, from one listing


def join(url: str, *parts: str) -> str:
    """Join URL path parts with ``/``."""
    return posixpath.join(url.rstrip("/"), *parts)


def _proto(fs: Any) -> str:
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def _url_of(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else f"{_proto(fs)}://{path}"


def _listing(fs: Any, path: str) -> dict[str, int]:
    """Relative name -> size of every file under ``path`` (one recursive listing)."""
    try:
        found = fs.find(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    base = path.rstrip("/") + "/"
    return {name[len(base):]: int(info.get("size") or 0) for name, info in found.items()
            if name.startswith(base) and info.get("type", "file") != "directory"}


def _read_manifest(fs: Any, path: str, where: str) -> Manifest:
    try:
        raw = fs.cat_file(join(path, MANIFEST), start=0, end=MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{where}: no {MANIFEST}; the checkpoint never committed") from None
    if len(raw) > MAX_MANIFEST:
        raise CorruptCheckpoint(f"{where}: manifest is larger than {MAX_MANIFEST} bytes")
    return Manifest.from_json(raw, where=f"{where}/{MANIFEST}")


def _step_of(name: str, man: Manifest | None) -> int:
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else (man.step if man else 0)


def inspect_url(url: str, *, fs: Any = None, path: str | None = None, allow_hf: bool = False) -> RemoteCheckpointInfo:
    """Classify one remote folder (reads the manifest and one listing, no data).

    Without a manifest a folder is incomplete: an upload in progress holds ``model.safetensors`` and
    ``config.json`` before its manifest. Only with ``allow_hf`` (a URL that names a plain model folder
    itself, not a ``checkpoint-<N>``) does such a folder count as a complete HF model (weights only).
    """
    if fs is None or path is None:
        fs, path = remote_fs(url)
    path = path.rstrip("/")
    name = posixpath.basename(path)
    sizes = _listing(fs, path)

    def info(step: int, status: str, kind: str, man: Manifest | None, size: int, created: str,
             reason: str = "") -> RemoteCheckpointInfo:
        return RemoteCheckpointInfo(Path(path), step, status, kind, man, size, created, reason, url=url, fs=fs,
                                    sizes=sizes)

    if MANIFEST not in sizes:
        hf = allow_hf and any(n in sizes for n in HF_WEIGHTS) and "config.json" in sizes
        return info(_step_of(name, None), "complete" if hf else "incomplete", "hf" if hf else "btckpt", None,
                    sum(sizes.values()), "", "" if hf else f"no {MANIFEST}: never committed (or upload unfinished)")
    try:
        man = _read_manifest(fs, path, url)
    except CheckpointError as exc:
        return info(_step_of(name, None), "corrupt", "btckpt", None, 0, "", str(exc))
    step = _step_of(name, man)
    for fname, entry in man.files.items():
        if fname not in sizes:
            return info(step, "incomplete", "btckpt", man, man.total_bytes, man.created, f"{fname} is missing")
        if sizes[fname] != entry["size"]:
            return info(step, "incomplete", "btckpt", man, man.total_bytes, man.created,
                        f"{fname} is {sizes[fname]} bytes, the manifest says {entry['size']}")
    if STEP_DIR.match(name) and step != man.step:
        return info(step, "corrupt", "btckpt", man, man.total_bytes, man.created,
                    f"folder name says step {step}, manifest says {man.step}")
    return info(man.step, "complete", "btckpt", man, man.total_bytes, man.created)


def _dirs(fs: Any, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]


def scan_url(url: str, *, rank: int | None = None) -> list[RemoteCheckpointInfo]:
    """Every checkpoint folder under ``url`` in every supported layout, newest first."""
    fs, root = remote_fs(url)
    root = root.rstrip("/")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    rank = node_rank() if rank is None else rank
    if STEP_DIR.match(posixpath.basename(root)) or fs.exists(join(root, MANIFEST)):
        return [inspect_url(url, fs=fs, path=root)]
    top = _dirs(fs, root)
    if not top and any(fs.exists(join(root, n)) for n in HF_WEIGHTS):
        return [inspect_url(url, fs=fs, path=root, allow_hf=True)]
    cands = [d for d in top if STEP_DIR.match(posixpath.basename(d))]
    cands += [d for d in _dirs(fs, join(root, f"rank-{rank}")) if STEP_DIR.match(posixpath.basename(d))]
    for job in top:
        b = posixpath.basename(job)
        if not b.startswith((".", "checkpoint-", "rank-")):
            cands += [d for d in _dirs(fs, join(job, f"rank-{rank}")) if STEP_DIR.match(posixpath.basename(d))]
    infos = [inspect_url(_url_of(fs, c), fs=fs, path=c) for c in cands]
    infos.sort(key=lambda i: (i.step, i.kind == "btckpt", i.created), reverse=True)
    return infos


def latest_url(url: str, *, rank: int | None = None) -> str | None:
    """The URL of the newest complete checkpoint under ``url``, or None."""
    for info in scan_url(url, rank=rank):
        if info.complete:
            return info.url
    return None


def read_header_url(fs: Any, path: str, size: int, *, where: str, counter: list[int] | None = None) -> Header:
    """Parse a remote safetensors header with one range request (two when the header exceeds 64 KiB)."""
    first = fs.cat_file(path, start=0, end=min(size, HEAD_GUESS))
    if counter is not None:
        counter[0] += len(first)
    if len(first) >= 8:
        (n,) = struct.unpack("<Q", first[:8])
        if 8 + n > len(first) and 8 + n <= size:
            more = fs.cat_file(path, start=len(first), end=8 + n)
            if counter is not None:
                counter[0] += len(more)
            first += more
    return parse_header(first, size, where=where)


def verify_url(info: RemoteCheckpointInfo) -> list[str]:
    """Stream every listed file of a remote checkpoint and check size and checksum; return the problems."""
    if info.manifest is None:
        return [info.reason or "no manifest (a plain model folder cannot be verified)"]
    problems = []
    fs = info.fs
    for name, entry in info.manifest.files.items():
        p = join(str(info.path), name)
        try:
            size, digest = file_checksum(p, opener=lambda q: fs.open(q, "rb", block_size=16 << 20))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        problem = entry_problem(name, size, digest, entry)
        if problem:
            problems.append(problem)
    return problems


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
    problems = verify_files(final, local.manifest)
    if problems:
        log.warning("btckpt: the cached copy %s is damaged (%s); downloading it again", final, problems[0])
        return None
    return local


def fetch(info: RemoteCheckpointInfo, *, cache: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Download a complete remote checkpoint into the local cache (reused when already there and verified).

    Safe across processes (local ranks restoring at once share ``$BTCKPT_CACHE``): a per-entry lock lets one
    process download while the others wait and then reuse its copy. A cached copy is reused only when its
    manifest equals the remote one and every file's checksum matches; a damaged one (even of the right
    size) is downloaded again. Files land in a unique temp folder, the manifest last, then one rename: a
    killed download never looks whole. The returned local info is loaded by the ordinary reader.
    """
    if not info.complete or info.manifest is None:
        raise IncompleteCheckpoint(f"{info.url}: not a complete checkpoint ({info.reason or info.status})")
    fs = info.fs
    raw = fs.cat_file(join(str(info.path), MANIFEST))
    key = hashlib.sha1(info.url.encode()).hexdigest()[:16]
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
            _download(fs, str(info.path), tmp, info.manifest.files, where=info.url)
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
