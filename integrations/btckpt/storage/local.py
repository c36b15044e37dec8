"""Filesystem mechanics: durable local writes (fsync), free space, and fsspec access for URLs.

Local paths take the fast path (os calls); anything with a ``scheme://`` goes through fsspec.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InsufficientSpace
from ..names import remember_secrets

__all__ = [
    "preflight", "is_url", "fsync_dir", "fsync_file", "free_bytes", "remote_fs", "space_error", "unwritable",
    "is_private", "modes_in", "make_dirs", "open_nofollow", "owner_name", "unsafe_dir", "private_dir",
    "state_dir", "read_nofollow",
]

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC




def new_tag() -> str:
    """A writer's tag for temp names: ``<pid>-<16 random hex>``, unique across threads, processes and hosts
    (containers on a shared filesystem often have the same pid on every host; the token makes the difference)."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"

def is_url(path: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as ``s3://bucket/x`` (but not ``file://``, which maps to local)."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def unwritable(folder: Path) -> str | None:
    """Why this process could not create checkpoints in ``folder`` (it, or the nearest folder above it that
    exists, is not writable and searchable by the effective uid), or None. Root passes every check."""
    q = folder
    while not q.exists() and q != q.parent:
        q = q.parent
    eff = os.access in os.supports_effective_ids
    if q.is_dir() and not os.access(q, os.W_OK | os.X_OK, effective_ids=eff):
        what = "it" if q == folder else f"{str(q)!r}, where it would be created,"
        return f"{what} is not writable by this process (uid {os.geteuid()})"
    return None


def local_path(path: str | os.PathLike[str]) -> Path:
    """A local Path for a plain path or a ``file://`` URL."""
    s = os.fspath(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def remote_fs(url: str) -> tuple[Any, str]:
    """``(filesystem, path)`` for an fsspec URL."""
    import fsspec  # ~0.1 s: only when a URL is used (``btckpt ls ./local`` and local training never pay it)

    remember_secrets(url)  # credentials in the URL are redacted from every later log line and error
    fs, p = fsspec.core.url_to_fs(url)
    return fs, p


def fsync_file(fd: int) -> None:
    """fsync a file descriptor (fdatasync would skip the size metadata we rely on)."""
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making the names inside it (creates, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes available to this user on the filesystem holding ``path`` (or its nearest parent)."""
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return shutil.disk_usage(p).free


def space_error(exc: OSError, where: str | os.PathLike[str]) -> CheckpointError:
    """Map an OSError from writing into the right CheckpointError (ENOSPC/EDQUOT -> InsufficientSpace)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{where}: the filesystem ran out of space while writing the checkpoint "
                                 f"({exc.strerror}); free space or lower keep_last. Nothing was committed; "
                                 "older checkpoints are intact")
    return CheckpointError(f"{where}: writing the checkpoint failed: {exc}. Nothing was committed; "
                           "older checkpoints are intact")


def preflight(root: Path, nbytes: int, *, margin: int) -> None:
    """Refuse (``InsufficientSpace``, with the numbers) a write of ``nbytes`` that would leave under
    ``margin`` bytes free on ``root``'s filesystem; called before anything is written."""
    free = free_bytes(root)
    if free < nbytes + margin:
        raise InsufficientSpace(f"{root}: the checkpoint needs {nbytes / 1e6:.1f} MB plus a {margin / 1e6:.0f} MB "
                                f"margin, but only {free / 1e6:.1f} MB are free; free space, lower keep_last, or "
                                "point dir at a larger volume. Nothing was written")


# -- shared places (DESIGN.md "Shared places") ------------------------------------------------------------------
def is_private(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` (followed) grants nothing to group and others (0700): what btckpt creates directly in
    it stays private (:func:`modes_in`). A local tier is (and every folder btckpt makes in it); a durable dir
    btckpt creates follows the umask (a dir the user made 0700 keeps its files to the user too)."""
    try:
        return not os.stat(folder).st_mode & 0o077
    except OSError:
        return False


def modes_in(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(folder mode, file mode)`` for what btckpt creates in ``folder``: 0700/0600 inside a private folder,
    else 0777/0644 (the umask decides, as it always did in a durable dir)."""
    return (0o700, 0o600) if is_private(folder) else (0o777, 0o644)


def make_dirs(path: str | os.PathLike[str], *, private: bool = False) -> None:
    """``mkdir -p path``: the missing folders as the umask says, or 0700 (``private``: in a local tier)."""
    p = Path(path)
    if p.is_dir():
        return
    if p.parent != p:
        make_dirs(p.parent, private=private)
    try:
        os.mkdir(p, 0o700 if private else 0o777)
    except FileExistsError:
        if not p.is_dir():
            raise


def open_nofollow(path: str | os.PathLike[str], flags: int, *, mode: int | None = None) -> int:
    """``os.open`` that never follows a link at the last component (ELOOP instead) and is not inherited by
    children; ``mode`` defaults to :func:`modes_in` of the file's folder."""
    if mode is None and flags & os.O_CREAT:
        mode = modes_in(Path(path).parent)[1]
    return os.open(path, flags | NOFOLLOW, 0o644 if mode is None else mode)


def owner_name(uid: int) -> str:
    """``uid 1000 (alice)``: a uid for a message, with its user name when known."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def unsafe_dir(path: str | os.PathLike[str], *, private: bool) -> str | None:
    """Why ``path`` must not be written through or trusted (checked with ``lstat``): not a folder, a link,
    owned by another uid than the effective one, writable by group or others, or (``private``) readable by
    them; None when it is fine or does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link (owned by {owner_name(st.st_uid)})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder (owned by {owner_name(st.st_uid)})"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {owner_name(st.st_uid)}, not by this process ({owner_name(os.geteuid())})"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if private and st.st_mode & 0o077:
        return f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir(path: str | os.PathLike[str], *, tighten: bool = True) -> str | None:
    """Make ``path`` a private folder of this process (0700, owned by the effective uid, not a link): create it
    (its parent must exist), or (``tighten``) take group/other read access away from one of ours that nobody
    else could write into; the reason (as :func:`unsafe_dir`) when it is not usable, then nothing was changed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    problem = unsafe_dir(path, private=False)
    if problem is not None:
        return problem
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:  # swapped meanwhile
            return f"{path} changed while it was checked (now owned by {owner_name(st.st_uid)})"
        if tighten and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours, and nobody else could write into it: only reads are taken away
    finally:
        os.close(fd)
    return None


def state_dir(path: str | os.PathLike[str]) -> Path:
    """The folder ``path`` that btckpt keeps state in inside a checkpoint dir (e.g. ``<dir>/.btckpt-upload``):
    created (umask) when missing; a link, another uid's, or one others can write is refused (ConfigError:
    the path, the owner, the fix) and nothing is written through it."""
    p = Path(path)
    try:
        os.mkdir(p)
    except FileExistsError:
        pass
    problem = unsafe_dir(p, private=False)
    if problem is not None:
        from ..errors import ConfigError

        raise ConfigError(f"{problem}; btckpt keeps its state there and never writes through a folder another "
                          f"user controls. Remove {p} (its owner, or root, can) and start again")
    return p


def read_nofollow(path: str | os.PathLike[str], *, limit: int = 1 << 30) -> bytes:
    """The bytes of the regular file ``path``, opened without following a link (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks = []
        while limit > 0:
            b = os.read(fd, min(limit, 8 << 20))
            if not b:
                break
            chunks.append(b)
            limit -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)
