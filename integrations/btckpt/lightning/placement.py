"""Where :class:`~btckpt.lightning.SafetensorsCheckpointIO` stores checkpoints: ``$BT_CHECKPOINT_DIR`` when set,
whichever folder Lightning (or the user) asked for, with one warning per other folder (:mod:`btckpt.lightning`'s
module doc, "Where checkpoints go")."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..adapters import is_url, named_checkpoint
from ..errors import IncompleteCheckpoint
from .state import platform_dir, read_link

__all__ = ["Placement"]

log = logging.getLogger("btckpt")


class Placement:
    """The folder choice of one plugin: :meth:`folder` for a folder asked for, :meth:`stored_at` for a path
    handed to ``save_checkpoint``, :meth:`found_at` for one handed to a load or a removal, :meth:`resolve`
    for the checkpoint folder a load means."""

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def folder(self, asked: str | os.PathLike[str] | None, *, what: str) -> Path | None:
        """The folder checkpoints go to when ``asked`` (None: Lightning's default) was asked for by ``what``:
        ``$BT_CHECKPOINT_DIR`` when set to a local folder, else None (``asked`` stands); a different ``asked``
        gets one warning per folder naming both."""
        bt = platform_dir()
        if bt is None or asked is None:
            return bt
        here = os.fspath(asked)
        if not is_url(here) and os.path.realpath(os.path.expanduser(here)) == str(bt):
            return bt
        with self._lock:
            first = here not in self._warned
            self._warned.add(here)
        if first:
            log.warning("btckpt: %s is not $BT_CHECKPOINT_DIR (%s): SafetensorsCheckpointIO stores these "
                        "checkpoints in %s instead, the only folder the platform backs up and the one "
                        "resume_path() and ckpt_path=\"last\" search after a restart; nothing is written to %s. "
                        "Leave dirpath unset (or point it there) to silence this; to write to %s, unset "
                        "BT_CHECKPOINT_DIR (checkpoints there are neither backed up nor found on a restart).",
                        what, bt, bt, here, here)
        return bt

    def stored_at(self, path: Path) -> Path:
        """Where ``save_checkpoint(path)`` stores ``path``."""
        bt = self.folder(path.parent, what=f"the checkpoint path {str(path)!r}")
        return path if bt is None or path.parent == bt else bt / path.name

    @staticmethod
    def found_at(path: Path, *, pending: Callable[[Path], bool]) -> Path:
        """``path`` when it exists, else where ``save_checkpoint(path)`` would have stored it (when that exists,
        or ``pending`` says it is being written)."""
        bt = platform_dir()
        if bt is None or os.path.lexists(path):
            return path
        moved = bt / path.name
        return moved if os.path.lexists(moved) or pending(moved) else path

    def resolve(self, path: Path, *, pending: Callable[[Path], bool], wait: Callable[[], None]) -> Path:
        """The checkpoint folder a load of ``path`` means: a link file's folder, a checkpoint (or plain model)
        folder itself, else the newest sound one under it (the resume policy); ``wait()`` first when ``path``
        is being written (``pending``)."""
        path = self.found_at(path, pending=pending)
        if pending(path):
            wait()
        if path.is_dir():
            info = named_checkpoint(path)
            assert info is not None  # a named folder with nothing sound raises NoCheckpointFound
            return info.path
        if path.is_file():
            folder = read_link(path)
            if not folder.is_dir():
                raise IncompleteCheckpoint(f"{path} names {folder.name}, which does not exist (removed?)")
            return folder
        raise FileNotFoundError(f"Checkpoint at {path} not found. Aborting training.")
