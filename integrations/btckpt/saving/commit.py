"""The commit: a checkpoint becomes visible all at once, or not at all.

The local mechanism behind :class:`btckpt.saving.destination.LocalDir` (whose ``Destination`` protocol gives
the call order every destination shares). Local protocol (DESIGN.md): make ``.checkpoint-<step>.tmp-<id>`` in
the same parent; write and fsync every file; write and fsync the manifest; fsync the folder; rename it to
``checkpoint-<step>``; fsync the parent. Call order: ``begin()`` (once, by the node's leader) -> files written
into ``tmp`` (any local rank) -> ``record()`` per file -> ``commit(manifest)`` by the leader, or ``abort()`` on
any failure.
Guarantees: a crash at any instant leaves either no ``checkpoint-<step>`` or a complete one; an existing
step is never overwritten; a temp folder is never listed or loaded and is removed at the next start.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..format.checksum import CHECKSUM, new_hasher
from ..format.manifest import MANIFEST, Manifest
from ..storage.local import fsync_dir, fsync_file, make_dirs, modes_in, new_tag, open_nofollow, space_error
from ..testing import faults
from .retired import record_retired

__all__ = ["LocalCommit", "DirLock", "LOCK", "TMP_PATTERN", "checkpoint_name", "remove_stale_temps",
           "delete_checkpoint", "write_small_file", "new_tag", "rename_noreplace"]

log = logging.getLogger("btckpt")

LOCK = ".btckpt.lock"
TMP_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.tmp-(.+)$")
NO_LOCK_ENV = "BTCKPT_NO_LOCK"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path, *, locked: bool = False) -> list[Path]:
    """Remove leftover ``.checkpoint-*.tmp-*`` folders under ``root``; return them.

    ``locked``: the caller holds ``root``'s writer lock (:class:`DirLock`) and has created nothing yet, so
    every temp folder there is stale, whatever pid its name records (pids are reused, and repeat across
    hosts). Without the lock, a temp folder whose tag names a live process on this host is left alone
    (another writer may be mid-save).
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = TMP_PATTERN.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = m.group(2).split("-")[0]
        if not locked and pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def delete_checkpoint(path: Path, *, retired: bool = True, salvage: Callable[[Path], object] | None = None) -> None:
    """Retire a committed checkpoint: rename it to a temp name first (atomic), then remove the files.

    A crash mid-delete therefore leaves a temp folder (cleaned at the next start), never a
    ``checkpoint-<step>`` with some files missing. ``retired`` (the job's retention) first records it
    for an uploader working on that dir (:mod:`btckpt.saving.retired`): the only thing that lets mirror retention
    delete the remote copy; the uploader's own ``--keep-local`` offload passes False. ``salvage(folder)`` runs on
    the renamed folder before its files go (a local tier's Stager takes its file arena back:
    :meth:`btckpt.saving.snapshot.Stager.reclaim`); its error is logged, the folder removed all the same.
    """
    faults.point("retention")
    if retired:
        record_retired(path)
    m = re.match(r"^checkpoint-(\d+)$", path.name)
    step = m.group(1) if m else "x"
    doomed = path.parent / f".checkpoint-{step}.tmp-{new_tag()}-del"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    if salvage is not None:
        try:
            salvage(doomed)
        except OSError as exc:
            log.warning("btckpt: could not take back the staged files of %s: %s", path, exc)
    shutil.rmtree(doomed, ignore_errors=True)


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirLock:
    """The one writer of a checkpoint dir: an exclusive ``flock`` on ``<dir>/.btckpt.lock``.

    The lock file is opened without following a link and written only when it is a plain file with one name
    (a link or hard link planted there is refused: :class:`CheckpointError`, nothing written through it);
    0600 in a private folder (a local tier), else as the umask says.

    Taken by each node's local leader when its Checkpointer starts (creating the dir), then every temp
    folder there is removed (the holder has written none yet); released by :meth:`release` (``close()``).
    A second process saving into the same dir gets a :class:`CheckpointError` naming the holder; nothing
    is touched. On a filesystem without ``flock`` (Lustre ``-o noflock``, some NFS) it raises a
    :class:`ConfigError` saying so, unless ``$BTCKPT_NO_LOCK=1`` (then it runs unlocked, with a warning,
    and only temp folders of dead local pids are removed).
    """

    def __init__(self, root: Path) -> None:
        try:
            make_dirs(root)
            # never through a link (ELOOP), and the file is checked before anything is written into it
            fd = open_nofollow(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{root / LOCK} is a symbolic link; btckpt never writes through one. "
                                      "Remove it (and check who planted it)") from None
            raise ConfigError(f"checkpoint dir {str(root)!r} is not writable ({exc.strerror}); point dir / "
                              "$BT_CHECKPOINT_DIR at a writable folder") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise CheckpointError(f"{root / LOCK} is not a plain file of its own ("
                                  f"{'a hard link' if stat.S_ISREG(st.st_mode) else 'not a regular file'}); "
                                  "btckpt never writes into it. Remove it (and check who put it there)")
        self._fd: int | None = fd
        locked = self._flock(root)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        try:
            self.removed = remove_stale_temps(root, locked=locked)
        except BaseException:  # a refused start must not leave the lock behind
            self.release()
            raise

    def _flock(self, root: Path) -> bool:
        """Take the lock; True when held, False when running unlocked by request ($BTCKPT_NO_LOCK)."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            err = exc
        if err.errno in _HELD:
            owner = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            self.release()
            raise CheckpointError(f"another process ({owner or 'unknown'}) is already saving checkpoints into "
                                  f"{root}; give each job (and each node) its own checkpoint dir") from None
        if err.errno in _NO_FLOCK and os.environ.get(NO_LOCK_ENV, "") == "1":
            log.warning("btckpt: %s is on a filesystem without flock (%s); running WITHOUT the writer lock "
                        "because $%s=1: make sure no other job writes into this dir", root, err.strerror, NO_LOCK_ENV)
            self.release()
            return False
        self.release()
        if err.errno in _NO_FLOCK:
            raise ConfigError(f"{root}: the filesystem does not support flock ({err.strerror}), so btckpt cannot "
                              "make sure it is the only writer of this dir (Lustre mounted with -o noflock, some "
                              "NFS setups). Mount it with -o flock (or -o localflock), point dir / "
                              f"$BT_CHECKPOINT_DIR at another filesystem, or set ${NO_LOCK_ENV}=1 to run unlocked "
                              "when you are sure one job writes there") from None
        raise CheckpointError(f"{root}/.btckpt.lock: locking failed ({err.strerror}); nothing was written. Check "
                              "the filesystem, or point dir / $BT_CHECKPOINT_DIR elsewhere") from None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
