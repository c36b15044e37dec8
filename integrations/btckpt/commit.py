"""The commit: a checkpoint becomes visible all at once, or not at all.

Local protocol (DESIGN.md): make ``.checkpoint-<step>.tmp-<id>`` in the same parent; write and fsync
every file; write and fsync the manifest; fsync the folder; rename it to ``checkpoint-<step>``; fsync the
parent. Call order: ``begin()`` (once, by the node's leader) -> files written into ``tmp`` (any local rank)
-> ``record()`` per file -> ``commit(manifest)`` by the leader, or ``abort()`` on any failure.
Guarantees: a crash at any instant leaves either no ``checkpoint-<step>`` or a complete one; an existing
step is never overwritten; a temp folder is never listed or loaded and is removed at the next start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from . import faults
from .errors import CheckpointError, ConfigError
from .manifest import MANIFEST, Manifest
from .storage import fsync_dir, fsync_file, space_error

__all__ = ["LocalCommit", "DirLock", "TMP_PATTERN", "checkpoint_name", "remove_stale_temps", "delete_checkpoint",
           "write_small_file"]

TMP_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.tmp-(.+)$")


def checkpoint_name(step: int) -> str:
    """The folder name of a committed checkpoint (matches HF's ``get_last_checkpoint``)."""
    return f"checkpoint-{step}"


def write_small_file(path: Path, data: bytes) -> tuple[int, str]:
    """Write ``data`` to a new file, fsync it, and return ``(size, checksum)``."""
    from .storage import new_hasher

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fsync_file(fd)
    finally:
        os.close(fd)
    h = new_hasher()
    h.update(data)
    return len(data), h.hexdigest()


class LocalCommit:
    """One checkpoint's commit into a local folder. See the module docstring for the call order."""

    def __init__(self, root: Path, step: int, *, tag: str | None = None, name: str | None = None) -> None:
        self.root = Path(root)
        self.step = step
        self.tag = tag or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.root / f".{checkpoint_name(step)}.tmp-{self.tag}"
        self.final = self.root / (name or checkpoint_name(step))  # name: one-shot saves to a chosen folder
        self.files: dict[str, dict[str, Any]] = {}

    def begin(self) -> Path:
        """Create the temp folder (leader only). Refuses when the step already exists."""
        if self.final.exists() or self.final.is_symlink():
            raise CheckpointError(f"{self.final} already exists; btckpt never overwrites a checkpoint in place. "
                                  "Save under a new step, or move that folder away")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise space_error(exc, self.tmp) from exc
        return self.tmp

    def record(self, name: str, size: int, checksum: str) -> None:
        """Note a file written into the temp folder (by any rank) for the manifest."""
        self.files[name] = {"size": size, "xxh3_64": checksum}

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest last, fsync, rename into place, fsync the parent. Leader only."""
        manifest.files = dict(sorted(self.files.items()))
        try:
            faults.point("before_manifest")
            write_small_file(self.tmp / MANIFEST, manifest.to_json())
            faults.point("after_manifest")
            fsync_dir(self.tmp)
            faults.point("before_rename")
            try:
                os.rename(self.tmp, self.final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise CheckpointError(
                        f"{self.final} was created by another writer while this save ran; two processes are "
                        "saving the same step into the same folder. Give each job its own checkpoint dir"
                    ) from None
                raise
            try:
                faults.point("after_rename")
                fsync_dir(self.root)
            except OSError as exc:
                self._unpublish(exc)
                raise
        except OSError as exc:
            raise space_error(exc, self.tmp) from exc
        return self.final

    def _unpublish(self, exc: OSError) -> None:
        """The rename happened but could not be made durable: take it back, so an error means "not committed"."""
        try:
            os.rename(self.final, self.tmp)
        except OSError:
            raise CheckpointError(f"{self.final} was renamed into place but the parent folder could not be "
                                  f"synced ({exc}); it may not survive a power loss. Verify it, or delete it "
                                  "and save again") from exc

    def abort(self) -> None:
        """Remove the temp folder (best effort); the commit never becomes visible."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove leftover ``.checkpoint-*.tmp-*`` folders of dead writers under ``root``; return them.

    Call once at start, by the node's leader, while holding the folder's writer lock. A temp folder
    whose tag names a live process on this host is left alone (another writer may be mid-save).
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = TMP_PATTERN.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = m.group(2).split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def delete_checkpoint(path: Path, *, retired: bool = True) -> None:
    """Retire a committed checkpoint: rename it to a temp name first (atomic), then remove the files.

    A crash mid-delete therefore leaves a temp folder (cleaned at the next start), never a
    ``checkpoint-<step>`` with some files missing. ``retired`` (the job's retention) first records it
    for an uploader working on that dir (:mod:`btckpt.retire`): the only thing that lets mirror retention
    delete the remote copy; the uploader's own ``--keep-local`` offload passes False.
    """
    faults.point("retention")
    if retired:
        from .retire import record_retired

        record_retired(path)
    m = re.match(r"^checkpoint-(\d+)$", path.name)
    step = m.group(1) if m else "x"
    doomed = path.parent / f".checkpoint-{step}.tmp-{os.getpid()}-del{uuid.uuid4().hex[:6]}"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


class DirLock:
    """The one writer of a checkpoint dir: an exclusive ``flock`` on ``<dir>/.btckpt.lock``.

    Taken by each node's local leader when its Checkpointer starts (creating the dir), then stale temp
    folders of dead writers are removed; released by :meth:`release` (``close()``). A second process
    saving into the same dir gets a :class:`CheckpointError` naming the holder; nothing is touched.
    """

    def __init__(self, root: Path) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / ".btckpt.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"checkpoint dir {str(root)!r} is not writable ({exc.strerror}); point dir / "
                              "$BT_CHECKPOINT_DIR at a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CheckpointError(f"another process ({owner or 'unknown'}) is already saving checkpoints into "
                                  f"{root}; give each job (and each node) its own checkpoint dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._fd: int | None = fd
        try:
            self.removed = remove_stale_temps(root)
        except BaseException:  # a refused start must not leave the lock behind
            self.release()
            raise

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
