"""Opening and reading the files of a checkpoint folder: the one safe way in.

Torch-free. Names are checked (relative, inside the folder), only regular files are opened (never a FIFO,
device or link out), reads are bounded, and every OSError becomes a CheckpointError naming the file.
The manifest (:mod:`btckpt.format.manifest`) and the safetensors header reader (:mod:`btckpt.format.header`) read
through it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError, CorruptCheckpoint, IncompleteCheckpoint, UnsafeCheckpoint

__all__ = ["check_relative_name", "short_repr", "file_kind", "read_error", "open_regular", "member_path",
           "open_member", "read_member", "read_upto"]


def check_relative_name(name: Any, *, where: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside the folder, else raise UnsafeCheckpoint.

    Every component must be a real name: no empty part, no ``.`` or ``..``, no backslash, no NUL."""
    if not isinstance(name, str) or not name:
        raise UnsafeCheckpoint(f"{where}: file name {short_repr(name)} is not a non-empty string")
    parts = name.split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise UnsafeCheckpoint(f"{where}: file name {name!r} is absolute; manifests may only name files "
                               "inside the checkpoint folder")
    if any(part in ("..", ".", "") for part in parts) or "\\" in name or "\x00" in name:
        raise UnsafeCheckpoint(f"{where}: file name {name!r} is not a plain name of a file inside the checkpoint "
                               "folder (empty part, '.', '..', backslash or NUL)")
    return name


def short_repr(x: Any, n: int = 120) -> str:
    """``repr(x)``, cut to ``n`` characters (for messages quoting a value read from a checkpoint)."""
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


# -- opening files of a checkpoint: regular files only, never blocking --------------------------------------
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    return next((k for test, k in _KINDS if test(mode)), "not a regular file")


def read_error(path: Any, exc: OSError) -> CheckpointError:
    """The CheckpointError for an OSError met while reading ``path`` (missing: incomplete; else damaged)."""
    if isinstance(exc, FileNotFoundError):
        return IncompleteCheckpoint(f"{path}: file is missing; the checkpoint is incomplete, use an older one")
    return CorruptCheckpoint(f"{path}: cannot be read ({exc.strerror or exc}); the storage failed or the file is "
                             "damaged: use an older checkpoint, or check the filesystem and retry")


def open_regular(path: str | os.PathLike[str], *, where: Any = None) -> BinaryIO:
    """Open a local file for reading (unbuffered), refusing anything but a regular file.

    A FIFO, socket, device, directory or symbolic link is refused with a CheckpointError naming ``where``
    (default: ``path``) before it can block or be followed: ``lstat`` first, then ``open`` with
    ``O_NOFOLLOW | O_NONBLOCK``, then ``fstat`` of the descriptor (the same file, still regular), then
    blocking mode is restored. The open file holds a shared ``flock`` while it is read (:func:`_share`).
    Every way this can fail raises a CheckpointError."""
    where = path if where is None else where
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            cls = UnsafeCheckpoint if stat.S_ISLNK(st.st_mode) else CorruptCheckpoint
            raise cls(f"{where}: is {file_kind(st.st_mode)}, not a regular file; refusing to open it (a checkpoint "
                      "holds regular files only): use an older checkpoint or delete this folder")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeCheckpoint(f"{where}: is a symbolic link; refusing to follow it") from None
        raise read_error(where, exc) from None
    try:
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise CorruptCheckpoint(f"{where}: was replaced while being opened (now {file_kind(st2.st_mode)}); "
                                    "refusing to read it")
        os.set_blocking(fd, True)
        _share(fd, path, st, where)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise read_error(where, exc) from None
        raise


def _share(fd: int, path: str | os.PathLike[str], st: os.stat_result, where: Any) -> None:
    """Take a shared ``flock`` on the opened file (held until it is closed), then check that ``path`` still
    names it. A local tier reuses a retired step's files for a new snapshot only when it can lock each one
    exclusively (:meth:`btckpt.saving.arena.FileArena.reclaim`), after renaming the step's folder away: so a
    file a btckpt reader holds never changes under it, and one taken back while it was being opened is found
    missing here. Never blocks: a file locked exclusively (being taken back, or by another tool) or a
    filesystem without flock is read unlocked, after the same check."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pass
    try:
        now = os.lstat(path)
    except OSError as exc:
        raise read_error(where, exc) from None
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise CorruptCheckpoint(f"{where}: was replaced while being opened; refusing to read it")


def member_path(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder/name`` after checking the name, refusing anything that resolves outside the folder."""
    folder = Path(folder)
    check_relative_name(name, where=str(folder))
    path = folder / name
    try:
        root, real = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, or an unreadable parent
        raise UnsafeCheckpoint(f"{path}: cannot be resolved ({exc}); refusing to read it") from None
    if root != real and root not in real.parents:
        raise UnsafeCheckpoint(f"{path}: resolves to {real}, outside the checkpoint folder {root}; refusing "
                               "to read it (a link out of the folder)")
    return path


def open_member(folder: str | os.PathLike[str], name: str) -> BinaryIO:
    """Open the listed file ``name`` of the checkpoint ``folder`` for reading: the one safe way in.

    The name is checked (relative, inside), a link may point only inside the folder, and the file it
    ends at must be a regular file (:func:`open_regular`)."""
    path = member_path(folder, name)
    return open_regular(path.resolve() if path.is_symlink() else path, where=path)


def read_member(folder: str | os.PathLike[str], name: str, *, limit: int) -> bytes:
    """The bytes of the listed file ``name`` (at most ``limit``; more is an error naming the file)."""
    path = Path(folder) / name
    with open_member(folder, name) as f:
        data = read_upto(f, limit + 1, where=path)
    if len(data) > limit:
        raise CorruptCheckpoint(f"{path}: larger than {limit} bytes; not a file btckpt wrote")
    return data


def read_upto(f: BinaryIO, n: int, *, where: Any) -> bytes:
    """Read up to ``n`` bytes (fewer only at the end of the file), turning OSErrors into CheckpointErrors."""
    out = bytearray()
    try:
        while len(out) < n:
            chunk = f.read(min(n - len(out), 16 << 20))
            if not chunk:
                break
            out += chunk
    except OSError as exc:
        raise read_error(where, exc) from None
    return bytes(out)
