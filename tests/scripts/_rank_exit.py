"""End a launched rank without destructors: call :func:`exit_rank` at the end of ``main()``, not after it.

Two teardown hazards of torch 2.13 on gloo, both after the rank's work is done:

- a deadlock (seen about once in 25 runs of a 2-rank DDP job on a loaded 2-core machine): when ``main()``
  returns, its locals go, and a DDP ``Reducer`` (bound with a plain ``shared_ptr``, destroyed with the GIL
  held) can drop the last reference to the gloo process group (``destroy_process_group()`` only removes it
  from the registry); ``~ProcessGroupGloo`` joins its worker threads, and a worker still freeing the last
  collective's work (``all_gather_object``'s tensors) waits for the GIL: both wait forever (py-spy's
  native stacks: ``std::thread::join`` under ``~Reducer`` / ``gil_scoped_acquire`` under
  ``~AsyncAllgatherWork``);
- an abort at interpreter teardown ("terminate called without an active exception"): gloo's worker threads
  outlive ``destroy_process_group()`` (FSDP2 meshes keep the group alive).

So a rank leaves from inside ``main()``, while every object that holds the group is still alive: it runs
Python's exit handlers (logging, any unclosed Checkpointer), flushes, and ``os._exit``s, so a finished rank
reports its real status. btckpt has no thread left at that point (its Checkpointer is closed).
``exit_rank(main())`` stays the fallback for a ``main()`` that returns early.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_rank(code: int | None) -> NoReturn:
    """Run exit handlers, flush stdio, and exit with ``code`` (None means 0) skipping interpreter teardown."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
