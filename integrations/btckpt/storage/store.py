"""Where checkpoints are read from: one small ``Store`` protocol, for local folders and fsspec URLs alike.

Torch-free. Discovery (:func:`btckpt.storage.discovery.inspect` / ``scan`` / ``verify``), ``btckpt ls / show / verify``
and the browser read through a Store, so the layout and completeness rules are written once for local
folders and buckets. Paths are the store's own: a local path, or the fsspec path of a URL
(``bucket/run/checkpoint-3``). Files of a checkpoint are named relative to their folder (``folder``,
``name``), so the local store applies the safe-open rules of :func:`btckpt.format.manifest.open_member`: the name
stays inside the folder, a link may point only inside it, and only regular files are opened (a FIFO,
socket or device is a damaged entry, never opened blocking). :func:`open_store` maps a path or URL to its
Store.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..errors import CorruptCheckpoint
from ..format.manifest import MANIFEST, file_kind, open_member, open_regular, read_error, read_member, read_upto
from .local import is_url, local_path, remote_fs

__all__ = ["Entry", "Store", "LocalStore", "FsspecStore", "LOCAL", "open_store", "walk"]


@dataclass(frozen=True)
class Entry:
    """One entry of a folder. ``kind``: ``file``, ``dir``, or what else it is (``a FIFO (named pipe)``, ``a
    broken link``, ...); ``problem``: why it cannot be used although it is there (``links outside the
    folder``, ``cannot be examined (...)``), empty for a sound entry. ``size`` counts for files only;
    ``link``: a local symbolic link (followed for ``kind`` and ``size``)."""

    name: str
    kind: str
    size: int = 0
    mtime: float | None = None
    problem: str = ""
    link: bool = False

    @property
    def is_file(self) -> bool:
        return self.kind == "file" and not self.problem


class Store(Protocol):
    """Read access to checkpoint folders. Every failure to read a listed file is a CheckpointError naming
    it (missing: :class:`IncompleteCheckpoint`; anything else: :class:`CorruptCheckpoint`)."""

    #: Files are on this machine's filesystem (the reader may open ``info.path`` directly), and a folder
    #: appears whole (committed by rename). An object store shows an upload's files one by one.
    local: bool

    def where(self, path: str | os.PathLike[str], name: str = "") -> str:
        """``path`` (or its file ``name``) as the user would write it: a local path or a URL."""
        ...

    def list(self, folder: str | os.PathLike[str]) -> list[Entry] | None:
        """The entries directly in ``folder`` (links followed); None when it is not a folder."""
        ...

    def stat(self, folder: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Entry]:
        """The files ``names`` of ``folder`` (relative, nested allowed) that exist: one listing on an
        object store. A link out of the folder or an entry that cannot be examined has a ``problem``."""
        ...

    def read(self, folder: str | os.PathLike[str], name: str, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the file (fewer at its end)."""
        ...

    def get(self, folder: str | os.PathLike[str], name: str, *, limit: int) -> bytes:
        """The whole of a small file (the manifest, an index); more than ``limit`` bytes is an error."""
        ...

    def open(self, folder: str | os.PathLike[str], name: str) -> BinaryIO:
        """The file opened for streaming reads (a checksum pass)."""
        ...


_RELIST = 5  # listings of a folder whose entries keep vanishing between listing and stat before one is kept


def _kind(mode: int) -> str:
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else file_kind(mode)


class LocalStore:
    """Local folders, through the safe-open rules of :mod:`btckpt.format.manifest` (lstat, ``O_NOFOLLOW |
    O_NONBLOCK``, fstat of the same inode): never blocks on a FIFO, never follows a link out of a folder."""

    local = True

    def where(self, path: str | os.PathLike[str], name: str = "") -> str:
        return str(Path(path) / name) if name else str(path)

    def list(self, folder: str | os.PathLike[str]) -> list[Entry] | None:
        for _ in range(_RELIST):
            try:
                found = list(os.scandir(folder))
            except OSError:  # missing, not a folder, unreadable
                return None
            out, vanished = [], False
            for e in sorted(found, key=lambda e: e.name):
                try:
                    st = e.stat()  # follows a link, as a folder of checkpoints may hold linked ones
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError) and not e.is_symlink():
                        vanished = True  # renamed away since it was listed (a running job's commit or retention)
                        continue
                    # a dangling link or a loop
                    out.append(Entry(e.name, "a broken link", link=True))
                    continue
                kind = _kind(st.st_mode)
                out.append(Entry(e.name, kind, st.st_size if kind == "file" else 0, st.st_mtime, link=e.is_symlink()))
            if not vanished:
                break  # else list again: what replaced the vanished entry (a newer checkpoint) may be there now
        return out

    def stat(self, folder: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Entry]:
        root = Path(folder).resolve()
        out = {}
        for name in names:
            f = Path(folder) / name
            try:
                st = f.lstat()
                if stat.S_ISLNK(st.st_mode):
                    real = f.resolve()
                    if root not in real.parents:
                        out[name] = Entry(name, "a symbolic link", problem="links outside the folder")
                        continue
                    st = real.stat()
            except FileNotFoundError:
                continue
            except (OSError, RuntimeError) as exc:  # a link loop, EIO, EACCES: damaged, never a crash
                out[name] = Entry(name, "unknown", problem=f"cannot be examined ({exc})")
                continue
            out[name] = Entry(name, _kind(st.st_mode), st.st_size, st.st_mtime)
        return out

    def read(self, folder: str | os.PathLike[str], name: str, start: int, end: int) -> bytes:
        path = Path(folder) / name
        with open_member(folder, name) as f:
            try:
                f.seek(start)
            except OSError as exc:
                raise read_error(path, exc) from None
            return read_upto(f, max(0, end - start), where=path)

    def get(self, folder: str | os.PathLike[str], name: str, *, limit: int) -> bytes:
        if name != MANIFEST:
            return read_member(folder, name, limit=limit)
        path = Path(folder) / MANIFEST  # the commit marker: never read through a link (open_regular refuses one)
        with open_regular(path) as f:
            raw = read_upto(f, limit + 1, where=path)
        if len(raw) > limit:
            raise CorruptCheckpoint(f"{path}: manifest is larger than {limit} bytes")
        return raw

    def open(self, folder: str | os.PathLike[str], name: str) -> BinaryIO:
        return open_member(folder, name)


