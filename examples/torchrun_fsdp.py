"""FSDP2 on CPU with gloo + btckpt: every rank saves only its own shards; a restart resumes (any world size).

    torchrun --nproc_per_node=2 examples/torchrun_fsdp.py            # trains, saves every 5 steps
    torchrun --nproc_per_node=2 examples/torchrun_fsdp.py            # run again: resumes from the last one
    torchrun --nproc_per_node=4 examples/torchrun_fsdp.py --steps 40 # resumes, resharded 2 -> 4 ranks

Checkpoints go to $BT_CHECKPOINT_DIR (default ./checkpoints); on the platform a restarted job also looks
in $BT_LOAD_CHECKPOINT_DIR. For serving weights: ``python -m btckpt.consolidate CKPT OUT``.
"""

from __future__ import annotations

import argparse
import datetime

import btckpt
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(4)],
                                torch.nn.Linear(64, 8))
    for block in model:
        fully_shard(block)  # each block's parameters become DTensors sharded on dim 0
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = {"step": 0}
    state = {"model": model, "optimizer": opt, "progress": progress}

    with btckpt.Checkpointer(keep_last=2, barrier_timeout=120) as ckpt:
        start = ckpt.restore(state) or 0  # reshards automatically when the world size changed
        if rank == 0:
            print(f"starting at step {start}", flush=True)
        torch.manual_seed(1000 + rank + start)
        for step in range(start + 1, args.steps + 1):
            x = torch.randn(16, 64)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress["step"] = step
            if step % args.every == 0:
                ckpt.save(step, state)  # returns at once; shards are written in the background
                if rank == 0:
                    print(f"step {step}: loss {loss.item():.4f}, saved", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
