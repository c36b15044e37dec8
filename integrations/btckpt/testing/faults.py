"""Fault injection for tests: make a named phase of the save/commit/upload fail on purpose.

Phases call :func:`point`; a test arms one with :func:`arm` (in process) or the environment variable
``BTCKPT_FAULT=phase:action[,phase:action]`` (for subprocesses). Actions: ``raise`` (OSError EIO),
``enospc`` (OSError ENOSPC), ``eio``, ``kill`` (SIGKILL this process), ``killpg`` (SIGKILL this process's
whole process group: e.g. the uploader takes the training process down with it, as a node crash would),
``exit`` (os._exit(17)), ``sleep<seconds>`` (e.g. ``sleep5``: the phase takes that long, a slow disk or
mount; it then goes on).
An action may end in ``@<rank>`` (e.g. ``write_data:kill@1``): it then fires only where ``$RANK`` is that rank.
:func:`reached` tells a test which points were hit, so it can fail if a configured point never was.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

__all__ = ["PHASES", "arm", "disarm", "point", "reached"]

PHASES = (
    "stage", "write_data", "write_rng", "before_fsync", "after_fsync", "before_manifest", "after_manifest",
    "before_rename", "after_rename", "retention", "upload_file", "upload_manifest", "promote", "replicate",
    "consolidate",
)  # the one table: arm() and $BTCKPT_FAULT both accept exactly these

_lock = threading.Lock()
_armed: dict[str, str] = {}
_reached: set[str] = set()
_env_loaded = False


def _load_env() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    for item in filter(None, os.environ.get("BTCKPT_FAULT", "").split(",")):
        phase, _, action = item.partition(":")
        action, _, rank = action.partition("@")
        if phase.strip() not in PHASES:
            raise ValueError(f"BTCKPT_FAULT names unknown fault phase {phase.strip()!r}; known: {', '.join(PHASES)}")
        if rank.strip() and rank.strip() != os.environ.get("RANK", "0").strip():
            continue
        _armed.setdefault(phase.strip(), action.strip() or "raise")


def arm(phase: str, action: str = "raise") -> None:
    """Make the next time ``phase`` is reached fail with ``action`` (until disarmed)."""
    if phase not in PHASES:
        raise ValueError(f"unknown fault phase {phase!r}; known: {', '.join(PHASES)}")
    with _lock:
        _armed[phase] = action


def disarm() -> None:
    """Clear every armed fault and the record of reached points."""
    with _lock:
        _armed.clear()
        _reached.clear()


def reached() -> set[str]:
    """The phases reached since the last :func:`disarm`."""
    with _lock:
        return set(_reached)


def point(phase: str) -> None:
    """Mark ``phase`` reached and fail if a fault is armed for it. Costs a dict lookup otherwise."""
    _load_env()
    with _lock:
        _reached.add(phase)
        action = _armed.get(phase)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "killpg":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if action == "exit":
        os._exit(17)
    if action.startswith("sleep"):
        time.sleep(float(action[5:] or 1))
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"injected ENOSPC at {phase}")
    raise OSError(errno.EIO, f"injected I/O error at {phase}")