LOCAL = LocalStore()


def _mtime(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time (the field's name differs between fsspec backends)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


class FsspecStore:
    """A URL's filesystem through fsspec (``s3://``, ``gs://``, ``memory://`` ...). ``root`` is the fsspec
    path of ``url``; each store starts from a fresh listing (fsspec's directory cache is dropped)."""

    local = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, path = remote_fs(url)
        self.root = path.rstrip("/") or path
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()

    def _path(self, folder: str | os.PathLike[str], name: str = "") -> str:
        p = os.fspath(folder).rstrip("/")
        return posixpath.join(p, name) if name else p

    def where(self, path: str | os.PathLike[str], name: str = "") -> str:
        p = self._path(path, name)
        if p == self.root:
            return self.url
        if hasattr(self.fs, "unstrip_protocol"):
            return str(self.fs.unstrip_protocol(p))
        proto = self.fs.protocol
        return f"{proto[0] if isinstance(proto, (tuple, list)) else proto}://{p}"

    def list(self, folder: str | os.PathLike[str]) -> list[Entry] | None:
        p = self._path(folder)
        try:
            found = self.fs.ls(p, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(found) == 1 and found[0]["name"].rstrip("/") == p and found[0].get("type") != "directory":
            return None  # a file lists itself
        return sorted((Entry(posixpath.basename(e["name"].rstrip("/")),
                             "dir" if e.get("type") == "directory" else "file",
                             int(e.get("size") or 0), _mtime(e)) for e in found), key=lambda e: e.name)

    def stat(self, folder: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Entry]:
        base = self._path(folder) + "/"
        try:
            found = self.fs.find(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            found = {}
        listed = {n[len(base):]: e for n, e in found.items() if n.startswith(base)}
        return {n: Entry(n, "dir" if listed[n].get("type") == "directory" else "file",
                         int(listed[n].get("size") or 0), _mtime(listed[n])) for n in names if n in listed}

    def read(self, folder: str | os.PathLike[str], name: str, start: int, end: int) -> bytes:
        p = self._path(folder, name)
        try:
            return bytes(self.fs.cat_file(p, start=start, end=end))
        except OSError as exc:
            raise read_error(self.where(p), exc) from None

    def get(self, folder: str | os.PathLike[str], name: str, *, limit: int) -> bytes:
        raw = self.read(folder, name, 0, limit + 1)
        if len(raw) > limit:
            raise CorruptCheckpoint(f"{self.where(folder, name)}: larger than {limit} bytes; not a file btckpt wrote")
        return raw

    def open(self, folder: str | os.PathLike[str], name: str) -> BinaryIO:
        p = self._path(folder, name)
        try:
            return self.fs.open(p, "rb", block_size=16 << 20)  # type: ignore[no-any-return]
        except OSError as exc:
            raise read_error(self.where(p), exc) from None


def open_store(target: str | os.PathLike[str]) -> tuple[Store, str]:
    """``(store, path in it)`` for a local path, a ``file://`` URL, or an fsspec URL."""
    if is_url(target):
        store = FsspecStore(os.fspath(target))
        return store, store.root
    return LOCAL, str(local_path(target))


def walk(store: Store, folder: str | os.PathLike[str]) -> dict[str, Entry]:
    """Every entry under ``folder`` that is not a folder, by its name relative to ``folder`` (sorted); linked
    folders are listed, not entered (a link loop would never end)."""
    out: dict[str, Entry] = {}

    def visit(d: str, prefix: str) -> None:
        for e in store.list(d) or []:
            if e.kind == "dir" and not e.link:
                visit(posixpath.join(d, e.name), f"{prefix}{e.name}/")
            else:
                out[prefix + e.name] = Entry(prefix + e.name, e.kind, e.size, e.mtime, e.problem, e.link)

    visit(os.fspath(folder), "")
    return out
