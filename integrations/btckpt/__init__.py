"""btckpt: atomic, asynchronous, pickle-free safetensors checkpoints for PyTorch training.

``import btckpt`` is cheap: torch-dependent parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .discovery import latest
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
    UnsupportedValue,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpointer", "CheckpointConfig", "CheckpointStats", "save", "load", "latest", "CheckpointError", "ConfigError",
    "CoordinationError", "CorruptCheckpoint", "IncompleteCheckpoint", "InsufficientSpace", "NoCheckpointFound",
    "StateMismatch", "TierMismatch", "TierTooSmall", "UnsafeCheckpoint", "UnsupportedValue", "__version__",
]

_LAZY = {"Checkpointer": "manager", "CheckpointConfig": "config", "CheckpointStats": "stats", "save": "api",
         "load": "api"}

if TYPE_CHECKING:
    from .api import load, save
    from .config import CheckpointConfig
    from .manager import Checkpointer
    from .stats import CheckpointStats


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'btckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
