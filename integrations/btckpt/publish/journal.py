"""What the uploader knows about what it sent: the journal of uploaded files, the lock on the source
folder, the S3 ETag of a local file (to compare with the bucket's without downloading), and the progress
callback (which also carries the ``upload_file`` fault point)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..format.checksum import new_hasher
from ..storage.local import open_nofollow, read_nofollow, state_dir
from ..testing import faults

__all__ = ["s3_etag", "Journal", "Callback", "SourceLock"]

log = logging.getLogger("btckpt.upload")
_CHUNK = 8 << 20


def s3_etag(path: Path, *, part_size: int) -> tuple[str, str]:
    """``(xxh3_64, etag)`` of a local file: the ETag S3 gives it when uploaded with ``part_size`` parts."""
    size = path.stat().st_size
    h = new_hasher()
    parts = []
    single = size < min(5 * 2**30, 2 * part_size)
    whole = hashlib.md5(usedforsecurity=False) if single else None
    with open(path, "rb", buffering=0) as f:
        while True:
            part = hashlib.md5(usedforsecurity=False)
            left = part_size
            got = 0
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                (whole or part).update(chunk)
                left -= len(chunk)
                got += len(chunk)
            if got and not single:
                parts.append(part.digest())
            if got < part_size:
                break
    if whole is not None:
        return h.hexdigest(), f'"{whole.hexdigest()}"'
    return h.hexdigest(), f'"{hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"'


class SourceLock:
    """One uploader per source folder: an exclusive ``flock`` on ``SRC/.btckpt-upload.lock``.

    Without it a ``--mirror-retention`` uploader and a ``--keep-local`` uploader could act on each other's
    decisions. :meth:`acquire` raises :class:`CheckpointError` naming the holder's pid (``wait=False``) or
    blocks until the holder exits (``wait=True``, the supervised uploader after a restart).
    """

    NAME = ".btckpt-upload.lock"

    def __init__(self, src: Path) -> None:
        self.path = src / self.NAME
        self.fd: int | None = None

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock (no-op when this object holds it)."""
        if self.fd is not None:
            return
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, mode=0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open the upload lock {self.path} ({exc.strerror}); SRC must be an "
                              "existing, writable checkpoint folder (and the lock not a link)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise ConfigError(f"the upload lock {self.path} is not a plain file of its own (a hard link or "
                                  "a special file); btckpt never writes into it. Remove it and start again")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(f"cannot lock {self.path} ({exc.strerror}): the filesystem may not "
                                      "support flock; run the uploader from a machine where it does") from None
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not wait:
                    raise CheckpointError(f"another uploader (pid {holder}) is already uploading from "
                                          f"{self.path.parent} (it holds {self.path}); one uploader per source: "
                                          "stop it first, or wait for it to finish") from None
                log.info("waiting for the uploader pid %s to finish with %s", holder, self.path.parent)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class Journal:
    """Append-only record of verified uploads (one JSON object a line), safe across kills."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        self.ckpts: dict[str, str] = {}
        self.offloaded: set[str] = set()
        self._lock = threading.Lock()
        state_dir(path.parent)  # inside SRC, which must exist: never re-created here; never a link or another's
        if os.path.lexists(path):
            for line in read_nofollow(path).decode(errors="replace").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                self._apply(r)

    def _apply(self, r: dict[str, Any]) -> None:
        t = r.get("t")
        if t == "file":
            self.files[r["remote"]] = r
        elif t == "ckpt":
            self.ckpts[r["remote"]] = r["manifest"]
        elif t == "gone":
            self.ckpts.pop(r["remote"], None)
        elif t == "stale":  # the remote copy failed a check: trust nothing recorded under it
            self.ckpts.pop(r["remote"], None)
            for p in [p for p in self.files if p.startswith(r["remote"] + "/")]:
                del self.files[p]
        elif t == "offloaded":
            self.offloaded.add(r["remote"])

    def add(self, **r: Any) -> None:
        with self._lock:
            self._apply(r)
            with open(open_nofollow(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode=0o644), "a") as f:
                f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())


class Callback:
    """fsspec-style progress callback: feeds the progress bar and the ``upload_file`` fault point."""

    def __init__(self, size: int, progress: Any, task: Any) -> None:
        self.size, self.sent, self.progress, self.task = size, 0, progress, task

    def set_size(self, size: int) -> None:
        self.size = size

    def relative_update(self, inc: int = 1) -> None:
        self.sent += inc
        if self.progress is not None:
            self.progress.update(self.task, advance=inc)
        if 0 < self.sent < self.size:
            faults.point("upload_file")  # mid-file: tests kill the uploader here

    def absolute_update(self, value: int) -> None:
        self.relative_update(value - self.sent)

    def branched(self, *a: Any, **k: Any) -> None:
        return None

    def call(self, *a: Any, **k: Any) -> None:
        return None
