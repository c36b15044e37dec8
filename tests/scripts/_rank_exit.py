"""End a launched rank without C++ static destructors.

gloo's worker threads outlive ``destroy_process_group()`` (FSDP2 meshes keep the group alive), and under
load a rank has been seen to abort at interpreter teardown with "terminate called without an active
exception" after its work was done. btckpt has no thread left at that point (its Checkpointer is
closed). The scripts run Python's exit handlers (logging, any unclosed Checkpointer), flush, and leave
with ``os._exit``, so a finished rank reports its real status.
"""

from __future__ import annotations

import atexit
import os
import sys


def exit_rank(code: int | None) -> None:
    """Run exit handlers, flush stdio, and exit with ``code`` (None means 0) skipping interpreter teardown."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
