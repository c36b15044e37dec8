"""Retention: what a durable commit retires. Policy only; the deleting is :mod:`btckpt.saving.retention`'s
(:class:`KeepLast`) and :func:`~btckpt.saving.commit.delete_checkpoint`'s (:class:`LinkRefcount`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import UnsafeCheckpoint
from ..saving.commit import delete_checkpoint, write_small_file
from ..saving.retention import apply_retention, remove_diverged
from ..storage.discovery import STEP_DIR, CheckpointInfo, inspect
from ..storage.local import fsync_dir

__all__ = ["Retention", "KeepLast", "LinkRefcount"]

log = logging.getLogger("btckpt")


@runtime_checkable
class Retention(Protocol):
    """The retention interface: told of each durable commit, it retires what that commit replaces.

    Call order: :meth:`committed` runs on the writer thread of the rank that commits (the node's leader),
    after the commit is durable on every node, and before the save's ``on_commit``; :meth:`protect` and
    :meth:`unprotect` from any thread at any time. Guarantee (DESIGN.md, Deletion): nothing is deleted before
    a newer checkpoint committed, never the newest complete one, never a protected one; a deletion asked for
    while a save writes waits for that save's commit.

    Implementations: :class:`KeepLast` (the Checkpointer's ``keep_last``) and :class:`LinkRefcount`
    (Lightning's link refcount, ``btckpt.lightning.SafetensorsCheckpointIO``: a folder goes when its last
    name does).
    """

    def committed(self, folder: Path) -> None:
        """``folder`` committed: retire what it replaces."""

    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never retire ``path``."""

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect`."""


class KeepLast:
    """The newest ``keep_last`` complete checkpoints of this writer's dir stay (None: all); older ones go
    after each commit. ``busy()`` names folders being read (a consolidation): kept until the next commit."""

    def __init__(self, root: Path, *, keep_last: int | None, protected: set[Path] | frozenset[Path] = frozenset(),
                 busy: Callable[[], set[Path]] = set) -> None:
        self.root, self.keep_last, self._busy = root, keep_last, busy
        self.protected: frozenset[Path] = frozenset(Path(p) for p in protected)

    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never delete ``path`` (e.g. the best model so far)."""
        self.protected = self.protected | {Path(path)}  # rebind: the writer thread may be reading the set

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect`; retention may delete it again."""
        self.protected = self.protected - {Path(path)}

    def committed(self, folder: Path) -> None:
        """After ``folder`` committed (the node's leader, on the writer): delete what falls out of ``keep_last``."""
        apply_retention(self.root, keep_last=self.keep_last, protected=self.protected | {folder} | self._busy())

    def sweep(self) -> None:
        """Delete what falls out of ``keep_last`` now (at close, once nothing reads the folders any more)."""
        apply_retention(self.root, keep_last=self.keep_last, protected=self.protected)

    def remove_diverged(self, step: int) -> None:
        """After every rank resumed ``step``: this writer's checkpoints newer than it go (an abandoned future;
        :func:`~btckpt.saving.retention.remove_diverged`)."""
        remove_diverged(self.root, resumed=step, protected=self.protected)


RETIRE = ".btckpt-retire-"  # + folder name: that folder's last name is being removed (LinkRefcount.remove)
UNNAME = ".btckpt-unname-"  # + a name + UNNAME_END: a removal asked for while its replacement was writing
UNNAME_END = ".pending"  # (so a marker never matches the user's own "*.ckpt")
MAX_DEFERRED = 64  # removals waiting for a commit; past it, LinkRefcount.remove waits for the saves first


def _unname_marker(p: Path) -> Path:
    return p.parent / f"{UNNAME}{p.name}{UNNAME_END}"


class LinkRefcount:
    """Retention by names: small *link files* beside the ``checkpoint-<N>`` folders each name one folder
    (Lightning's ``last.ckpt``, ``epoch=0-step=5.ckpt``); a folder goes when the last name pointing at it
    does, and a framework's removal of a name is a request, carried out once it is safe.

    The link format is the adapter's: ``read_link(path)`` (the folder a link names; raises
    :class:`~btckpt.errors.UnsafeCheckpoint` for a file that is not one) and ``write_link(link, folder)``
    (atomic); ``max_link`` bounds a link file's size. ``resumable(info)``: whether a complete checkpoint can
    resume training (a removal request left by a killed process is carried out only once such a newer one
    exists). ``leader()``: whether this process writes the names (rank 0). ``wait()``: block until every
    save in flight committed (the adapter's, which ends with :meth:`run_deferred`). ``forget(folder)``:
    told of each folder deleted.

    Call order, per save of folder F named L: :meth:`cancel` (L and F are saved again: no earlier removal
    request for them stands), :meth:`share` (F is being written already: L joins its names) or
    :meth:`expect` (F's names, written once F committed) before the save starts, :meth:`abandon` when it
    failed to start; then :meth:`committed` (F committed: the removals asked for meanwhile run, then F's names
    are written) from the save's ``on_commit``, on the writer thread. :meth:`name` points a name at an already
    committed folder; :meth:`remove` is the framework's delete. :meth:`recover` once per dir at the first
    start, before any save; :meth:`close` at the end. Which rank: the one the framework saves and deletes
    on (Lightning: rank 0); under a sharded save every rank's writer calls :meth:`committed`, and only the
    ``leader()`` writes or moves names.

    Guarantees (DESIGN.md, Deletion): a framework's delete is a request -- the folder a name points at is
    only removed once the save that replaces it committed (a removal asked for while a save writes waits
    for it; a marker ``.btckpt-unname-<name>.pending`` records the request, so a kill after that commit and
    before the removal leaves a checkpoint, and the next start's :meth:`recover` finishes the removal only
    when a complete, resumable newer checkpoint exists). A kill in that window never loses both: the older
    checkpoint stays named until the newer one committed. A folder whose last name goes is marked
    (``.btckpt-retire-<folder>``) before the name is unlinked, so a kill between the two never leaves a
    complete folder nothing names (:meth:`recover` deletes it). A folder being written is never deleted;
    a protected folder (:meth:`protect`) is never deleted, even nameless. A failed save (:meth:`close` with
    ``failed``) carries out none of the removals waiting for it: the checkpoints they would have replaced
    stay.
    """

    def __init__(self, *, read_link: Callable[[Path], Path], write_link: Callable[[Path, Path], None],
                 max_link: int, resumable: Callable[[CheckpointInfo], bool], leader: Callable[[], bool],
                 wait: Callable[[], None], forget: Callable[[Path], None] = lambda folder: None) -> None:
        self._read_link, self._write_link, self._max_link = read_link, write_link, max_link
        self._resumable, self._leader, self._wait, self._forget = resumable, leader, wait, forget
        self.protected: frozenset[Path] = frozenset()
        self._pending: dict[Path, list[Path]] = {}  # folder being written -> link files to write on commit
        self._deferred: list[Path] = []  # names/folders the framework removed while a save was still writing
        self._lock = threading.Lock()

    # -- Retention ------------------------------------------------------------------------------------------
    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never delete the folder ``path``, even when its last name goes (the name still does)."""
        self.protected = self.protected | {Path(path)}

    def unprotect(self, path: str | os.PathLike[str]) -> None:
        """Undo :meth:`protect`; the folder goes again when its last name does."""
        self.protected = self.protected - {Path(path)}

    def committed(self, folder: Path) -> None:
        """``folder`` committed (its save's ``on_commit``, on the writer): the removals asked for while it was
        written run, then its names are written (a folder losing its last name to them goes)."""
        with self._lock:
            links = self._pending.pop(folder, [])
        self.run_deferred()  # first: once the new names exist, nothing of the older checkpoints is left to do
        for link in links:
            self.name(link, folder)

    # -- the saves ------------------------------------------------------------------------------------------
    def expect(self, folder: Path, names: list[Path]) -> None:
        """``folder`` is about to be written: ``names`` (link files) name it once it committed."""
        with self._lock:
            self._pending[folder] = [n for n in names if n != folder]

    def share(self, folder: Path, link: Path) -> bool:
        """When ``folder`` is being written: ``link`` names it too once it committed (True); else False."""
        with self._lock:
            waiting = self._pending.get(folder)
            if waiting is None:
                return False
            if link != folder:
                waiting.append(link)
            return True

    def abandon(self, folder: Path | None = None) -> None:
        """The save of ``folder`` (None: every save) will not commit: its names are not written."""
        with self._lock:
            if folder is None:
                self._pending.clear()
            else:
                self._pending.pop(folder, None)

    def cancel(self, *paths: Path) -> None:
        """``paths`` (a name, a folder) are saved again: an earlier removal request for them no longer stands."""
        with self._lock:
            cancelled = [p for p in self._deferred if p in paths]
            self._deferred = [p for p in self._deferred if p not in paths]
        for p in cancelled:
            _unname_marker(p).unlink(missing_ok=True)

    def is_pending(self, path: Path) -> bool:
        """Whether ``path`` is a folder being written or a name waiting for one."""
        with self._lock:
            return any(path in links or path == f for f, links in self._pending.items())

    def names_of(self, folder: Path) -> list[Path]:
        """The link files beside ``folder`` that name it."""
        return [entry for entry in folder.parent.iterdir() if self._names_folder(entry, folder)]

    def name(self, link: Path, folder: Path) -> None:
        """Point ``link`` at the committed ``folder`` (the leader only); a folder that loses its last name this
        way is deleted (as an overwritten ``.ckpt`` file would be gone with Lightning's TorchCheckpointIO)."""
        if not self._leader():
            return  # a sharded save runs on every rank; names are the leader's
        old = None
        if link.is_file():
            try:
                old = self._read_link(link)
            except (UnsafeCheckpoint, OSError):
                old = None
        self._write_link(link, folder)
        with self._lock:
            busy = old in self._pending
        if old is not None and old != folder and not busy and old.is_dir() and old not in self.protected \
                and not self._named(old):
            delete_checkpoint(old)
            self._forget(old)
            log.info("btckpt: removed %s (its last name, %s, now names %s)", old.name, link.name, folder.name)

    # -- the framework's removals ---------------------------------------------------------------------------
    def remove(self, p: Path) -> None:
        """The framework's delete of the name (or folder) ``p``: now when no save is being written, else once
        it committed (:meth:`committed`; recorded on disk first). Past :data:`MAX_DEFERRED` waiting removals
        it waits for the saves instead."""
        with self._lock:
            for links in self._pending.values():
                while p in links:
                    links.remove(p)
            defer = bool(self._pending)
            new = defer and p not in self._deferred
            if new:
                self._deferred.append(p)
            full = len(self._deferred) > MAX_DEFERRED
        if new:
            self._mark_deferred(p)
        if full:
            self._wait()  # bounded: the saves commit (or raise) and run the removals
            self.run_deferred()
        if defer:
            return
        self._remove_now(p)

    def run_deferred(self) -> None:
        """Carry out the removals asked for while a save was writing, once none is (DESIGN.md, Deletion: a
        deletion the framework asks for waits until the save that replaces it committed)."""
        with self._lock:
            if self._pending:
                return
            todo, self._deferred = self._deferred, []
        for path in todo:
            self._remove_now(path)

    def close(self, *, failed: bool) -> None:
        """Every save ended (their writers closed): run the waiting removals, or (a save ``failed``) drop them
        and their markers, keeping what they would have replaced."""
        with self._lock:
            self._pending.clear()
            kept, self._deferred = (self._deferred, []) if failed else ([], self._deferred)
        if not failed:
            self.run_deferred()
        for p in kept:
            _unname_marker(p).unlink(missing_ok=True)

    def recover(self, root: Path) -> None:
        """At the first start in ``root`` (the leader, before any save): carry out the removals an earlier
        process was asked for but died before running: a name whose replacing save had committed (a complete,
        resumable newer checkpoint exists; else it stays), and the folders whose last name was removed before
        they were deleted."""
        for marker in sorted(root.glob(f"{UNNAME}*{UNNAME_END}")):
            name = root / marker.name[len(UNNAME):-len(UNNAME_END)]
            if self._replaced(name):
                log.warning("btckpt: removing %s, whose removal an earlier run asked for after a newer checkpoint",
                            name.name)
                self._remove_name(name)
            marker.unlink(missing_ok=True)
        for marker in sorted(root.glob(f"{RETIRE}checkpoint-*")):
            folder = root / marker.name[len(RETIRE):]
            if STEP_DIR.match(folder.name) and folder.is_dir() and folder not in self.protected \
                    and not self._named(folder):
                log.warning("btckpt: deleting %s, whose last name was removed by an earlier run", folder)
                delete_checkpoint(folder)
            marker.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------------------------
    @staticmethod
    def _mark_deferred(p: Path) -> None:
        """A marker beside ``p``: a kill after the replacing save committed but before the removal ran leaves
        the request on disk, and the next start carries it out (:meth:`recover`)."""
        try:
            write_small_file(_unname_marker(p), b"")
            fsync_dir(p.parent)
        except OSError as exc:  # e.g. a name too long for a marker: the removal still runs after the commit
            log.warning("btckpt: could not record the pending removal of %s (%s); a kill before it runs "
                        "leaves that checkpoint behind", p.name, exc)

    def _remove_now(self, p: Path) -> None:
        self._remove_name(p)
        _unname_marker(p).unlink(missing_ok=True)

    def _remove_name(self, p: Path) -> None:
        if p.is_dir() and STEP_DIR.match(p.name):
            self._retire(p)
            return
        if not p.is_file():
            return
        try:
            folder: Path | None = self._read_link(p)
        except UnsafeCheckpoint:
            folder = None  # not a link (e.g. a .ckpt from TorchCheckpointIO): remove it as the framework would
        # the last name of a folder: a marker first, so a kill between unlinking and deleting never leaves a
        # complete folder that nothing names (the next start finishes the deletion, see recover)
        last = folder is not None and folder not in self.protected and not self._named(folder, besides=p)
        marker = p.parent / f"{RETIRE}{folder.name}" if last and folder is not None else None
        if marker is not None and not marker.exists():
            write_small_file(marker, b"")
            fsync_dir(p.parent)
        os.unlink(p)
        fsync_dir(p.parent)
        if marker is not None and folder is not None:
            self._retire(folder)
            marker.unlink(missing_ok=True)

    def _replaced(self, name: Path) -> bool:
        """Whether a complete, resumable checkpoint newer than the one ``name`` (a link or a folder) names exists."""
        try:
            folder = name if name.is_dir() else self._read_link(name) if name.is_file() else None
        except (UnsafeCheckpoint, OSError):
            return False
        found = STEP_DIR.match(folder.name) if folder is not None else None
        if folder is None or found is None:
            return False
        for entry in folder.parent.iterdir():
            m = STEP_DIR.match(entry.name)
            if m and int(m.group(1)) > int(found.group(1)):
                info = inspect(entry)
                if info.complete and self._resumable(info):
                    return True
        return False

    def _named(self, folder: Path, *, besides: Path | None = None) -> bool:
        with self._lock:
            if self._pending.get(folder):
                return True
        return any(entry != besides and self._names_folder(entry, folder) for entry in folder.parent.iterdir())

    def _names_folder(self, entry: Path, folder: Path) -> bool:
        """Whether ``entry`` is a link file naming ``folder``."""
        if not entry.is_file() or entry.name.startswith(".") or entry.stat().st_size > self._max_link:
            return False
        try:
            return self._read_link(entry) == folder
        except (UnsafeCheckpoint, OSError):
            return False

    def _retire(self, folder: Path) -> None:
        with self._lock:
            pending = folder in self._pending
        if pending:
            self._wait()
        if folder in self.protected:
            return
        if folder.is_dir():
            delete_checkpoint(folder)
        self._forget(folder)
