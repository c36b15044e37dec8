"""btckpt: atomic, asynchronous, pickle-free safetensors checkpoints for PyTorch training.

``import btckpt`` is cheap: torch-dependent parts load on first use.

Layers (each imports only the ones below it; ``tests/test_imports.py`` checks it):

- ``hf/``, ``lightning/``, ``cli/``: adapters and the command; ``adapters.py`` is what every adapter shares,
  and the framework adapters' one door into the core (besides ``errors.py`` and ``config.py``);
- ``checkpointer.py`` (:class:`Checkpointer`: the facade over the save engine, the policies and the tiers),
  ``oneshot.py`` (``save``/``load``), ``consolidate.py`` (servable model folders), ``upload.py`` (entry);
- ``policies/``: when to save (SaveSchedule), when to stop (Preemption), what to keep (Retention);
- ``publish/``: the uploader process, its journal and supervisor;
- ``tiers/``: the node-local (RAM) tier (folder, identity, memory check, promotion) and peer replicas;
- ``saving/`` and ``restore/``: writing (plan, snapshot, write, commit, retention) and reading (policy,
  verified read, apply, RNG, DCP) -- siblings that never import each other;
- ``config.py``, ``stats.py``, ``streams.py``: the options (validated once), the public figures, the copy streams
  (a side CUDA stream and its one-thread CPU stand-in) the snapshot and the restore share;
- ``distributed/``: ranks, agreement through the c10d store, sharded state;
- ``storage/``: the Store protocol, local durability, discovery;
- ``format/``: manifest, safetensors header, state tree, checksum;
- ``errors.py``, ``names.py``, ``testing/``: used by everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    CoordinationError,
    CorruptCheckpoint,
    IncompleteCheckpoint,
    InsufficientSpace,
    NoCheckpointFound,
    StateMismatch,
    TierMismatch,
    TierTooSmall,
    UnsafeCheckpoint,
    UnsupportedFormat,
    UnsupportedValue,
)
from .restore.policy import latest

__version__ = "0.1.0"

__all__ = [
    "Checkpointer", "CheckpointConfig", "CheckpointStats", "save", "load", "latest", "CheckpointError", "ConfigError",
    "CoordinationError", "CorruptCheckpoint", "IncompleteCheckpoint", "InsufficientSpace", "NoCheckpointFound",
    "StateMismatch", "TierMismatch", "TierTooSmall", "UnsafeCheckpoint", "UnsupportedValue", "__version__",
    "RestoreReport", "restore_reports", "UnsupportedFormat",
]

_LAZY = {"Checkpointer": "checkpointer", "CheckpointConfig": "config", "CheckpointStats": "stats", "save": "oneshot",
         "load": "oneshot", "RestoreReport": "restore.load", "restore_reports": "restore.load"}

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .config import CheckpointConfig
    from .oneshot import load, save
    from .restore.load import RestoreReport, restore_reports
    from .stats import CheckpointStats


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'btckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
