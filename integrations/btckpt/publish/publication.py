"""What follows a durable commit, and what the close finishes: retention, the uploader, the servable copy.

A :class:`Publication` exists on every rank of every Checkpointer. Its collaborators come in explicitly (this
layer sits below the policies and the consolidator): a retention policy (:class:`~btckpt.policies.KeepLast`),
the consolidator (:class:`~btckpt.consolidate.Consolidator`, global rank 0 only, else None) and the upload
destination; the :class:`UploadSupervisor` is its own, on the node's leader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from ..distributed.world import World
from ..errors import CheckpointError
from ..saving.engine import ErrorChannel, Target
from .staging import finish_upload
from .supervisor import UploadSupervisor

__all__ = ["Publication"]


class DirRetention(Protocol):
    """What :class:`Publication` needs of the retention policy (:class:`~btckpt.policies.KeepLast`)."""

    protected: frozenset[Path]

    def committed(self, folder: Path) -> None: ...
    def protect(self, path: str | os.PathLike[str]) -> None: ...
    def unprotect(self, path: str | os.PathLike[str]) -> None: ...
    def sweep(self) -> None: ...
    def remove_diverged(self, step: int) -> None: ...


class Consolidation(Protocol):
    """What :class:`Publication` needs of the consolidator (:class:`~btckpt.consolidate.Consolidator`)."""

    @property
    def busy(self) -> set[Path]: ...
    def submit(self, ckpt: Path, *, protected: Iterable[Path] = ()) -> None: ...
    def take_error(self) -> BaseException | None: ...
    def close(self, *, timeout: float | None = None) -> bool: ...


class Publication:
    """Retention, upload and consolidation of one Checkpointer's durable dir ``root``.

    Call order, every rank: construct it (nothing starts); :meth:`start` once nothing else in the Checkpointer's
    constructor can fail (it watches the consolidator's errors through the engine's channel and starts the
    uploader on the node's leader: ``upload_to=URL``, or ``dir=URL`` with mirrored retention); :meth:`committed`
    on the writer thread after each durable commit (:attr:`target` for a save into the dir, :meth:`then` for a
    promotion), before the save's ``on_commit``; :meth:`resumed` after a restore; :meth:`wait` at the end of the
    Checkpointer's ``wait()``; :meth:`close` once, after the tier's close.

    Guarantees: the node's leader applies retention after each commit (never to a folder being consolidated:
    :meth:`close` sweeps those once the consolidation ended) and pokes the uploader; global rank 0 hands each
    commit to the consolidator (newest wins), whose error is raised once through the engine's channel. With
    ``dir=URL``, :meth:`wait` returns once every commit so far is published, and :meth:`close` ends with the
    uploader's final pass (its failure is kept in the channel; raised by the Checkpointer's close).
    """

    def __init__(self, world: World, root: Path, *, retention: DirRetention, consolidator: Consolidation | None,
                 upload_to: str | None, remote: str | None) -> None:
        self.world, self.root, self.retention, self.consolidator = world, root, retention, consolidator
        self.remote = remote  # dir=URL: where the uploader publishes, and each wait() waits for it
        self._dest = upload_to or remote
        self._uploader: UploadSupervisor | None = None

    def start(self, errors: ErrorChannel) -> None:
        """Report the consolidator's errors through ``errors``; start the uploader (the node's leader)."""
        if self.consolidator is not None:
            errors.watch(self.consolidator.take_error)
        if self._dest and self.world.is_local_leader:
            self._uploader = UploadSupervisor(self.root, self._dest,
                                              extra_args=["--mirror-retention"] if self.remote else [])
            self._uploader.start()

    @property
    def target(self) -> Target:
        """A save into the durable dir: after its commit, :meth:`committed`."""
        return Target(root=self.root, committed=lambda job, path: self.committed(path))

    def then(self, on_commit: Callable[[Path], None] | None) -> Callable[[Path], None]:
        """The commit callback of a promotion into the dir: :meth:`committed`, then ``on_commit(folder)``."""
        def committed(path: Path) -> None:
            self.committed(path)
            if on_commit is not None:
                on_commit(path)
        return committed

    def committed(self, path: Path) -> None:
        """After a durable commit of ``path`` (a save, or a promotion from the local tier): retention and the
        uploader's pass (the node's leader), the consolidation (global rank 0, on its own thread)."""
        if self.world.is_local_leader:
            self.retention.committed(path)
            if self._uploader is not None:
                self._uploader.poke()
        if self.consolidator is not None:
            self.consolidator.submit(path, protected=self.retention.protected)

    @property
    def consolidating(self) -> set[Path]:
        """The committed checkpoints the consolidator reads or is about to (empty without one)."""
        return self.consolidator.busy if self.consolidator is not None else set()

    def resumed(self, step: int | None) -> None:
        """After every rank resumed ``step``: with several nodes, the node's own checkpoints in the dir newer than
        it go (a step complete on some nodes only: an abandoned future). The node's leader."""
        if self.world.is_local_leader and self.world.nodes > 1 and step is not None:
            self.retention.remove_diverged(step)

    def wait(self) -> None:
        """With ``dir=URL``: the uploader's pass over every commit so far, then a fresh uploader. Raises
        :class:`CheckpointError` when that pass left something unpublished."""
        if self.remote is not None and self._uploader is not None:
            finish_upload(self._uploader, self.remote, restart=True)

    def close(self, *, errors: ErrorChannel, left: Callable[[], float | None]) -> bool:
        """The consolidation finishes, then what it still read is swept; the uploader ends with a final pass
        (``dir=URL``: its failure is kept in ``errors``). ``left()``: the seconds each wait may take (None:
        no bound). False when the consolidation was still running when time ran out (it stays for the exit)."""
        done = True
        if self.consolidator is not None:
            if not self.consolidator.close(timeout=left()):
                done = False
            elif self.world.is_local_leader:  # what it was still reading when a newer one committed
                self.retention.sweep()
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            if self.remote is None:
                uploader.stop(timeout=left())
            else:
                try:
                    finish_upload(uploader, self.remote, restart=False, timeout=left())
                except CheckpointError as exc:
                    errors.keep(exc)
        return done
