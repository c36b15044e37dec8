"""Capture and restore every RNG a training step uses, as plain JSON (never pickled).

Covered: torch CPU, every CUDA device (when CUDA is initialised), numpy's global generator (when numpy
is installed) and Python's ``random``. One file per rank: ``rng_state_<rank>.json``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .errors import CorruptCheckpoint

__all__ = ["capture_rng", "restore_rng", "rng_file"]


def rng_file(rank: int) -> str:
    """The file name holding ``rank``'s RNG state."""
    return f"rng_state_{rank}.json"


def capture_rng() -> dict[str, Any]:
    """The current RNG states of this process as JSON data."""
    state: dict[str, Any] = {
        "python": _to_json(random.getstate()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]  # type: ignore[union-attr]
    return state


def _to_json(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_to_json(v) for v in x]
    return x


def _to_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


def restore_rng(state: dict[str, Any], *, where: str) -> None:
    """Set this process's RNGs from :func:`capture_rng` data."""
    try:
        if "python" in state:
            random.setstate(_to_tuple(state["python"]))
        if "torch" in state:
            torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        if "numpy" in state:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"{where}: RNG state is malformed ({exc})") from None
