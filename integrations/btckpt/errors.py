"""Exceptions raised by btckpt.

Every error btckpt raises is a :class:`CheckpointError`; the subclasses say what went wrong so callers
can react (fall back, free space, fix a config). Messages name the path or key involved and the fix.

Public through ``btckpt``: every exception class here (``btckpt.CheckpointError`` and its subclasses);
import them from there. The module itself is internal: its path may change without notice.
"""

from __future__ import annotations

from .names import safe

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpoint",
    "IncompleteCheckpoint",
    "InsufficientSpace",
    "TierTooSmall",
    "TierMismatch",
    "NoCheckpointFound",
    "StateMismatch",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "UnsupportedValue",
    "CoordinationError",
]


class CheckpointError(Exception):
    """Base class of every error btckpt raises. Its message never shows raw control characters or the
    credentials of a URL (names in it come from checkpoints and buckets: see :mod:`btckpt.names`).

    A multi-line message is given as one argument per line (``StateMismatch(first, "  detail", ...)``): each
    line is escaped on its own (a newline inside a name shows as ``\\x0a``), and they are joined by real
    newlines, in a raised traceback and in btckpt's log records alike (:meth:`safe_text`)."""

    def _lines(self) -> bool:
        return len(self.args) > 1 and all(isinstance(a, str) for a in self.args)

    def safe_text(self) -> str:
        """The message as a log shows it: each line escaped, lines joined by newlines (a one-argument message
        is escaped whole, newlines included)."""
        return "\n".join(safe(a) for a in self.args) if self._lines() else safe(super().__str__())

    def __str__(self) -> str:
        return self.safe_text() if self._lines() else safe(super().__str__(), keep_newlines=True)


class ConfigError(CheckpointError, ValueError):
    """A configuration value (argument or environment variable) is unusable."""


class CorruptCheckpoint(CheckpointError):
    """A committed checkpoint's bytes do not match its manifest (checksum, size, malformed header)."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint folder lacks its manifest or one of its files (it never committed)."""


class InsufficientSpace(CheckpointError):
    """The target filesystem cannot hold the checkpoint; nothing was written."""


class TierTooSmall(InsufficientSpace):
    """The node-local (RAM) tier cannot hold the copies it keeps (state bytes x copies > free space)."""


class TierMismatch(CheckpointError):
    """A node-local tier folder belongs to another job (its identity record names another checkpoint dir)."""


class NoCheckpointFound(CheckpointError):
    """A resume was asked for (``load_dir`` set) but no complete checkpoint exists anywhere."""


class StateMismatch(CheckpointError):
    """The checkpoint's keys, shapes or dtypes do not match the state it is restored into."""


class UnsafeCheckpoint(CorruptCheckpoint):
    """A manifest or index names a path outside its folder (absolute, ``..``, a link out)."""


class UnsupportedFormat(CheckpointError):
    """A checkpoint written by a newer btckpt (a manifest ``format`` this version does not read): not damaged;
    upgrade btckpt to load it."""


class UnsupportedValue(CheckpointError, TypeError):
    """A state value is neither a tensor nor JSON data (btckpt never pickles)."""


class CoordinationError(CheckpointError):
    """Ranks or nodes did not agree in time (a peer died or hung during a save)."""
