"""Capture and restore every RNG a training step uses, as plain JSON (never pickled).

Covered: torch CPU, every CUDA device (when CUDA is initialised), numpy's global generator (when numpy
is installed) and Python's ``random``. One file per rank: ``rng_state_<rank>.json``. The one implementation
of a rank's RNG for every entry point: the core saves :func:`capture_rng` per rank and restores with
:func:`read_rank_rng`; the HF and Lightning adapters call the same (through :mod:`btckpt.adapters`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpoint
from ..format.layout import RNG_FILE, rng_file
from ..format.manifest import Manifest
from .reader import read_verified_bytes

try:  # numpy is optional: its generator is covered when it is installed
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["capture_rng", "RngState", "parse_rng", "apply_rng", "read_rng_file", "read_rank_rng"]

log = logging.getLogger("btckpt")


def capture_rng() -> dict[str, Any]:
    """The current RNG states of this process as JSON data."""
    state: dict[str, Any] = {
        "python": _to_json(random.getstate()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if np is not None:
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


@dataclass(frozen=True)
class RngState:
    """RNG states parsed and validated (each on a scratch generator), ready to apply; nothing global set yet."""

    python: Any = None
    torch: Any = None
    cuda: Any = None
    numpy: Any = None


_MALFORMED = (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError, RecursionError)


def parse_rng(state: Any, *, where: str) -> RngState:
    """Check :func:`capture_rng` data without touching this process's RNGs; CorruptCheckpoint if malformed."""
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{where}: RNG state is {type(state).__name__}, not an object")
    out: dict[str, Any] = {}
    try:
        if "python" in state:
            out["python"] = _to_tuple(state["python"])
            random.Random().setstate(out["python"])
        if "torch" in state:
            out["torch"] = torch.tensor(state["torch"], dtype=torch.uint8)
            torch.Generator().set_state(out["torch"])
        if "cuda" in state and torch.cuda.is_available():
            if not isinstance(state["cuda"], list):
                raise TypeError("'cuda' is not a list")
            out["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
            want = torch.cuda.get_rng_state().shape
            if any(t.shape != want for t in out["cuda"]):
                raise ValueError(f"a CUDA RNG state is not a {list(want)} byte tensor")
        if "numpy" in state and np is not None:  # without numpy installed, nothing uses its generator
            kind, keys, pos, has_gauss, cached = state["numpy"]
            out["numpy"] = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
            np.random.RandomState().set_state(out["numpy"])
    except _MALFORMED as exc:
        raise CorruptCheckpoint(f"{where}: RNG state is malformed ({type(exc).__name__}: {str(exc)[:200]}); the "
                                "checkpoint is damaged") from None
    return RngState(**out)


def apply_rng(rng: RngState) -> None:
    """Set this process's RNGs from a :func:`parse_rng` result."""
    if rng.python is not None:
        random.setstate(rng.python)
    if rng.torch is not None:
        torch.set_rng_state(rng.torch)
    if rng.cuda is not None and len(rng.cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng.cuda)
    if rng.numpy is not None:
        np.random.set_state(rng.numpy)


def read_rng_file(folder: Path, manifest: Manifest, name: str) -> RngState:
    """Read, verify (checksum) and parse the listed RNG file ``name``; nothing is applied."""
    raw = read_verified_bytes(folder, manifest, name)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptCheckpoint(f"{folder / name}: not valid JSON") from None
    return parse_rng(data, where=str(folder / name))


def read_rank_rng(folder: Path, manifest: Manifest, rank: int) -> RngState | None:
    """``rank``'s RNG state from a checkpoint, read, verified and parsed (nothing applied); None when the
    checkpoint holds none for this rank: with a warning when it holds other ranks' (saved with another world
    size, or by one rank only), quietly when it was saved without RNG state."""
    name = rng_file(rank)
    if name in manifest.files:
        return read_rng_file(folder, manifest, name)
    if any(RNG_FILE.match(n) for n in manifest.files):
        log.warning("btckpt: %s has no RNG state for rank %d (saved by another number of ranks, or by rank 0 "
                    "only); this rank's RNGs are not restored, so the resumed run is not bit-exact", folder, rank)
    else:
        log.info("btckpt: %s was saved without RNG state; RNGs not restored", folder)
    return None

