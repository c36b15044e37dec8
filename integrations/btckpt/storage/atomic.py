"""The one local commit: a checkpoint folder becomes visible all at once, or not at all.

Local protocol (DESIGN.md): make ``.checkpoint-<step>.tmp-<id>`` in the same parent; write and fsync every file;
write and fsync the manifest; fsync the folder; rename it to its final name; fsync the parent. Call order:
``begin()`` (once, by the node's leader) -> files written into ``tmp`` (any local rank) -> ``record()`` per file
-> ``commit(manifest)`` by the leader, or ``abort()`` on any failure.
Guarantees: a crash at any instant leaves either no folder of the final name or a complete one; an existing
one is never overwritten (a damaged one is replaced only on request, ``supersede``, and never half).

It lives in ``storage`` so that every local commit uses it: a save (:class:`btckpt.saving.destination.LocalDir`,
through :mod:`btckpt.saving.commit`, which adds the dir's writer lock and the deletes) and the download cache of
URL restores (:func:`btckpt.storage.remote.fetch`, a layer below ``saving``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format.checksum import CHECKSUM, new_hasher
from ..format.manifest import MANIFEST, Manifest
from ..testing import faults
from .local import fsync_dir, fsync_file, make_dirs, modes_in, new_tag, open_nofollow, space_error

__all__ = ["LocalCommit", "TEMP_FILE", "checkpoint_name", "rename_noreplace", "replace_file", "write_small_file"]

log = logging.getLogger("btckpt")

TEMP_FILE = re.compile(r"^\.(.+)\.tmp-(\d+)-[0-9a-f]{16}$")  # replace_file's temp: ``.<name>.tmp-<new_tag()>``


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with EEXIST if ``dst`` exists (even as an empty folder, which a
    plain ``rename`` would silently replace). Falls back to ``os.rename`` where renameat2 is missing."""
    fn = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if fn is not None:
        at_fdcwd, noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # else: the filesystem cannot; plain rename
            raise OSError(err, os.strerror(err), str(dst))
    os.rename(src, dst)


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def checkpoint_name(step: int) -> str:
    """The folder name of a committed checkpoint (matches HF's ``get_last_checkpoint``)."""
    return f"checkpoint-{step}"


def replace_file(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Make ``path`` hold ``data`` atomically: a temp file beside it (``.<name>.tmp-<tag>``, :data:`TEMP_FILE`;
    the folder's privacy decides its mode, no link followed), fsync, rename over ``path`` (``replace=False``: a
    hard link that fails when ``path`` exists, then False), fsync of the folder; True when ``path`` holds
    ``data``. A crash leaves ``path`` whole or absent, and at most the temp file, which the dir's next writer
    removes (:func:`btckpt.saving.commit.remove_stale_temps`); a failure here removes it at once."""
    tmp = path.parent / f".{path.name}.tmp-{new_tag()}"
    try:
        write_small_file(tmp, data)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def write_small_file(path: Path, data: bytes) -> tuple[int, str]:
    """Write ``data`` to a new file (0600 in a private folder, :func:`~btckpt.storage.local.modes_in`), fsync it,
    and return ``(size, checksum)``."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
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

    def __init__(self, root: Path, step: int, *, tag: str | None = None, name: str | None = None,
                 supersede: bool = False) -> None:
        """``supersede``: the caller found the folder of this step damaged (its bytes do not verify) and replaces
        it with the verified copy this commit writes: :meth:`begin` accepts the existing folder, and
        :meth:`commit` sets it aside only once the new copy is written and synced, renames the new one into
        place, then removes the old one (a crash in between leaves temp folders, never a folder in place that
        is half one copy and half the other; the step's source, e.g. the tier, still holds it)."""
        self.supersede = supersede
        self.root = Path(root)
        self.step = step
        self.tag = tag or new_tag()  # every rank of a node passes the same (agreed, random) tag
        self.tmp = self.root / f".{checkpoint_name(step)}.tmp-{self.tag}"
        self.final = self.root / (name or checkpoint_name(step))  # name: one-shot saves to a chosen folder
        self.files: dict[str, dict[str, Any]] = {}
        self._created = False

    def begin(self) -> Path:
        """Create the temp folder (leader only). Refuses when the step already exists."""
        if (self.final.exists() or self.final.is_symlink()) and not self.supersede:
            raise CheckpointError(f"{self.final} already exists; btckpt never overwrites a checkpoint in place. "
                                  "Save under a new step, or move that folder away")
        try:
            make_dirs(self.root)
            self.tmp.mkdir(modes_in(self.root)[0])  # inside a private folder (a local tier) private too
        except FileExistsError:
            raise CheckpointError(f"{self.tmp} already exists: two writers share the tag {self.tag!r}; "
                                  "give each writer its own tag (btckpt.saving.commit.new_tag())") from None
        except OSError as exc:
            raise space_error(exc, self.tmp) from exc
        self._created = True
        return self.tmp

    def record(self, name: str, size: int, checksum: str) -> None:
        """Note a file written into the temp folder (by any rank) for the manifest."""
        self.files[name] = {"size": size, CHECKSUM: checksum}

    def commit(self, manifest: Manifest | bytes) -> Path:
        """Write the manifest last, fsync, rename into place, fsync the parent. Leader only. ``manifest``: its files
        are set from what was recorded; or a committed manifest's exact bytes, written as they are."""
        if isinstance(manifest, Manifest):
            manifest.files = dict(sorted(self.files.items()))
            data = manifest.to_json()
        else:
            data = manifest
        try:
            faults.point("before_manifest")
            write_small_file(self.tmp / MANIFEST, data)
            faults.point("after_manifest")
            fsync_dir(self.tmp)
            faults.point("before_rename")
            aside = self._set_aside()
            try:
                rename_noreplace(self.tmp, self.final)
            except OSError as exc:
                if aside is not None:  # put the old copy back: a failed commit changes nothing
                    os.rename(aside, self.final)
                    aside = None
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
                if aside is not None:
                    os.rename(aside, self.final)
                raise
        except OSError as exc:
            raise space_error(exc, self.tmp) from exc
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.final

    def _set_aside(self) -> Path | None:
        """With ``supersede``: rename the damaged folder in place to a temp name (removed at the next start if a
        crash comes first); the new name, or None when there is nothing to set aside."""
        if not self.supersede or not (self.final.exists() or self.final.is_symlink()):
            return None
        aside = self.root / f".{checkpoint_name(self.step)}.tmp-{self.tag}-damaged"
        os.rename(self.final, aside)
        fsync_dir(self.root)
        log.warning("btckpt: %s is damaged; replaced by a verified copy of its step", self.final)
        return aside

    def _unpublish(self, exc: OSError) -> None:
        """The rename happened but could not be made durable: take it back, so an error means "not committed"."""
        try:
            os.rename(self.final, self.tmp)
        except OSError:
            raise CheckpointError(f"{self.final} was renamed into place but the parent folder could not be "
                                  f"synced ({exc}); it may not survive a power loss. Verify it, or delete it "
                                  "and save again") from exc

    def abort(self) -> None:
        """Remove the temp folder this commit created (best effort); the commit never becomes visible.
        Nothing is removed when :meth:`begin` did not create it (another writer's folder stays)."""
        if self._created:
            shutil.rmtree(self.tmp, ignore_errors=True)
