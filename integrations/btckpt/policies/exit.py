"""The end of the process: a Checkpointer the script never closed is closed at exit, and a preemption whose grace
ran out ends the process at once.

Call order: the Checkpointer's constructor calls :func:`register_exit` last (with a weak reference: an
unreferenced Checkpointer is not kept alive); :func:`close_at_exit` then runs once the main thread ends. Guarantees:
what was saved is committed before the process exits (a save that fails here makes it exit 1, never 0 over a lost
checkpoint); after SIGTERM, work still running when ``preemption_grace`` ran out does not hold the exit up.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from typing import Any

from ..saving import priority

__all__ = ["close_at_exit", "exit_now", "register_exit"]

log = logging.getLogger("btckpt")


def close_at_exit(ref: Any) -> None:
    """Commit what was saved when the script ends without ``close()``; a save that fails here is fatal.

    ``ref()``: the Checkpointer (or None once collected); it reads and sets its ``_closed``, ``_crashed`` and
    ``_abandoned``. Registered with ``threading._register_atexit`` (runs when the main thread ends, before
    ``concurrent.futures`` stops taking work and joins its workers) and ``atexit`` as a backstop.
    """
    ckpt = ref()
    if ckpt is None:
        return
    if not ckpt._closed:
        ckpt._crashed = getattr(sys, "last_value", None) is not None  # the script died of an uncaught exception
        try:
            ckpt.close()
        except BaseException as exc:  # noqa: BLE001 - the process must not exit 0 over a lost checkpoint
            log.error("btckpt: the save still in flight at exit failed, its checkpoint is lost: %s", exc)
            exit_now(1)
    if ckpt._abandoned:  # after SIGTERM, work still running when the grace ran out: exit now, not after it
        log.warning("btckpt: exiting with work still running (preemption_grace ran out); what is not committed is "
                    "lost, older checkpoints and the local tier are intact")
        exit_now(0)


def exit_now(code: int) -> None:
    """End the process at once (no joining the threads still writing): flush the log and the streams first.
    The background threads go back to normal scheduling first: a ``SCHED_IDLE`` thread on a busy machine waits
    for CPU before it can die, and the process's exit with it (12 s measured, RESULTS.md "A SIGTERM exit")."""
    priority.abandon()
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def register_exit(ref: Any) -> None:
    """Run :func:`close_at_exit` for ``ref`` (a weak reference to a Checkpointer) when the process ends."""
    try:
        threading._register_atexit(close_at_exit, ref)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # pragma: no cover - private API missing, or already shutting down
        pass
    atexit.register(close_at_exit, ref)
