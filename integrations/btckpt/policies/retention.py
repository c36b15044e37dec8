"""Retention: what a durable commit retires. Policy only; the deleting is :mod:`btckpt.saving.retention`'s."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..saving.retention import apply_retention, remove_diverged

__all__ = ["Retention", "KeepLast"]


@runtime_checkable
class Retention(Protocol):
    """The retention interface: told of each durable commit, it retires what that commit replaces.

    Call order: :meth:`committed` runs on the writer thread of the rank that commits (the node's leader),
    after the commit is durable on every node, and before the save's ``on_commit``; :meth:`protect` and
    :meth:`unprotect` from any thread at any time. Guarantee (DESIGN.md, Deletion): nothing is deleted before
    a newer checkpoint committed, never the newest complete one, never a protected one; a deletion asked for
    while a save writes waits for that save's commit.

    Implementations: :class:`KeepLast` (the Checkpointer's ``keep_last``) and Lightning's link refcount
    (``btckpt.lightning.SafetensorsCheckpointIO``: a folder goes when its last name does).
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
