"""The commit: a checkpoint becomes visible all at once, or not at all.

The local mechanism behind :class:`btckpt.saving.destination.LocalDir` (whose ``Destination`` protocol gives
the call order every destination shares). The commit itself, :class:`LocalCommit` (temp folder, fsync, manifest
last, atomic rename, parent fsync), is :mod:`btckpt.storage.atomic`'s (the download cache commits through it too);
this module adds the dir's one-writer lock (:class:`DirLock`), the removal of stale temp folders, and the delete
of a committed checkpoint (renamed away first).
Guarantees: a crash at any instant leaves either no ``checkpoint-<step>`` or a complete one; an existing
step is never overwritten; a temp folder is never listed or loaded and is removed at the next start.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..storage.atomic import TEMP_FILE, LocalCommit, checkpoint_name, rename_noreplace, write_small_file
from ..storage.local import fsync_dir, make_dirs, new_tag, open_nofollow
from ..testing import faults
from .retired import record_retired

__all__ = ["LocalCommit", "DirLock", "LOCK", "TMP_PATTERN", "checkpoint_name", "remove_stale_temps",
           "delete_checkpoint", "write_small_file", "new_tag", "rename_noreplace"]

log = logging.getLogger("btckpt")

LOCK = ".btckpt.lock"
TMP_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.tmp-(.+)$")
NO_LOCK_ENV = "BTCKPT_NO_LOCK"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path, *, locked: bool = False) -> list[Path]:
    """Remove leftover ``.checkpoint-*.tmp-*`` folders and :func:`~btckpt.storage.atomic.replace_file` temp files
    (``.<name>.tmp-<pid>-<hex>``: a link file or record cut short by a kill) under ``root``; return them.

    ``locked``: the caller holds ``root``'s writer lock (:class:`DirLock`) and has created nothing yet, so
    every temp folder there is stale, whatever pid its name records (pids are reused, and repeat across
    hosts). Without the lock, a temp folder whose tag names another live process on this host is left alone
    (another writer may be mid-save). A temp file is left alone while its pid lives (this process included),
    lock or not: a tier's claimers write theirs into a dir another process holds. Links are never followed.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = TMP_PATTERN.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            if locked or not _live_writer(m.group(2).split("-")[0]):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        f = TEMP_FILE.match(entry.name)
        if f and not _pid_alive(int(f.group(2))):
            try:
                if stat.S_ISREG(entry.lstat().st_mode):
                    entry.unlink()
                    removed.append(entry)
            except OSError:  # gone already, or not ours to remove (a sticky folder): left as it is
                pass
    return removed


def _live_writer(pid: str) -> bool:
    """Whether a temp name's pid may be a writer still at work: another live process on this host (the caller
    itself has none in flight)."""
    return pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))


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

    @classmethod
    def taken(cls, root: Path) -> DirLock:
        """The lock on ``root``, the unfinished folders of an earlier run it removed logged (a Checkpointer's start)."""
        lock = cls(root)
        if lock.removed:
            log.warning("btckpt: removed %d unfinished checkpoint folder(s) or file(s) from an earlier run: %s",
                        len(lock.removed), ", ".join(p.name for p in lock.removed))
        return lock

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
