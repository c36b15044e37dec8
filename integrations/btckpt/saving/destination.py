"""Where a checkpoint is written: the :class:`Destination` protocol, a local folder and an fsspec URL.

A destination is one place checkpoints are committed into (a local dir, a node-local tier, a bucket prefix).
Writing one checkpoint there is a *part*: a handle returned by :meth:`Destination.part` that every verb
below takes. The commit mechanics live here; when to write, what, and how to verify or retry is the caller's.

Call order for one checkpoint (one part)::

    p = dest.part(step, tag=tag)     every rank of the node, same agreed tag: a handle, nothing created
    dest.begin(p)                    the node's leader, once; then a barrier before anyone writes
    dest.put(p, name, data) / fast   any rank writes its files: ``put`` for bytes; a LocalDir part's ``tmp``
                                     folder may also be written directly (the arena writer), a Remote part
                                     takes a local file through ``Remote.put_file``
    dest.record(p, name, size, ck)   the leader, per file the manifest lists (the ranks' files collected)
    dest.commit(p, manifest)         the leader, last; with several nodes through :func:`commit_in_order`
    dest.abort(p)                    on any failure, by whoever began it (others: harmless)

    dest.list()                      the committed checkpoints there (names), any rank
    dest.remove(name)                retire one committed checkpoint (its owner's retention only)

Guarantees every implementation gives:

- ``begin``: refuses a step already committed there unless the part supersedes it; creates only what its own
  ``abort`` removes (names carry the part's random tag);
- ``commit``: the manifest is written last, and its appearance (a rename locally, the manifest object on an
  object store) is the commit: a crash at any instant leaves either no checkpoint of that name or a complete
  one. A failed ``commit`` leaves nothing committed (a superseded copy is put back);
- ``abort``: removes only what this part created or sent, never a committed checkpoint;
- ``remove``: un-commits first (the folder renamed away, or the manifest deleted before the files), so a crash
  mid-removal never leaves a complete-looking checkpoint with files missing.

Multi-node: each node commits its own part in its own destination; :func:`commit_in_order` is the one order
(every other node's part committed, then node 0 commits last, so a complete node-0 part certifies the whole).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import CheckpointError
from ..format.checksum import CHECKSUM, new_hasher
from ..format.manifest import MANIFEST, Manifest
from ..storage.discovery import scan
from ..storage.local import new_tag, remote_fs
from ..storage.remote import join
from ..testing import faults
from .commit import DirLock, LocalCommit, checkpoint_name, delete_checkpoint, write_small_file

if TYPE_CHECKING:
    from ..distributed.world import World

__all__ = ["Destination", "LocalDir", "Remote", "RemotePart", "commit_in_order", "listing_detail"]

log = logging.getLogger("btckpt")
_CHUNK = 8 << 20

P = TypeVar("P")


class Destination(Protocol[P]):
    """One place checkpoints are committed into; ``P`` is its part (one checkpoint being written). See the module
    docstring for the call order, which rank calls each verb, and what each guarantees."""

    def part(self, step: int, *, tag: str | None = None, name: str | None = None, supersede: bool = False) -> P:
        """The handle of one checkpoint's write (``name``: its folder, default ``checkpoint-<step>``; every rank of
        the node builds the same one from the agreed ``tag``). Creates nothing."""
        ...

    def begin(self, part: P) -> None:
        """Open the part for writing (the node's leader, once). Refuses a step already there unless ``supersede``."""
        ...

    def put(self, part: P, name: str, data: bytes) -> tuple[int, str]:
        """Write the file ``name`` of the part (any rank, after ``begin``); its ``(size, checksum)``. Not recorded:
        the leader records every rank's files (:meth:`record`)."""
        ...

    def record(self, part: P, name: str, size: int, checksum: str) -> None:
        """Note a file the manifest lists (the leader)."""
        ...

    def commit(self, part: P, manifest: Manifest | bytes) -> Any:
        """Make the part a committed checkpoint, manifest last (the leader); where it now is. ``manifest``: a
        :class:`Manifest` (its files set from what was recorded), or a committed one's exact bytes (a copy)."""
        ...

    def abort(self, part: P) -> None:
        """Undo what the part created or sent (best effort); nothing of it becomes visible."""
        ...

    def list(self) -> list[str]:
        """The names of the committed checkpoints there."""
        ...

    def remove(self, name: str) -> None:
        """Retire the committed checkpoint ``name``: un-commit first, then its files."""
        ...


def commit_in_order(world: World, commit: Callable[[], object], *, key: str, timeout: float,
                    ranks: int | None = None, commits: bool = True) -> None:
    """The multi-node commit order, for a save and a promotion alike: every node but node 0 commits its part, all
    meet at the barrier ``key`` (``ranks`` of them: default every rank), then node 0 commits last, so a complete
    node-0 part certifies that every node's part committed. ``commits``: whether this caller commits (the node's
    leader, when it has a part to commit); the others only join the barrier. On any failure the barrier is
    failed (peers raise at once, nothing more commits) and the error raised."""
    try:
        if commits and world.node_rank != 0:
            commit()
        world.barrier(key, timeout=timeout, ranks=ranks)
        if commits and world.node_rank == 0:
            commit()
    except BaseException:
        world.fail(key)
        raise


# -- a local folder -------------------------------------------------------------------------------------------
class LocalDir:
    """A local checkpoint dir: a :class:`~btckpt.storage.atomic.LocalCommit` per part (temp folder in the same
    parent, fsync, manifest last, atomic rename, parent fsync) and, with ``lock``, the dir's one-writer
    :class:`~btckpt.saving.commit.DirLock` (held until :meth:`release`; ``lock`` may be one taken already, as the
    local tier's claim does). A part's ``tmp`` is the folder files are written into (``put``, or directly by the
    arena writer, then ``record``)."""

    def __init__(self, root: str | os.PathLike[str], *, lock: bool | DirLock | None = False) -> None:
        self.root = Path(root)
        self.lock: DirLock | None = (lock if isinstance(lock, DirLock) else
                                     DirLock(self.root) if lock else None)

    def release(self) -> None:
        """Drop the writer lock, if held (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def part(self, step: int, *, tag: str | None = None, name: str | None = None,
             supersede: bool = False) -> LocalCommit:
        return LocalCommit(self.root, step, tag=tag, name=name, supersede=supersede)

    def begin(self, part: LocalCommit) -> None:
        part.begin()

    def put(self, part: LocalCommit, name: str, data: bytes) -> tuple[int, str]:
        return write_small_file(part.tmp / name, data)

    def record(self, part: LocalCommit, name: str, size: int, checksum: str) -> None:
        part.record(name, size, checksum)

    def commit(self, part: LocalCommit, manifest: Manifest | bytes) -> Path:
        return part.commit(manifest)

    def abort(self, part: LocalCommit) -> None:
        part.abort()

    def list(self) -> list[str]:
        return [i.path.name for i in scan(self.root, own=True) if i.complete]

    def remove(self, name: str, *, retired: bool = True, salvage: Callable[[Path], object] | None = None) -> None:
        """:func:`~btckpt.saving.commit.delete_checkpoint` (renamed away first); ``retired``/``salvage`` as there."""
        delete_checkpoint(self.root / name, retired=retired, salvage=salvage)


# -- an fsspec URL --------------------------------------------------------------------------------------------
def listing_detail(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """Every file under ``path`` (relative name -> ``{"size", "ETag"}``); empty when ``path`` is not there."""
    try:
        found = fs.find(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    base = path.rstrip("/") + "/"
    return {n[len(base):]: {"size": int(i.get("size") or 0), "ETag": i.get("ETag")} for n, i in found.items()
            if n.startswith(base) and i.get("type", "file") != "directory"}


@dataclass
class RemotePart:
    """One checkpoint being written under a :class:`Remote`: its folder ``rdir``, what is there (``listing``: relative
    name -> size/ETag, from the caller's listing), the manifest bytes it will commit (``expect``), whether that very
    manifest is there already (``present``, set by ``begin``), the files it recorded and sent."""

    step: int
    rdir: str
    listing: dict[str, dict[str, Any]] = field(default_factory=dict)
    expect: bytes | None = None
    supersede: bool = False
    present: bool = False
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)


class Remote:
    """Checkpoints under an fsspec URL (an object store or any fsspec filesystem): data files first, the manifest
    last, whose presence is the commit (S3: one PUT; elsewhere a temp name moved into place), read back after.

    The uploader (:mod:`btckpt.publish.uploader`) drives it: it keeps the process, the journal, verification
    and retries; this class is only the commit mechanics. ``begin`` un-commits a different checkpoint found under
    the same name (manifest first: the local copy is the truth) and removes a killed uploader's temp manifests.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, root = remote_fs(self.url)
        self.root = root.rstrip("/")
        self.s3 = hasattr(self.fs, "call_s3")

    def _invalidate(self, path: str | None = None) -> None:
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(path) if path is not None else self.fs.invalidate_cache()

    def listing(self, path: str | None = None) -> dict[str, dict[str, Any]]:
        """Every file under the root (or ``path``): relative name -> ``{"size", "ETag"}`` (:func:`listing_detail`)."""
        return listing_detail(self.fs, self.root if path is None else path)

    def part(self, step: int, *, tag: str | None = None, name: str | None = None, supersede: bool = False,
             listing: dict[str, dict[str, Any]] | None = None, expect: bytes | None = None) -> RemotePart:
        """``listing``: what is under the part's folder now (relative names; the caller listed it); ``expect``: the
        manifest bytes the part commits (that very manifest there already: ``present``, nothing to commit);
        ``supersede``: a different checkpoint there is un-committed by ``begin`` (a mirror: the local copy is the
        truth), else refused. ``tag`` is unused (temp manifests get their own)."""
        return RemotePart(step=step, rdir=join(self.root, name or checkpoint_name(step)), listing=dict(listing or {}),
                          expect=expect, supersede=supersede)

    def begin(self, part: RemotePart) -> None:
        for stray in [n for n in part.listing if n.startswith(f".{MANIFEST}.tmp-")]:  # a killed uploader's manifest
            self.fs.rm_file(join(part.rdir, stray))
        if part.listing.get(MANIFEST) is None:
            return
        if part.expect is not None and self.fs.cat_file(join(part.rdir, MANIFEST)) == part.expect:
            part.present = True
            return
        if not part.supersede:
            raise CheckpointError(f"{part.rdir} already holds a different checkpoint; btckpt never overwrites one "
                                  "in place")
        log.warning("%s holds a different checkpoint; un-committing it (manifest first) before the upload", part.rdir)
        self.fs.rm_file(join(part.rdir, MANIFEST))

    def put(self, part: RemotePart, name: str, data: bytes) -> tuple[int, str]:
        target = join(part.rdir, name)
        self.fs.pipe_file(target, data)
        part.sent.append(target)
        h = new_hasher()
        h.update(data)
        return len(data), h.hexdigest()

    def put_file(self, part: RemotePart | None, rpath: str, local: Path, *, callback: Any = None,
                 part_size: int = 64 << 20) -> dict[str, Any]:
        """Send the local file ``local`` to ``rpath`` (S3: ``put_file`` in ``part_size`` parts; elsewhere a chunked
        copy) and return the remote object's fresh ``info`` (the caller verifies it)."""
        if self.s3:
            self.fs.put_file(str(local), rpath, callback=callback, chunksize=part_size)
        else:
            self.fs.makedirs(self.fs._parent(rpath), exist_ok=True)
            with open(local, "rb") as src, self.fs.open(rpath, "wb") as dst:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    dst.write(chunk)
                    if callback is not None:
                        callback.relative_update(len(chunk))
        if part is not None:
            part.sent.append(rpath)
        self._invalidate(rpath)
        return dict(self.fs.info(rpath))

    def record(self, part: RemotePart, name: str, size: int, checksum: str) -> None:
        part.files[name] = {"size": size, CHECKSUM: checksum}

    def commit(self, part: RemotePart, manifest: Manifest | bytes) -> str:
        """Put the manifest (nothing when ``begin`` found this very one there), read it back."""
        if part.present:
            return part.rdir
        if isinstance(manifest, Manifest):
            manifest.files = dict(sorted(part.files.items()))
            data = manifest.to_json()
        else:
            data = manifest
        faults.point("upload_manifest")
        target = join(part.rdir, MANIFEST)
        if self.s3:
            self.fs.pipe_file(target, data)  # one PUT: atomic on an object store
        else:
            tmp = join(part.rdir, f".{MANIFEST}.tmp-{new_tag()}")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)
        self._invalidate(target)
        if self.fs.cat_file(target) != data:
            raise OSError(f"{target}: read-back differs from the local manifest")
        return part.rdir

    def abort(self, part: RemotePart, *, sent: Iterable[str] | None = None) -> None:
        """Remove what was sent of a checkpoint that will not be finished (``sent``: remote paths, default those this
        part sent): never when its manifest is there (a committed folder), never files not sent."""
        try:
            if self.fs.exists(join(part.rdir, MANIFEST)):
                return
            for rpath in list(part.sent if sent is None else sent):
                if self.fs.exists(rpath):
                    self.fs.rm_file(rpath)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove the partial upload %s: %s", part.rdir, exc)

    def list(self) -> list[str]:
        return sorted({n.split("/", 1)[0] for n in self.listing() if n.endswith(f"/{MANIFEST}") and n.count("/") == 1})

    def remove(self, name: str, *, files: Iterable[str] | None = None) -> None:
        """Un-commit ``name`` (its manifest first), then delete its ``files`` (relative names; default every file
        listed there), then the folder when only empty markers are left. Errors are raised to the caller."""
        rdir = join(self.root, name)
        names = list(self.listing(rdir)) if files is None else list(files)
        self.fs.rm_file(join(rdir, MANIFEST))  # un-commit first: never a complete-looking partial
        for rel in names:
            if rel != MANIFEST:
                self.fs.rm_file(join(rdir, rel))
        self._invalidate(rdir)
        if self.fs.exists(rdir) and not self.listing(rdir):
            self.fs.rm(rdir, recursive=True)  # empty folder markers only


if TYPE_CHECKING:  # mypy checks that both implement the protocol
    def _conforms(a: LocalDir, b: Remote) -> tuple[Destination[LocalCommit], Destination[RemotePart]]:
        return a, b
