"""CPU priority of btckpt's background threads (writer, checksum): yield to training, unless training waits.

While training runs, the threads that write and checksum a save run under ``SCHED_IDLE`` (Linux, per
thread, allowed unprivileged): they get only CPU time that training leaves idle, so a background save
costs the loop at most what an idle core would have done anyway. When training has to wait for them
(back-pressure at the next ``save()``, ``wait()``, ``close()``, a restore), :func:`urgent` puts them back
to normal scheduling (``SCHED_OTHER``, also allowed unprivileged from ``SCHED_IDLE``) for the wait, so
a background save never costs more than a synchronous one. A plain nice value could not do this: an
unprivileged thread may raise its nice value but never lower it again. Elsewhere (not Linux, or refused),
nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["abandon", "background_thread", "is_background", "leave", "urgent", "IDLE_POLICY"]

IDLE_POLICY = getattr(os, "SCHED_IDLE", None)
_lock = threading.Lock()
_threads: set[int] = set()
_urgent = 0


def _set(tid: int, idle: bool) -> None:
    if IDLE_POLICY is None:  # pragma: no cover - not Linux
        return
    try:
        os.sched_setscheduler(tid, IDLE_POLICY if idle else os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):  # pragma: no cover - refused (seccomp, other kernels): keep the priority
        pass


def background_thread() -> None:
    """Mark the calling thread as background work (a thread initializer): idle priority unless urgent."""
    tid = threading.get_native_id()
    with _lock:
        _threads.add(tid)
        _set(tid, idle=_urgent == 0)


def is_background() -> bool:
    """Whether the calling thread is marked as background work."""
    with _lock:
        return threading.get_native_id() in _threads


def leave() -> None:
    """Unmark the calling thread (before it ends: the kernel reuses thread ids)."""
    tid = threading.get_native_id()
    with _lock:
        _threads.discard(tid)
        _set(tid, idle=False)


@contextlib.contextmanager
def urgent() -> Iterator[None]:
    """While training waits for the background threads: schedule them normally."""
    global _urgent
    with _lock:
        _urgent += 1
        if _urgent == 1:
            for tid in _threads:
                _set(tid, idle=False)
    try:
        yield
    finally:
        with _lock:
            _urgent -= 1
            if _urgent == 0:
                for tid in _threads:
                    _set(tid, idle=True)


def abandon() -> None:
    """The process is about to end with background work still running (``os._exit``): schedule those threads
    normally for good, so that they get the CPU to die on a busy machine (a ``SCHED_IDLE`` thread may wait
    seconds for it, and the exit waits for every thread)."""
    global _urgent
    with _lock:
        _urgent += 1
        for tid in _threads:
            _set(tid, idle=False)
