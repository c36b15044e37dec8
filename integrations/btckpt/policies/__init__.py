"""Policies over the save engine: when to save, when to stop, what to keep.

- :mod:`.schedule`: :class:`SaveSchedule`, the durable cadence (``every_steps``/``every_seconds``) and the
  tier cadence (``local_every_steps``);
- :mod:`.routing`: :class:`SaveRouting`, where a save goes (into ``dir``, or a tier save promoted into ``dir``
  behind its commit) and what a restore or a close promotes;
- :mod:`.preemption`: :class:`Preemption`, SIGTERM to one stop step agreed by every rank through the c10d
  store, and the grace every wait after it fits in (the Checkpointer, HF and Lightning all use it);
- :mod:`.retention`: the :class:`Retention` interface (what a commit retires, protected folders) and
  :class:`KeepLast`, the core's ``keep_last`` implementation, and :class:`LinkRefcount`, the link-file refcount
  (a folder goes when its last name does; Lightning's plugin drives one through ``btckpt.adapters``).
- :mod:`.exit`: the end of the process (a Checkpointer never closed is closed at exit; after SIGTERM, work
  that outlived the grace does not hold the exit up).

Mechanism (snapshot, write, commit, the error channel) is :mod:`btckpt.saving.engine`; the
:class:`~btckpt.Checkpointer` wires the two. Layer: above ``tiers``/``publish``, below the Checkpointer and
``adapters.py``.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its modules and names may change without notice.
"""

from .preemption import Preemption
from .retention import KeepLast, LinkRefcount, Retention
from .routing import SaveRouting
from .schedule import SaveSchedule

__all__ = ["Preemption", "Retention", "KeepLast", "LinkRefcount", "SaveRouting", "SaveSchedule"]
