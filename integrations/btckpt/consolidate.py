"""``btckpt consolidate CKPT OUT``: a servable HF model folder from a (sharded) checkpoint.

Reads the ``model`` group of a checkpoint (per-rank FSDP2/DTensor shards, on one node or with every
node's part side by side as ``rank-<node>/checkpoint-<step>``), assembles full tensors (checksums verified),
and writes ``OUT`` atomically: ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + index)
under the model's own keys, plus the checkpoint's non-tensor files such as ``config.json``,
``generation_config.json`` and tokenizer files, so ``from_pretrained(OUT)`` loads it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .discovery import inspect, latest
from .errors import CheckpointError, IncompleteCheckpoint, NoCheckpointFound

__all__ = ["consolidate", "main"]

_SKIP = re.compile(r"^(rng_state_\d+\.json|.+-rank\d{5}(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
                   r"|[A-Za-z0-9_.-]+(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?)$")


def _model_tensors(folder: Path, group: str) -> dict[str, torch.Tensor]:
    from ._tree import decode_tree
    from .dcp_bridge import _Parts
    from .reader import CheckpointReader

    info = inspect(folder)
    if not info.complete or info.manifest is None:
        raise IncompleteCheckpoint(f"{folder}: not a complete btckpt checkpoint ({info.reason or info.status})")
    man = info.manifest
    if group not in man.state:
        raise CheckpointError(f"{folder}: the checkpoint has no group {group!r} (it has {sorted(man.state)})")
    parts = _Parts(folder, man)
    plain = CheckpointReader(folder, man)

    def load(ref: Any) -> torch.Tensor:
        if isinstance(ref, dict) and "sharded" in ref:
            from .sharded import assemble

            return assemble(ref["sharded"], parts.tensor)
        return plain._file(ref["file"])[ref["key"]]

    tree = decode_tree(man.state[group], load)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{folder}: group {group!r} is not a state dict")
    return {k: v for k, v in tree.items() if isinstance(v, torch.Tensor)}


def consolidate(src: str | os.PathLike[str], out: str | os.PathLike[str], *, group: str = "model",
                max_shard_size: int = 5 * 10**9) -> Path:
    """Write the full weights of ``src``'s ``group`` as an HF model folder ``out`` (must not exist).

    ``src`` is a checkpoint folder or a folder holding checkpoints (the newest complete one is used).
    Returns ``out``. The folder is committed atomically and carries a btckpt manifest as well.
    """
    from .api import save
    from .manifest import MANIFEST

    src_p = Path(src)
    if not (src_p / MANIFEST).exists():
        found = latest(src_p)
        if found is None:
            raise NoCheckpointFound(f"no complete checkpoint at or under {src_p}")
        src_p = Path(found)
    tensors = _model_tensors(src_p, group)
    info = inspect(src_p)
    assert info.manifest is not None
    extra: dict[str, bytes] = {}
    for name in info.manifest.files:
        if "/" in name or _SKIP.match(name):
            continue
        from .reader import read_verified_bytes

        extra[name] = read_verified_bytes(src_p, info.manifest, name)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return save(out, {"model": contiguous}, step=info.step, max_shard_size=max_shard_size, save_rng=False,
                extra_files=extra)


def main(argv: list[str] | None = None) -> int:
    """``btckpt consolidate CKPT OUT [--max-shard-size BYTES]``."""
    ap = argparse.ArgumentParser(prog="btckpt consolidate", description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--group", default="model")
    ap.add_argument("--max-shard-size", type=int, default=5 * 10**9)
    args = ap.parse_args(argv)
    try:
        path = consolidate(args.ckpt, args.out, group=args.group, max_shard_size=args.max_shard_size)
    except CheckpointError as exc:
        print(f"btckpt consolidate: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
