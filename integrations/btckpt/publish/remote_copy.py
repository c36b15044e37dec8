"""The uploader's verified copy of local checkpoint files to a :class:`~btckpt.saving.destination.Remote`.

:class:`RemoteCopy` is what the uploader adds to the Remote's commit mechanics, file by file: the local file is
hashed against its manifest entry before it is sent (a corrupt local file is never uploaded), the remote object
is checked after (S3: its ETag, computed locally with the same part size; elsewhere a read-back), every verified
file is recorded in the journal, transient errors are retried with exponential backoff and jitter, and a
checkpoint that will not be finished has what this uploader sent of it removed. It also answers whether a remote
copy can stand in for the local one (``--keep-local``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..format.checksum import CHECKSUM, file_checksum
from ..format.manifest import MANIFEST
from ..saving.destination import Remote, RemotePart
from ..storage.discovery import CheckpointInfo
from ..storage.remote import join
from .journal import Callback, Journal, s3_etag

__all__ = ["LocalProblem", "RemoteCopy"]

log = logging.getLogger("btckpt.upload")

T = TypeVar("T")

class LocalProblem(Exception):
    """The local file is missing or does not match its manifest: retrying will not help."""


class RemoteCopy:
    """Sends and verifies files of local checkpoints under ``remote`` (see the module docstring); ``progress``: a
    rich progress bar or None."""

    def __init__(self, remote: Remote, journal: Journal, *, retries: int, backoff: float, part_size: int,
                 progress: Any = None) -> None:
        self.remote, self.journal, self.progress = remote, journal, progress
        self.fs, self.s3 = remote.fs, remote.s3
        self.retries, self.backoff, self.part_size = retries, backoff, part_size

    def journal_says_there(self, info: CheckpointInfo, rdir: str, mhash: str, size: int,
                           listing: dict[str, dict[str, Any]]) -> bool:
        """The journal recorded this very checkpoint as published, and the listing still agrees: the manifest
        and every file are there with their sizes (and, on S3, the ETags recorded at upload)."""
        assert info.manifest is not None
        if self.journal.ckpts.get(rdir) != mhash:
            return False
        man = listing.get(MANIFEST)
        if man is None or man["size"] != size:
            return False
        for name, entry in info.manifest.files.items():
            r, j = listing.get(name), self.journal.files.get(join(rdir, name))
            if r is None or r["size"] != int(entry["size"]):
                return False
            if self.s3 and (j is None or j.get("etag") is None or j["etag"] != r.get("ETag")):
                return False
        return True

    def upload_file(self, part: RemotePart, local: Path, rpath: str, entry: dict[str, Any],
                    remote: dict[str, Any] | None, task: Any) -> int:
        """Make ``rpath`` a verified copy of ``local`` (skipped when the remote object already is one); the
        bytes sent."""
        size = int(entry["size"])
        j = self.journal.files.get(rpath)
        if remote is not None and remote["size"] == size:
            if (j and j["size"] == size and j[CHECKSUM] == entry[CHECKSUM]
                    and (not self.s3 or j.get("etag") == remote.get("ETag"))):
                self.advance(task, size)
                return 0
            if self.matches(local, rpath, entry, remote):
                self.advance(task, size)
                return 0
        return self.retry(lambda: self._send(part, local, rpath, entry, task), rpath)

    def advance(self, task: Any, n: int) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, advance=n)

    def _local_digest(self, local: Path, entry: dict[str, Any]) -> str | None:
        """Hash the local file (and its S3 ETag); refuse it when it does not match the manifest."""
        try:
            if self.s3:
                digest, etag = s3_etag(local, part_size=self.part_size)
            else:
                _, digest = file_checksum(local)
                etag = None
        except FileNotFoundError:
            raise LocalProblem(f"{local} vanished (deleted locally before upload)") from None
        if digest != entry[CHECKSUM]:
            raise LocalProblem(f"{local}: checksum {digest} differs from the manifest's {entry[CHECKSUM]}; "
                               "the local file is corrupt and is not uploaded")
        return etag

    def matches(self, local: Path, rpath: str, entry: dict[str, Any], remote: dict[str, Any]) -> bool:
        """Whether the remote object ``rpath`` holds the bytes of ``local`` (S3: ETag; else a read-back); a match
        is recorded in the journal."""
        if self.s3:
            etag = self._local_digest(local, entry)
            ok = etag == remote.get("ETag")
        else:
            _, digest = file_checksum(rpath, opener=lambda p: self.fs.open(p, "rb"))
            ok = digest == entry[CHECKSUM]
            etag = None
        if ok:
            self.journal.add(t="file", remote=rpath, size=int(entry["size"]), etag=etag, **{CHECKSUM: entry[CHECKSUM]})
        return ok

    def _send(self, part: RemotePart, local: Path, rpath: str, entry: dict[str, Any], task: Any) -> int:
        size = int(entry["size"])
        etag = self._local_digest(local, entry)
        cb = Callback(size, self.progress, task)
        try:
            info = self.remote.put_file(part, rpath, local, callback=cb, part_size=self.part_size)
        except FileNotFoundError as exc:
            if not local.exists():
                raise LocalProblem(f"{local} vanished during the upload") from None
            raise exc
        if int(info["size"]) != size:
            raise OSError(f"{rpath}: remote size {info['size']} != {size} after upload")
        if self.s3:
            if info.get("ETag") != etag:
                raise OSError(f"{rpath}: remote ETag {info.get('ETag')} != expected {etag} after upload")
        else:
            _, digest = file_checksum(rpath, opener=lambda p: self.fs.open(p, "rb"))
            if digest != entry[CHECKSUM]:
                raise OSError(f"{rpath}: remote checksum {digest} != {entry[CHECKSUM]} after upload")
        self.journal.add(t="file", remote=rpath, size=size, etag=info.get("ETag"), **{CHECKSUM: entry[CHECKSUM]})
        return size

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried on any error but :class:`LocalProblem` (``retries`` times, exponential backoff with
        jitter, at most 30 s a wait)."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except LocalProblem:
                raise
            except Exception as exc:  # noqa: BLE001 - transient until proven otherwise
                if attempt == self.retries:
                    raise
                delay = min(30.0, self.backoff * 2**attempt) * (0.5 + random.random())
                log.warning("%s: %s; retry %d/%d in %.1fs", what, exc, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def drop_partial(self, rdir: str) -> None:
        """Remove what this uploader sent of a checkpoint it will not finish (never a committed folder,
        never files it did not send)."""
        name = rdir.rsplit("/", 1)[-1]
        self.remote.abort(self.remote.part(0, name=name), sent=[p for p in self.journal.files
                                                                if p.startswith(rdir + "/")])

    def copy_problem(self, info: CheckpointInfo, rdir: str) -> str | None:
        """Why the remote copy of ``info`` cannot stand in for the local one (None: it can), from a fresh
        listing: the manifest's bytes, every file's size, and its S3 ETag (or, elsewhere, a read-back)."""
        assert info.manifest is not None
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(rdir)
        listing = self.remote.listing(rdir)
        if MANIFEST not in listing or self.fs.cat_file(join(rdir, MANIFEST)) != (info.path / MANIFEST).read_bytes():
            return f"{join(rdir, MANIFEST)} is missing or differs from the local manifest"
        for name, entry in info.manifest.files.items():
            rpath, r = join(rdir, name), listing.get(name)
            if r is None or r["size"] != int(entry["size"]):
                return f"{rpath} is missing or has the wrong size"
            j = self.journal.files.get(rpath)
            if self.s3 and j and j.get(CHECKSUM) == entry[CHECKSUM] and j.get("etag"):
                ok = j["etag"] == r.get("ETag")
            else:
                ok = self.matches(info.path / name, rpath, entry, r)
            if not ok:
                return f"{rpath} does not match the local file (ETag / checksum)"
        return None
