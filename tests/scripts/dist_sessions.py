"""Two Checkpointers per rank on two dirs, created in a different order on each rank (gloo, CPU, torchrun).

Rank 0 opens ``<base>/a`` then ``<base>/b``; rank 1 opens ``b`` then ``a``. Phase ``save``: each saves steps 1
and 2 (in its own opening order, async), with tensors whose values name the dir and the step. Phase
``restore`` (a fresh job): both reopened in each rank's order, restored a then b (restore is a collective:
every rank calls it in the same order); each rank writes what it restored to ``<out>.<rank>.json``, and
what became of a third Checkpointer opened on ``a`` while the first is open (refused).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import btckpt
import torch
import torch.distributed as dist

DIRS = ("a", "b")


def value(d: str, step: int) -> float:
    return 100.0 * (DIRS.index(d) + 1) + step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--phase", choices=["save", "restore"], required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    order = list(DIRS) if rank == 0 else list(reversed(DIRS))
    base = Path(a.base)
    states = {d: {"model": {"w": torch.zeros(4)}, "extra": {"dir": ""}} for d in DIRS}
    ckpts = {d: btckpt.Checkpointer(dir=base / d, keep_last=None, barrier_timeout=20, handle_sigterm=False)
             for d in order}
    restored: dict[str, object] = {}
    try:
        try:  # a second open Checkpointer on one dir would hang on creation order again: refused on every rank
            btckpt.Checkpointer(dir=base / "a", handle_sigterm=False).close()
            restored["second_open"] = "allowed"
        except btckpt.CheckpointError as exc:
            restored["second_open"] = type(exc).__name__
        for d in DIRS:  # same order on every rank
            step = ckpts[d].restore(states[d])
            restored[d] = {"step": step, "w": states[d]["model"]["w"].tolist(), "extra": dict(states[d]["extra"])}
        if a.phase == "save":
            for step in (1, 2):
                for d in order:
                    states[d]["model"]["w"].fill_(value(d, step))
                    states[d]["extra"]["dir"] = d
                    ckpts[d].save(step, states[d])
    finally:
        for d in order:
            ckpts[d].close()
    Path(f"{a.out}.{rank}.json").write_text(json.dumps(restored))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
