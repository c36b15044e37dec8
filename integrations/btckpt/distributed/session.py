"""Sessions: what names a Checkpointer among the ranks of a job, and the tag every rank's copy of it shares."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import weakref
from typing import Protocol

from ..errors import ConfigError
from ..storage.local import is_url, local_path, new_tag
from .world import World

__all__ = ["session_identity", "agree_session", "OpTags"]


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...


# keyed by (identity, rank): one rank per process in a job; ranks as threads of one process (World(store=), the
# in-process agreement tests) each count their own, as separate processes would
_SESSIONS: dict[tuple[str, int], itertools.count[int]] = {}  # -> sessions created on it so far
_OPEN: dict[tuple[str, int], weakref.ref[_Closable]] = {}  # -> the coordinating owner using it
_LOCK = threading.Lock()


def session_identity(dir: str | os.PathLike[str] | None, name: str | None) -> str:
    """What names a Checkpointer among the ranks of a job: ``name`` when given, else ``dir`` as the caller
    passed it (normalised, not resolved), else ``$BT_CHECKPOINT_DIR`` (the variable, whatever its value on
    each node: every node reads its own). Raises ConfigError for an empty or non-string ``name``."""
    if name is not None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string, the same on every rank")
        return f"name:{name}"
    if dir is None:
        return "env:BT_CHECKPOINT_DIR"
    raw = os.fspath(dir)
    return f"dir:{raw.rstrip('/')}" if is_url(raw) else f"dir:{os.path.normpath(local_path(raw))}"


def agree_session(world: World, identity: str, *, owner: _Closable, timeout: float) -> str:
    """The session every rank's owner (a Checkpointer) of ``identity`` shares: a random tag global rank 0 picks.

    Every rank calls it once per owner, owners of one identity one after another in the same order on every rank
    (a second one still open in this process is refused: ConfigError). Its store key is the identity (hashed)
    and how many owners of that identity this process created before; every agreement after it is keyed by the
    session. One process (or no store): a fresh tag, no agreement."""
    mine = new_tag()
    if world.size == 1 or world.store is None:
        return mine
    with _LOCK:
        other = _OPEN.get((identity, world.rank))
        held = other() if other is not None else None
        if held is not None and not held.closed:
            raise ConfigError(f"another Checkpointer for {identity.split(':', 1)[1]!r} is still open in this process; "
                              "close it first, or give each its own name= (the same on every rank)")
        _OPEN[identity, world.rank] = weakref.ref(owner)
        seq = next(_SESSIONS.setdefault((identity, world.rank), itertools.count()))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    # torchrun --max-restarts may keep its store across restarts: a restarted worker must never pick up the
    # previous attempt's session (its keys hold that attempt's answers)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"session/{digest}/{attempt}/{seq}"
    if world.is_leader:
        world.publish(key, mine)
    return str(world.collect(key, timeout=timeout))


class OpTags:
    """The tags of one session's collective calls (store keys, temp folder names): ``tags(op)`` is the session,
    ``op`` and a counter. Every rank makes the same calls in the same order, so every rank draws the same tag
    for the same call; a caller that may return early draws its tag first."""

    def __init__(self, session: str) -> None:
        self.session, self._count = session, itertools.count()

    def __call__(self, op: str) -> str:
        return f"{self.session}-{op}{next(self._count)}"
